"""The `torch` target without a server: rendered configs, the vqa_tensors ensemble, and the PyTorch engines on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tritonclient.grpc import model_config_pb2 as mc

from export.render_repo import (
    COMMITTED_REPO,
    TENSORS_ENSEMBLE,
    TORCH_MAX_BATCH,
    load_config,
    render_config,
    render_repository,
    tensors_ensemble_config,
)
from serving.model.checkpoint import load_checkpoint
from serving.model.engines import EngineSettings, TorchEngine, batch_buckets
from serving.model.io_spec import ENGINES, engine_specs
from serving.model.model import FusionConfig

TINY, BASE = FusionConfig.preset("tiny"), FusionConfig.preset("base")


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_stay_python_models_running_pytorch_on_any_device(engine):
    config = render_config(load_config(COMMITTED_REPO / engine / "config.pbtxt"), BASE, "torch", engine)
    assert config.backend == "python" and not config.platform
    assert config.max_batch_size == TORCH_MAX_BATCH
    assert list(config.dynamic_batching.preferred_batch_size) == []
    assert all(g.kind == mc.ModelInstanceGroup.KIND_AUTO for g in config.instance_group)
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params == {"autocast": "fp16", "mode": "cuda_graphs", "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
                      "torch_threads": "2"}
    spec = engine_specs(BASE)[engine]
    assert [tuple(t.dims) for t in config.input] == [t.dims for t in spec.inputs]


def test_vqa_hands_the_engines_batches_as_large_as_they_take():
    config = render_config(load_config(COMMITTED_REPO / "vqa" / "config.pbtxt"), TINY, "torch", "vqa")
    assert config.parameters["engine_max_batch"].string_value == str(TORCH_MAX_BATCH)


def test_tensors_ensemble_chains_the_three_engines():
    config = tensors_ensemble_config(BASE)
    assert config.platform == "ensemble" and config.name == TENSORS_ENSEMBLE
    assert [t.name for t in config.input] == ["PIXELS", "INPUT_IDS", "ATTENTION_MASK"]
    assert [tuple(t.dims) for t in config.input][0] == (224, 224, 3)
    assert [t.name for t in config.output] == ["VQA_LOGITS"]
    steps = {s.model_name: s for s in config.ensemble_scheduling.step}
    assert list(steps) == list(ENGINES)
    assert dict(steps["fusion"].input_map) == {
        "IMAGE_FEATURES": "image_features", "TEXT_FEATURES": "text_features", "ATTENTION_MASK": "ATTENTION_MASK",
    }
    assert dict(steps["image_encoder"].output_map) == {"IMAGE_FEATURES": "image_features"}


def test_rendered_repository_gets_torch_model_files_and_the_ensemble(tmp_path):
    written = render_repository(tmp_path / "repo", TINY, "torch")
    assert TENSORS_ENSEMBLE in written and (tmp_path / "repo" / TENSORS_ENSEMBLE / "1").is_dir()
    for engine in ENGINES:
        assert "TorchEngineModel" in (tmp_path / "repo" / engine / "1" / "model.py").read_text()
    assert "VqaModel" in (tmp_path / "repo" / "vqa" / "1" / "model.py").read_text()


def test_batch_buckets_cover_every_batch_up_to_the_largest():
    assert batch_buckets(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]


@pytest.fixture(scope="module")
def tiny():
    return load_checkpoint(COMMITTED_REPO.parent / "checkpoints" / "tiny").model


def test_torch_fusion_without_weights_equals_with_weights_on_cpu(tiny):
    engine = TorchEngine(tiny, "fusion", "cpu", EngineSettings())
    rng = np.random.default_rng(0)
    feats = torch.from_numpy(rng.standard_normal((3, 64, 144)).astype(np.float32))
    tfeats = torch.from_numpy(rng.standard_normal((3, 24, 144)).astype(np.float32))
    mask = torch.zeros(3, 24, dtype=torch.int64)
    mask[:, :7] = 1
    full = engine([feats, tfeats, mask], need_attention=True)
    fast = engine([feats, tfeats, mask], need_attention=False)
    assert full[2] is not None and tuple(full[2].shape) == (3, 2, 24, 64)
    assert fast[2] is None
    torch.testing.assert_close(fast[0], full[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1], full[1], atol=1e-5, rtol=1e-5)


def test_engine_refuses_a_batch_over_its_largest_bucket(tiny):
    engine = TorchEngine(tiny, "image_encoder", "cpu", EngineSettings(max_batch=4))
    with pytest.raises(ValueError, match="over this engine's max_batch"):
        engine.bucket(5)
