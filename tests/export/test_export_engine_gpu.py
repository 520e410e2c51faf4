"""Stage 3 on a GPU: TensorRT plans of every engine match ONNX Runtime; skipped where TensorRT or a GPU is missing."""

from __future__ import annotations

import json
import shutil

import pytest

from export.engine import availability, build_engines
from export.errors import EngineUnavailable
from serving.model.io_spec import ENGINES


def _skip_reason() -> str | None:
    try:
        availability()
    except EngineUnavailable as e:
        return str(e)
    import torch

    if not torch.cuda.is_available():  # the parity check runs plans on PyTorch's CUDA buffers
        return f"PyTorch {torch.__version__} has no CUDA here: run `make install-gpu`"
    return None


@pytest.mark.gpu
def test_tensorrt_plans_match_onnxruntime_and_are_cached(onnx_dir, source_repo, tmp_path):
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(f"TensorRT plans cannot be built here: {reason}")
    stage = tmp_path / "onnx"
    shutil.copytree(onnx_dir, stage)
    result = build_engines(stage, source_repo=source_repo, cache_root=tmp_path / "cache")  # ParityError on mismatch
    assert sorted(result["engines"]) == sorted(ENGINES)
    for e, entry in result["engines"].items():
        assert entry["profile"]["min"] == 1 and entry["profile"]["max"] > 1, e
        assert set(entry["parity"]) >= {"batch_1", "batch_5"}, e
    assert json.loads((stage / "engines.json").read_text())["gpu"] == result["gpu"]
    again = build_engines(stage, source_repo=source_repo, cache_root=tmp_path / "cache", check=False)
    assert {e: x["plan"] for e, x in again["engines"].items()} == {e: x["plan"] for e, x in result["engines"].items()}
