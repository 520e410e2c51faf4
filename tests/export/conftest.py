"""Export test fixtures: a seeded random `tiny` exported once per session, and a copy of the repository."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from export.check import check_parity, write_report
from export.onnx_export import export_onnx, load_source
from export.quantize import quantize
from export.render_repo import BUILT_ARTEFACTS, COMMITTED_REPO, model_dirs
from serving.model.checkpoint import Checkpoint

# Random weights, not the shipped checkpoint: these tests must not depend on training.
SOURCE = "random:tiny"


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    """Small inputs, two threads at most: the machine runs other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny() -> Checkpoint:
    return load_source(SOURCE)


@pytest.fixture(scope="session")
def onnx_dir(tiny: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stages 1, 2 and 2b run once: ONNX files, export.json, checkpoint/, parity.json, int8/."""
    out = tmp_path_factory.mktemp("onnx")
    export_onnx(tiny, out, source=SOURCE)
    write_report(check_parity(tiny, out, threads=1), out)
    quantize(out, n=50, threads=1)
    return out


@pytest.fixture
def source_repo(tmp_path: Path) -> Path:
    """A copy of the committed model_repository/ without built artefacts (tests never write into it)."""
    if not model_dirs(COMMITTED_REPO):
        pytest.skip(f"{COMMITTED_REPO} has no config.pbtxt files yet")
    dest = tmp_path / "model_repository"
    shutil.copytree(COMMITTED_REPO, dest, ignore=shutil.ignore_patterns(*BUILT_ARTEFACTS, "*.pyc"))
    return dest
