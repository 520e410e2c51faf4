"""`vtfuse export all --target torch`: PyTorch engines in Triton's Python backend, on the real tritonserver.

The repository is rendered and installed by the CLI as a user runs it; a tritonserver of this
module's own serves it (here on the CPU: KIND_AUTO without a GPU). The embedded repository's
`vqa` tests run again on it unchanged (imported below, so they take this module's `triton`),
and the engines are checked against the ONNX engines of the session's server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from serving.model.checkpoint import REPO_ROOT
from serving.triton.launcher import TritonServer
from tests.conftest import ARTIFACTS
from tests.helpers import running_triton

# The embedded repository's answers, batching and bad-input tests, run against the torch target.
from tests.integration.test_triton_vqa import (  # noqa: F401
    grpc_client,
    test_bad_request_in_a_batch_leaves_the_others_answered,
    test_burst_of_256_at_concurrency_32_batches_every_engine,
    test_non_image_bytes_fail_only_their_request,
    test_vqa_over_grpc_answers_fresh_renders,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def torch_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("torch-target")
    repo = root / "model_repository-torch"
    cmd = [sys.executable, "-m", "serving.cli", "export", "all", "--target", "torch", "--checkpoint", "tiny",
           "--onnx-dir", str(root / "onnx"), "--repo", str(repo)]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["install"]["target"] == "torch"
    return repo


@pytest.fixture(scope="module")
def triton(torch_repository: Path) -> Iterator[TritonServer]:
    with running_triton(torch_repository, ARTIFACTS / "tritonserver-torch-target.log") as server:
        yield server  # type: ignore[misc]


def _config(repo: Path, model: str) -> mc.ModelConfig:
    return text_format.Parse((repo / model / "config.pbtxt").read_text(), mc.ModelConfig())


@pytest.mark.parametrize("engine", ["image_encoder", "text_encoder", "fusion"])
def test_engine_configs_are_pytorch_python_models(torch_repository, engine):
    config = _config(torch_repository, engine)
    assert config.backend == "python"
    assert config.max_batch_size == 256
    assert list(config.dynamic_batching.preferred_batch_size) == []
    assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_AUTO]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["autocast"] == "fp16" and params["mode"] == "cuda_graphs"
    assert params["FORCE_CPU_ONLY_INPUT_TENSORS"] == "no"
    vdir = torch_repository / engine / "1"
    assert "TorchEngineModel" in (vdir / "model.py").read_text()
    assert not (vdir / "model.onnx").exists()
    manifest = json.loads((vdir / "manifest.json").read_text())
    assert "checkpoint/model.safetensors" in manifest["artefacts"]
    parity = manifest["torch"]["parity"]
    assert parity["ok"] and all(f["ok"] for outs in parity["cpu_fp32"]["engines"].values() for f in outs.values())
    assert _config(torch_repository, "vqa").parameters["engine_max_batch"].string_value == "256"


def _fusion_feeds(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    mask = (np.arange(24)[None, :] < rng.integers(3, 25, size=(n, 1))).astype(np.int64)
    return {
        "IMAGE_FEATURES": rng.standard_normal((n, 64, 144)).astype(np.float32),
        "TEXT_FEATURES": rng.standard_normal((n, 24, 144)).astype(np.float32),
        "ATTENTION_MASK": mask,
    }


def _grpc_inputs(feeds: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    out = []
    for name, value in feeds.items():
        t = grpcclient.InferInput(name, list(value.shape), "INT64" if value.dtype == np.int64 else "FP32")
        t.set_data_from_numpy(value)
        out.append(t)
    return out


def test_fusion_matches_the_onnx_engine_with_and_without_attention(triton, torch_repository):
    """The fused-attention path (no CROSS_ATTENTION asked) and the weights path agree with the fp32 ONNX engine."""
    import onnxruntime as ort

    feeds = _fusion_feeds(np.random.default_rng(3), 6)
    onnx_file = torch_repository.parent / "onnx" / "fusion.onnx"
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    ref = dict(zip(names, sess.run(names, feeds)))
    c = grpcclient.InferenceServerClient(triton.url_grpc)
    full = c.infer("fusion", _grpc_inputs(feeds), outputs=[grpcclient.InferRequestedOutput(n) for n in names])
    fast = c.infer("fusion", _grpc_inputs(feeds), outputs=[grpcclient.InferRequestedOutput("VQA_LOGITS")])
    for name in names:
        np.testing.assert_allclose(full.as_numpy(name), ref[name], atol=1e-4)
    np.testing.assert_allclose(fast.as_numpy("VQA_LOGITS"), ref["VQA_LOGITS"], atol=1e-4)
    assert fast.as_numpy("CROSS_ATTENTION") is None


def test_token_ids_outside_the_vocabulary_fail_their_request_only(triton):
    c = grpcclient.InferenceServerClient(triton.url_grpc)
    inputs = _grpc_inputs({"INPUT_IDS": np.full((1, 24), 10**9, dtype=np.int64),
                           "ATTENTION_MASK": np.ones((1, 24), dtype=np.int64)})
    with pytest.raises(InferenceServerException, match="refused this request's values"):
        c.infer("text_encoder", inputs)
    assert c.is_server_ready()
