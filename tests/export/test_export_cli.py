"""`vtfuse export ...` as a user runs it: exit codes, JSON on stdout, the SKIP reason on stderr."""

from __future__ import annotations

import argparse
import json

import pytest

from export.cli import EXIT_FAILED, EXIT_OK, EXIT_SKIPPED, register
from export.engine import availability
from export.errors import EngineUnavailable
from export.render_repo import load_config


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vtfuse")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def tensorrt_missing() -> bool:
    try:
        availability()
    except EngineUnavailable:
        return True
    return False


def test_export_all_onnxruntime_builds_a_repository(tmp_path, source_repo, capsys):
    code = run(
        ["export", "all", "--target", "onnxruntime", "--checkpoint", "random:tiny", "--threads", "1",
         "--onnx-dir", str(tmp_path / "onnx"), "--repo", str(tmp_path / "repo"), "--source-repo", str(source_repo)]
    )  # fmt: skip
    assert code == EXIT_OK
    out = json.loads(capsys.readouterr().out)
    assert out["check"]["ok"] is True
    assert "skipped" in out["engine"]
    models = ["caption", "fusion", "image_encoder", "preprocess", "text_encoder", "vqa", "vtfuse_catalog"]
    assert sorted(out["install"]["models"]) == models
    assert load_config(tmp_path / "repo" / "fusion" / "config.pbtxt").platform == "onnxruntime_onnx"
    assert (tmp_path / "repo" / "fusion" / "1" / "model.onnx").exists()


@pytest.mark.skipif(not tensorrt_missing(), reason="TensorRT is installed here: nothing to skip")
def test_export_all_tensorrt_without_tensorrt_exits_3_with_the_reason(tmp_path, source_repo, capsys):
    code = run(
        ["export", "all", "--target", "tensorrt", "--checkpoint", "random:tiny", "--threads", "1",
         "--onnx-dir", str(tmp_path / "onnx"), "--repo", str(tmp_path / "repo"), "--source-repo", str(source_repo)]
    )  # fmt: skip
    assert code == EXIT_SKIPPED
    captured = capsys.readouterr()
    assert "SKIP engine: tensorrt is not installed" in captured.err
    assert "skipped" in json.loads(captured.out)["engine"]
    assert not (tmp_path / "repo").exists()


@pytest.mark.skipif(not tensorrt_missing(), reason="TensorRT is installed here: nothing to skip")
def test_export_engine_alone_exits_3(tmp_path, capsys):
    assert run(["export", "engine", "--onnx-dir", str(tmp_path)]) == EXIT_SKIPPED
    assert "SKIP engine" in capsys.readouterr().err


def test_install_before_export_fails_naming_the_command(tmp_path, capsys):
    assert run(["export", "install", "--onnx-dir", str(tmp_path), "--repo", str(tmp_path / "r")]) == EXIT_FAILED
    assert "vtfuse export onnx" in capsys.readouterr().err


def test_unknown_checkpoint_folder_fails_with_the_fix(tmp_path, capsys):
    assert run(["export", "onnx", "--checkpoint", str(tmp_path), "--onnx-dir", str(tmp_path / "o")]) == EXIT_FAILED
    assert "vtfuse train" in capsys.readouterr().err
