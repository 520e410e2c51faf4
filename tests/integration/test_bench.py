"""The load tools end to end against real servers, and `make bench QUICK=1`: they run and write valid JSON.

No speed is asserted anywhere: figures are benchmarks, not tests.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests import servers
from serving.model.checkpoint import REPO_ROOT

pytestmark = pytest.mark.integration

SUMMARY_KEYS = (
    "engine_efficiency", "served_over_engine_grpc", "served_over_engine_http", "vs_naive_http_tiny",
    "vs_naive_http_small", "grpc_raw_over_naive_http_tiny", "int8_gain_small", "repeat_image_speedup_small",
    "avg_batch_c32", "batching_speedup_tiny", "retrieve64_over_vqa1", "repeat_image_speedup_blip",
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def test_grpc_driver_open_loop_writes_its_json(triton, tmp_path):
    out = tmp_path / "open.json"
    r = subprocess.run(
        [sys.executable, "-m", "loadtests.grpc_driver", "--url", triton.url_grpc, "--rate", "20", "--duration", "2",
         "--warmup", "0.5", "--samples", "8", "--metrics-url", triton.url_metrics, "--out", str(out)],
        cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["mode"] == "open" and data["rate"] == 20
    assert data["completed"] > 0 and data["error_count"] == 0
    assert data["p50_ms"] <= data["p99_ms"]
    assert data["extra"]["triton_batches"]["models"]["vqa"]["inference_count"] >= data["completed"]


def test_locust_mix_against_the_naive_server_writes_its_json(tmp_path):
    out = tmp_path / "locust.json"
    with servers.baseline("tiny", workers=1) as b:
        r = subprocess.run(
            [sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py", "--headless", "-u", "4", "-r", "4",
             "-t", "4s", "-H", b.url, "--vtfuse-json", str(out), "--only-summary", "--skip-log-setup"],
            cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=120,
        )
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["endpoints"]) == {"/v1/vqa", "/v1/match", "/v1/retrieve", "/v1/embed"}
    assert data["total"]["requests"] > 0 and data["total"]["failures"] == 0, data["errors"]


@pytest.mark.timeout(900)  # ~6 min: every stage at 3 s windows, the BLIP repeat on a tiny import
def test_make_bench_quick_runs_end_to_end(tmp_path):
    out = tmp_path / "bench"
    # Its own process group: whatever happens here, no bench server outlives the test (and loads the next one).
    proc = subprocess.Popen(["make", "bench", "QUICK=1", f"BENCH_OUT={out}"], cwd=REPO_ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=840)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, (stdout[-3000:], stderr[-3000:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quick"] is True and summary["errors"] == {}
    for key in SUMMARY_KEYS:
        v = summary[key]
        assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, (key, v)
    assert summary["machine"]["cores"] >= 1 and summary["versions"]["onnxruntime"] != "absent"
    assert summary["commit"]
    # step 7: one paired round (public HTTP API and naive server back to back) gives vs_naive_http_tiny
    [paired] = summary["vs_naive_http_tiny_detail"]["paired"]
    assert paired["ratio"] == summary["vs_naive_http_tiny"] and paired["first"] == "serve" and paired["kept"]
    assert paired["naive_fp32_rps"] > 0 and paired["naive_int8_rps"] > 0  # both naive servers, the faster divides
    # step 7b: the same comparison with wrk and with PNG renders; every answer of the Python driver right
    rows = summary["details"]["traffic_tiny"]["rows"]
    assert [(r["driver"], r["images"]) for r in rows] == [("aiohttp", "bench"), ("wrk", "bench"),
                                                          ("aiohttp", "png96-256")]
    for r in rows:
        for side, got in r["answers_right"].items():
            right, checked = map(int, got.split("/"))
            assert checked > 0 and right == checked, (r, side)
    # the summary comes back from the run's files alone
    again = tmp_path / "again.json"
    r = subprocess.run([sys.executable, "-m", "loadtests.report", "--from-runs", str(out), "--out", str(again)],
                       cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(again.read_text()) == summary
    assert summary["vs_naive_http_tiny_detail"]["sequential"]["value"] > 0
    # ... and, its engines timed first (tiny stands in for small), served_over_engine_http
    soe = summary["details"]["served_over_engine_http"]
    [paired] = soe["paired"]
    assert paired["ratio"] == summary["served_over_engine_http"] and paired["engines"] == "first"
    assert soe["engines_avg_batch"] >= 1 and soe["sequential"]["value"] > 0
    assert set(json.loads((out / "engine-paired.json").read_text())) == {"paired_engine_tiny_r0"}
    for name in summary["runs"]:
        run = json.loads((out / "runs" / f"{name}.json").read_text())
        assert run["completed"] > 0 and run["error_count"] == 0, (name, run["errors"])
    for png in ("throughput_vs_concurrency.png", "latency_cdf_c32.png", "engine_items_per_batch.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Path(out / "engine-small.json").exists() and Path(out / "ceiling_flops.json").exists()
    # The shipped engines are int8: efficiency is reported against both ceilings, from both precisions.
    assert json.loads((out / "engine-small.json").read_text())["precision"] == "int8"
    assert json.loads((out / "engine-small-fp32.json").read_text())["precision"] == "fp32"
    assert summary["engine_efficiency_int8"] > 0
    assert "ceiling_int8" in json.loads((out / "ceiling_flops.json").read_text())
    assert summary["serve_composition"] == {
        "front": "haproxy", "preprocess": "inline", "ingress_replicas": 2, "server_vqa": "vqa"}


def test_wrk_and_the_python_driver_measure_the_same_naive_server(tmp_path):
    """The second, compiled load generator runs the same bodies against the naive server (both workers busy)."""
    import shutil

    from loadtests import wrk_driver
    from loadtests.census import CpuCensus
    from loadtests.common import _descendants, _proc_table, make_corpus

    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (.ci/run installs Debian's wrk)")
    corpus = make_corpus(8, seed=3)
    with servers.baseline("tiny", workers=2) as b:
        ours = _descendants(_proc_table(), b.process.pid)
        census = CpuCensus()
        census.start()
        res = wrk_driver.drive(b.url, corpus, concurrency=8, duration_s=3, warmup_s=1, threads=2)
        cpu = census.stop()
    assert res.completed > 0 and res.errors == {}, res.errors
    assert 0 < res.p50_ms <= res.p99_ms and res.extra["client_cpu_s"] > 0
    # both of this server's workers got connections: the kernel spread them (SO_REUSEPORT), none sat idle
    workers = [p for p in cpu["processes"] if p["pid"] in ours and p["label"] == "naive server" and p["cpu_s"] > 0.3]
    assert len(workers) == 2, cpu["processes"]
