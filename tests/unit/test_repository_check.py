"""A built repository of any target is served as it is; an incomplete one is refused; make never exports into it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from serving.triton.repository import missing_artefacts

ROOT = Path(__file__).resolve().parents[2]


def _model(repo: Path, name: str, config: str, files: dict[str, str]) -> None:
    (repo / name).mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(config)
    for rel, text in files.items():
        (repo / name / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / name / rel).write_text(text)


@pytest.fixture
def torch_like(tmp_path: Path) -> Path:
    """A repository as `--target torch` / `libtorch` / `onnxruntime` build them: no embedded model.onnx anywhere."""
    repo = tmp_path / "repo"
    _model(repo, "fusion", 'name: "fusion"\nbackend: "python"\n', {"1/model.py": "", "1/manifest.json": "{}"})
    _model(repo, "image_encoder", 'name: "image_encoder"\nplatform: "ensemble"\n', {})
    _model(repo, "image_encoder_libtorch", 'name: "image_encoder_libtorch"\nplatform: "pytorch_libtorch"\n',
           {"1/model.pt": "x"})
    _model(repo, "text_encoder", 'name: "text_encoder"\nbackend: "onnxruntime"\n', {"1/model.onnx": "x"})
    return repo


def test_a_built_repository_of_another_target_is_complete(torch_like):
    assert missing_artefacts(torch_like) == []


def test_what_an_incomplete_repository_lacks_is_named(torch_like):
    (torch_like / "fusion" / "1" / "manifest.json").unlink()
    (torch_like / "text_encoder" / "1" / "model.onnx").unlink()
    assert missing_artefacts(torch_like) == [
        "fusion: no version folder with manifest.json (not installed)",
        "text_encoder: no version folder with model.onnx",
    ]
    assert missing_artefacts(torch_like / "nowhere") == [f"{torch_like / 'nowhere'} is not a folder"]


def test_the_built_committed_repository_is_complete():
    if not (ROOT / "model_repository" / "fusion" / "1" / "manifest.json").exists():
        pytest.fail("model_repository is not built: `make repository` first")
    assert missing_artefacts(ROOT / "model_repository") == []


def _make(target: str, repository: Path, dry: bool = False) -> subprocess.CompletedProcess:
    cmd = ["make", "-s", *(["-n"] if dry else []), target, f"REPOSITORY={repository}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_make_serves_another_built_repository_as_it_is(torch_like):
    before = sorted(p.relative_to(torch_like) for p in torch_like.rglob("*"))
    plan = _make("triton", torch_like, dry=True)
    assert plan.returncode == 0, plan.stderr
    assert "export all" not in plan.stdout and "serving.triton.repository" in plan.stdout
    done = _make("repository", torch_like)
    assert done.returncode == 0, done.stderr
    assert sorted(p.relative_to(torch_like) for p in torch_like.rglob("*")) == before  # nothing written into it


def test_make_refuses_an_incomplete_repository_saying_what_is_missing(torch_like, tmp_path):
    shutil.rmtree(torch_like / "fusion" / "1")
    done = _make("repository", torch_like)
    assert done.returncode != 0
    assert "is not a built model repository: fusion: no version folder with manifest.json" in done.stderr
    assert not (torch_like / "fusion" / "1").exists()
