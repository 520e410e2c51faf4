"""Session fixtures: ONE real tritonserver (and, where used, one Ray Serve app) for the whole run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.triton.launcher import DEFAULT_REPOSITORY, TritonServer, TritonSettings
from tests.helpers import free_port

ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(scope="session")
def triton() -> Iterator[TritonServer]:
    """A real tritonserver on free ports over the built embedded repository; always stopped."""
    repo = Path(os.environ.get("VTFUSE_TEST_REPOSITORY", DEFAULT_REPOSITORY))
    if not (repo / "fusion" / "1" / "model.onnx").exists():
        pytest.fail(f"{repo} is not built: run `make repository` (vtfuse export all --target embedded) first")
    settings = TritonSettings(
        repository=repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), exit_timeout_s=10
    )
    server = TritonServer(settings, log_path=ARTIFACTS / "tritonserver.log")
    server.start()
    try:
        server.wait_ready(timeout=240)
        yield server
    finally:
        server.stop()
