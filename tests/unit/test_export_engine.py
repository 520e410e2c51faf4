"""Stage 3 without a GPU: batch profiles, the plan cache key, and a clear SKIP where TensorRT is missing."""

from __future__ import annotations

import builtins

import pytest

from export.engine import (
    BatchProfile,
    availability,
    batch_profile,
    build_engines,
    cache_dir,
    plan_name,
    profile_from_config,
)
from export.errors import EngineBuildError, EngineUnavailable
from export.render_repo import COMMITTED_REPO, model_dirs
from serving.model.io_spec import ENGINES


def test_profile_opt_is_the_largest_preferred_batch_that_fits():
    assert batch_profile(64, [16, 32]) == BatchProfile(1, 32, 64)
    assert batch_profile(64, [16, 128]) == BatchProfile(1, 16, 64)


def test_profile_opt_is_half_the_max_without_preferred_sizes():
    assert batch_profile(64) == BatchProfile(1, 32, 64)
    assert batch_profile(1) == BatchProfile(1, 1, 1)
    with pytest.raises(EngineBuildError, match="max_batch_size >= 1"):
        batch_profile(0)


@pytest.mark.skipif(not model_dirs(COMMITTED_REPO), reason="model_repository/ has no configs yet")
@pytest.mark.parametrize("engine", ENGINES)
def test_profile_comes_from_the_committed_config(engine):
    p = profile_from_config(COMMITTED_REPO / engine / "config.pbtxt")
    assert p.min == 1 and 1 <= p.opt <= p.max and p.max > 1


def test_cache_key_names_gpu_tensorrt_onnx_and_profile(tmp_path):
    d = cache_dir(tmp_path, "NVIDIA H100 80GB HBM3", "10.3.0.26")
    assert d == tmp_path / "nvidia-h100-80gb-hbm3-trt10.3.0.26"
    name = plan_name("fusion", "ab" * 32, BatchProfile(1, 32, 64), fp16=True)
    assert name == f"fusion-{'ab' * 8}-b1-32-64-fp16.plan"
    assert plan_name("fusion", "ab" * 32, BatchProfile(1, 32, 64), fp16=False).endswith("b1-32-64.plan")


def test_missing_tensorrt_is_a_skip_that_names_the_fix(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_tensorrt(name, *args, **kwargs):
        if name == "tensorrt":
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorrt)
    with pytest.raises(EngineUnavailable, match="tensorrt is not installed.*TensorRT 10.*NVIDIA GPU"):
        availability()
    (tmp_path / "checkpoint").mkdir()
    with pytest.raises(EngineUnavailable):
        build_engines(tmp_path)
    assert not (tmp_path / "engines.json").exists()
