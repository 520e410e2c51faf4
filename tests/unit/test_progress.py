"""serving.progress: plain lines for logs, tqdm on a terminal, nothing when off."""

from __future__ import annotations

import io

import pytest

from serving import progress


def test_plain_lines_when_not_a_terminal(monkeypatch):
    monkeypatch.delenv("VTFUSE_PROGRESS", raising=False)
    out = io.StringIO()
    steps = progress.Steps(10, "train", unit="step", interval_s=0.0, stream=out)
    assert steps.mode == "plain"
    steps.update(3, loss=1.23456)
    steps.update(2)
    steps.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("train: 3/10 (30%)") and "step/s" in lines[0] and "ETA" in lines[0]
    assert "loss=1.235" in lines[0]
    assert lines[-1].startswith("train: 5/10 (50%)") and lines[-1].endswith("(done)")


def test_a_stage_says_started_and_done_or_failed(monkeypatch):
    monkeypatch.delenv("VTFUSE_PROGRESS", raising=False)
    out = io.StringIO()
    with progress.stage("export onnx", stream=out):
        pass
    with pytest.raises(RuntimeError), progress.stage("export check", stream=out):
        raise RuntimeError("boom")
    lines = out.getvalue().splitlines()
    assert lines[0] == "export onnx: started" and lines[1].startswith("export onnx: done in ")
    assert lines[2] == "export check: started" and lines[3].startswith("export check: failed in ")


def test_tqdm_on_a_terminal_and_silence_when_off(monkeypatch):
    monkeypatch.setenv("VTFUSE_PROGRESS", "bar")
    out = io.StringIO()
    with progress.Steps(4, "bench", stream=out) as steps:
        steps.update(4)
    assert "4/4" in out.getvalue() and "bench" in out.getvalue()
    monkeypatch.setenv("VTFUSE_PROGRESS", "off")
    quiet = io.StringIO()
    with progress.Steps(4, "bench", stream=quiet) as steps, progress.stage("x", stream=quiet):
        steps.update(4)
    assert quiet.getvalue() == ""
