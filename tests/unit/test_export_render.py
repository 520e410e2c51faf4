"""Rendering config.pbtxt for a target and preset: backends, parameters, instance kinds and io_spec dims."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.errors import RenderError
from export.render_repo import (
    COMMITTED_REPO,
    config_mismatches,
    dump_config,
    load_config,
    model_dirs,
    render_config,
    render_repository,
)
from serving.model.io_spec import ENGINES, engine_specs, preprocess_spec
from serving.model.model import FusionConfig

TINY, SMALL, BASE = (FusionConfig.preset(p) for p in ("tiny", "small", "base"))

# A Python-backend engine as the embedded repository writes one (fixture: independent of the committed files).
FUSION_PBTXT = """
name: "fusion"
backend: "python"
max_batch_size: 64
input [
  { name: "IMAGE_FEATURES" data_type: TYPE_FP32 dims: [ 64, 144 ] },
  { name: "TEXT_FEATURES" data_type: TYPE_FP32 dims: [ 24, 144 ] },
  { name: "ATTENTION_MASK" data_type: TYPE_INT64 dims: [ 24 ] }
]
output [
  { name: "VQA_LOGITS" data_type: TYPE_FP32 dims: [ 14 ] },
  { name: "ITM_LOGIT" data_type: TYPE_FP32 dims: [ 1 ] },
  { name: "CROSS_ATTENTION" data_type: TYPE_FP32 dims: [ 2, 24, 64 ] }
]
instance_group [ { count: 2 kind: KIND_CPU } ]
dynamic_batching { preferred_batch_size: [ 16, 32 ] default_queue_policy { max_queue_size: 256 } }
parameters { key: "intra_op_threads" value: { string_value: "2" } }
parameters { key: "onnx_file" value: { string_value: "model.onnx" } }
model_warmup [ {
  name: "zeros" batch_size: 8
  inputs { key: "IMAGE_FEATURES" value: { data_type: TYPE_FP32 dims: [ 64, 144 ] zero_data: true } }
  inputs { key: "TEXT_FEATURES" value: { data_type: TYPE_FP32 dims: [ 24, 144 ] zero_data: true } }
  inputs { key: "ATTENTION_MASK" value: { data_type: TYPE_INT64 dims: [ 24 ] zero_data: true } }
} ]
"""


def fusion() -> mc.ModelConfig:
    return text_format.Parse(FUSION_PBTXT, mc.ModelConfig())


def test_embedded_render_of_a_right_config_is_the_identity():
    assert render_config(fusion(), TINY, "embedded") == fusion()


def test_render_does_not_modify_its_input():
    config = fusion()
    render_config(config, BASE, "tensorrt")
    assert config == fusion()


@pytest.mark.parametrize("cfg", [SMALL, BASE], ids=["small", "base"])
def test_preset_rewrites_every_dim_from_io_spec(cfg):
    out = render_config(fusion(), cfg, "embedded")
    spec = engine_specs(cfg)["fusion"]
    assert [(t.name, tuple(t.dims)) for t in out.input] == [(t.name, t.dims) for t in spec.inputs]
    assert [(t.name, tuple(t.dims)) for t in out.output] == [(t.name, t.dims) for t in spec.outputs]
    (warmup,) = out.model_warmup
    assert {k: tuple(v.dims) for k, v in warmup.inputs.items()} == {t.name: t.dims for t in spec.inputs}
    assert tuple(out.input[0].dims) == (cfg.num_patches, cfg.dim)  # small/base: 196 patches of 384/768
    assert out.backend == "python" and out.parameters["onnx_file"].string_value == "model.onnx"


def test_onnxruntime_target_uses_the_native_backend_and_its_thread_parameter():
    out = render_config(fusion(), TINY, "onnxruntime")
    assert (out.backend, out.platform, out.default_model_filename) == ("onnxruntime", "onnxruntime_onnx", "model.onnx")
    assert dict((k, v.string_value) for k, v in out.parameters.items()) == {"intra_op_thread_count": "2"}
    assert [(g.count, g.kind) for g in out.instance_group] == [(2, mc.ModelInstanceGroup.KIND_AUTO)]
    assert out.dynamic_batching == fusion().dynamic_batching and out.max_batch_size == 64


def test_tensorrt_target_uses_plans_on_the_gpu_without_python_parameters():
    out = render_config(fusion(), TINY, "tensorrt")
    assert (out.backend, out.platform, out.default_model_filename) == ("tensorrt", "tensorrt_plan", "model.plan")
    assert len(out.parameters) == 0
    assert [g.kind for g in out.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]


def test_rendered_text_parses_back_to_the_same_config():
    out = render_config(fusion(), SMALL, "tensorrt")
    text = dump_config(out, "a header\nof two lines")
    assert text.startswith("# a header\n# of two lines\n")
    assert text_format.Parse(text, mc.ModelConfig()) == out


def test_non_engine_models_keep_the_python_backend_on_every_target():
    pre = mc.ModelConfig(name="preprocess", backend="python", max_batch_size=64)
    pre.parameters["max_pixels"].string_value = "16777216"
    for t in preprocess_spec(TINY).outputs:
        pre.output.add(name=t.name, data_type=mc.DataType.Value(f"TYPE_{t.dtype}"), dims=list(t.dims))
    out = render_config(pre, SMALL, "tensorrt")
    assert out.backend == "python" and out.parameters["max_pixels"].string_value == "16777216"
    assert tuple(out.output[0].dims) == (224, 224, 3)


def test_unknown_target_and_tensor_are_refused_with_the_fix():
    with pytest.raises(RenderError, match="choose one of embedded, onnxruntime, tensorrt"):
        render_config(fusion(), TINY, "openvino")
    bad = fusion()
    bad.output[0].name = "LOGITS"
    with pytest.raises(RenderError, match="LOGITS.*io_spec"):
        render_config(bad, TINY, "embedded")


def test_render_repository_refuses_to_overwrite_its_source(tmp_path):
    (tmp_path / "fusion").mkdir()
    (tmp_path / "fusion" / "config.pbtxt").write_text(FUSION_PBTXT)
    with pytest.raises(RenderError, match="--repo"):
        render_repository(tmp_path, TINY, "onnxruntime", source=tmp_path)


def test_render_repository_from_a_fixture_tree(tmp_path):
    src = tmp_path / "src"
    (src / "fusion" / "1").mkdir(parents=True)
    (src / "fusion" / "config.pbtxt").write_text("# Fusion engine.\n" + FUSION_PBTXT)
    (src / "fusion" / "1" / "model.py").write_text("# python backend\n")
    (src / "fusion" / "1" / "model.onnx").write_bytes(b"built artefact")
    written = render_repository(tmp_path / "out", BASE, "onnxruntime", source=src)
    text = written["fusion"].read_text()
    assert text.startswith("# Fusion engine.\n# Rendered by `vtfuse export` for target onnxruntime, preset base")
    assert load_config(written["fusion"]).platform == "onnxruntime_onnx"
    assert sorted(p.name for p in (tmp_path / "out" / "fusion" / "1").iterdir()) == []


# The committed repository (the embedded target) must already be what rendering it for `tiny` gives.
needs_committed = pytest.mark.skipif(not model_dirs(COMMITTED_REPO), reason="model_repository/ has no configs yet")


@needs_committed
def test_committed_configs_are_the_embedded_render_for_tiny():
    assert config_mismatches(COMMITTED_REPO, TINY) == []


@needs_committed
def test_committed_configs_are_not_small_so_small_needs_a_rendered_repository():
    assert set(config_mismatches(COMMITTED_REPO, SMALL)) >= set(ENGINES)
