"""Stage 1: the exported graphs pass the checker, carry io_spec's contract, and batch dynamically."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from export.check import FP32_TOLERANCE, compare, ort_session, random_inputs, run_session, torch_outputs
from export.errors import OnnxExportError
from export.onnx_export import read_export_info, sha256_file, verify_graph
from serving.model.io_spec import ENGINES, engine_specs

ONNX_DTYPE = {"UINT8": onnx.TensorProto.UINT8, "INT64": onnx.TensorProto.INT64, "FP32": onnx.TensorProto.FLOAT}


@pytest.mark.parametrize("engine", ENGINES)
def test_graph_passes_checker_with_opset_17_or_later(onnx_dir, engine):
    model = onnx.load(str(onnx_dir / f"{engine}.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17


@pytest.mark.parametrize("engine", ENGINES)
def test_graph_names_dtypes_and_dims_are_io_spec(onnx_dir, tiny, engine):
    model = onnx.load(str(onnx_dir / f"{engine}.onnx"))
    spec = engine_specs(tiny.config)[engine]
    for got, want in ((model.graph.input, spec.inputs), (model.graph.output, spec.outputs)):
        assert [v.name for v in got] == [t.name for t in want]
        for v, t in zip(got, want):
            tt = v.type.tensor_type
            assert tt.elem_type == ONNX_DTYPE[t.dtype], t.name
            assert tt.shape.dim[0].dim_param == "batch", f"{t.name}: batch axis is not dynamic"
            assert tuple(d.dim_value for d in tt.shape.dim[1:]) == t.dims, t.name


def test_image_graph_takes_uint8_nhwc_pixels(onnx_dir, tiny):
    (pixels,) = onnx.load(str(onnx_dir / "image_encoder.onnx")).graph.input
    s = tiny.config.image_size
    assert pixels.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value for d in pixels.type.tensor_type.shape.dim[1:]] == [s, s, 3]


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("engine", ENGINES)
def test_dynamic_batch_matches_pytorch(onnx_dir, tiny, engine, batch):
    spec = engine_specs(tiny.config)[engine]
    feeds = random_inputs(spec, tiny.config, batch, np.random.default_rng(batch))
    got = run_session(ort_session(onnx_dir / f"{engine}.onnx", threads=1), feeds)
    ref = torch_outputs(tiny, engine, feeds)
    for t in spec.outputs:
        assert got[t.name].shape == (batch, *t.dims)
        figures = compare(ref[t.name], got[t.name], FP32_TOLERANCE)
        assert figures["ok"], (engine, t.name, figures)


def test_export_info_records_source_and_file_hashes(onnx_dir, tiny):
    info = read_export_info(onnx_dir)
    assert info["preset"] == "tiny"
    assert info["source"]["source"] == "random:tiny"
    assert len(info["source"]["model_safetensors_sha256"]) == 64
    assert info["settings"]["opset"] >= 17
    for e in ENGINES:
        assert info["files"][e]["sha256"] == sha256_file(onnx_dir / f"{e}.onnx")
    files = sorted(p.name for p in (onnx_dir / "checkpoint").iterdir())
    assert files == ["answers.json", "config.json", "tokenizer.json"]


def test_verify_graph_names_the_tensor_that_breaks_io_spec(onnx_dir, tiny):
    model = onnx.load(str(onnx_dir / "text_encoder.onnx"))
    model.graph.output[1].name = "EMBEDDING"
    with pytest.raises(OnnxExportError, match="TEXT_EMBEDDING"):
        verify_graph(model, engine_specs(tiny.config)["text_encoder"])


def test_missing_export_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="vtfuse export onnx"):
        read_export_info(tmp_path)
