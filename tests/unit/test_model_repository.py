"""The hand-written config.pbtxt files agree with the tensors the model code declares (io_spec)."""

from __future__ import annotations

import pytest

from export.generate_model import MODEL_PY, generate_config
from serving.model.io_spec import ENGINES, VQA_TENSORS, engine_specs, preprocess_spec
from serving.model.model import FusionConfig
from serving.triton.launcher import DEFAULT_REPOSITORY
from serving.triton.model_config import io_of, load_config

TINY = FusionConfig.preset("tiny")
BATCHED = (*ENGINES, "preprocess", "vqa")


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_config_matches_io_spec(engine):
    cfg = load_config(DEFAULT_REPOSITORY / engine)
    assert cfg.name == engine
    assert io_of(cfg) == engine_specs(TINY)[engine]


def test_preprocess_and_vqa_match_io_spec():
    assert io_of(load_config(DEFAULT_REPOSITORY / "preprocess")) == preprocess_spec(TINY)
    assert io_of(load_config(DEFAULT_REPOSITORY / "vqa")) == VQA_TENSORS


@pytest.mark.parametrize("model", BATCHED)
def test_every_model_batches_with_a_bounded_queue_of_at_least_64(model):
    cfg = load_config(DEFAULT_REPOSITORY / model)
    assert cfg.max_batch_size > 1
    assert cfg.HasField("dynamic_batching")
    assert cfg.dynamic_batching.default_queue_policy.max_queue_size >= 64
    assert cfg.backend == "python"  # the embedded server has only the Python backend


def test_vqa_batches_32_and_engines_take_its_whole_batch():
    vqa = load_config(DEFAULT_REPOSITORY / "vqa")
    assert vqa.max_batch_size >= 32
    for e in ENGINES:
        assert load_config(DEFAULT_REPOSITORY / e).max_batch_size >= vqa.max_batch_size


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_warm_up_with_declared_inputs(engine):
    cfg = load_config(DEFAULT_REPOSITORY / engine)
    assert len(cfg.model_warmup) >= 1
    names = {i.name: tuple(i.dims) for i in cfg.input}
    for w in cfg.model_warmup:
        assert {k: tuple(v.dims) for k, v in w.inputs.items()} == names


def test_caption_config_is_the_generate_models_config():
    """Hand-written with its comments, but what export.generate_model writes for every generate model."""
    path = DEFAULT_REPOSITORY / "caption" / "config.pbtxt"
    assert path.read_text().startswith("#")
    assert load_config(DEFAULT_REPOSITORY / "caption") == generate_config("caption")
    # The install writes the same model.py: an install leaves the committed file as it is.
    assert (DEFAULT_REPOSITORY / "caption" / "1" / "model.py").read_text() == MODEL_PY
