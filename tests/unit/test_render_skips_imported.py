"""Exporting or rendering the native model leaves imported models' folders alone."""

from __future__ import annotations

import shutil

from export.render_repo import COMMITTED_REPO, model_dirs, render_repository
from serving.families.imported import ImageProcessing, ImportRecord, write_repository_models
from serving.model.config import FusionConfig
from serving.paths import DEFAULT_CHECKPOINT


def _record(name: str) -> ImportRecord:
    return ImportRecord(
        name=name, family="blip_retrieval", architecture="BlipForImageTextRetrieval",
        tasks=("match", "retrieve", "embed"),
        engines={r: f"{name}_{r}" for r in ("image_encoder", "text_encoder", "fusion")},
        precision="fp32", source="/somewhere", image=ImageProcessing(mode="fixed", height=64, width=64),
        max_tokens=48,
    )


def test_model_dirs_and_render_skip_imported_engines(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(COMMITTED_REPO, repo, ignore=shutil.ignore_patterns("[0-9]*", "__pycache__", "*.json"))
    for role in ("image_encoder", "text_encoder", "fusion"):
        d = repo / f"blip_{role}"
        d.mkdir()
        (d / "config.pbtxt").write_text(f'name: "blip_{role}"\nbackend: "python"\n')
    write_repository_models(repo, {"blip": _record("blip")})
    names = [d.name for d in model_dirs(repo)]
    assert names == ["caption", "fusion", "image_encoder", "preprocess", "text_encoder", "vqa", "vtfuse_catalog"]
    out = tmp_path / "rendered"
    render_repository(out, FusionConfig.from_json(DEFAULT_CHECKPOINT / "config.json"), "onnxruntime", source=repo)
    assert sorted(p.name for p in out.iterdir()) == names
    assert (repo / "blip_fusion" / "config.pbtxt").read_text().startswith('name: "blip_fusion"')
