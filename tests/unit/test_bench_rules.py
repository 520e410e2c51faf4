"""The rules every bench shares: paired rounds (loadtests/rounds.py) and the per-window CPU census."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from loadtests import census, rounds


def test_rounds_reverse_their_order_every_other_round():
    assert [rounds.order(("serve", "naive_fp32", "naive_int8"), r) for r in range(2)] == [
        ("serve", "naive_fp32", "naive_int8"), ("naive_int8", "naive_fp32", "serve")]


def test_a_round_strays_when_any_side_is_over_25_percent_from_its_median():
    rs = [{"served": 1.0, "naive": 1.0}, {"served": 1.1, "naive": 0.9}, {"served": 1.0, "naive": 1.3},
          {"served": 0.7, "naive": 1.0}, {"served": 1.24, "naive": 1.0}]
    # medians: served 1.0, naive 1.0: round 2's naive is 30 % over, round 3's served 30 % under; 1.24 is within
    assert rounds.strayed(rs) == [2, 3]
    assert rounds.strayed(rs, tolerance=0.5) == []
    assert rounds.strayed([]) == []


def test_headline_is_the_median_round_ratio_over_the_kept_rounds():
    rs = [{"round": r, "served": s, "naive": 1.0} for r, s in enumerate([1.5, 1.6, 1.4, 1.55, 3.0])]
    value, which = rounds.headline(rs)
    assert which["left_out"] == [4] and which["kept"] == [0, 1, 2, 3]  # 3.0 strays from the median 1.55
    assert value == 1.5 and which["median_round"] == 0  # an even count: the lower middle, a real round
    value, which = rounds.headline(rs[:3])
    assert value == 1.5 and which["left_out"] == []
    assert rounds.headline([{"round": 0, "served": 1.0, "naive": None}]) == (None, {"kept": [], "left_out": []})


def test_the_ratio_is_against_the_faster_naive_configuration():
    # fp32 is the faster naive server here (median 160 against 130): every ratio divides by it.
    rs = [{"round": r, "serve": s, "fp32": f, "int8": i} for r, (s, f, i) in enumerate(
        [(200, 160, 130), (210, 170, 135), (190, 150, 125), (205, 165, 130), (200, 44, 130)])]
    value, which = rounds.against_faster(rs, "serve", ("int8", "fp32"))
    assert which["baseline"] == "fp32" and which["baseline_medians"] == {"int8": 130, "fp32": 162.5}
    assert which["left_out"] == [4]  # the collapsed fp32 window (44) strays: left out, not absorbed by a median
    assert value == pytest.approx(205 / 165, abs=1e-4) and which["median_round"] == 3  # lower middle of 4
    # A side that strays counts even when it is not the one divided by.
    rs[4] |= {"fp32": 160, "int8": 40}
    assert rounds.against_faster(rs, "serve", ("int8", "fp32"))[1]["left_out"] == [4]
    assert rounds.against_faster([{"round": 0, "serve": 1.0, "fp32": None, "int8": 1.0}], "serve",
                                 ("int8", "fp32"))[0] is None


def test_processes_are_named_by_what_they_run():
    stub = ["/x/triton_python_backend_stub", "/r/blip-cap-base_generate/1/model.py", "vtfuse1", "4194304"]
    assert census.process_label(stub, "triton_python_b") == "triton stub blip-cap-base_generate"
    assert census.process_label(["ray::ServeReplica:vtfuse:Ingress.handle"], "ray::ServeRepli") == \
        "ray::ServeReplica:vtfuse:Ingress"
    assert census.process_label(["/venv/bin/python", "-m", "loadtests.baseline.caption_app"], "python") == "caption_app"
    assert census.process_label(["/venv/bin/python", "-m", "loadtests.baseline", "--port", "1"], "python") == \
        "naive server"
    assert census.process_label(["/venv/bin/python", "-m", "loadtests.baseline.workers",
                                 "loadtests.baseline.app:app"], "python") == "naive server"
    assert census.process_label(["/usr/sbin/haproxy", "-f", "cfg"], "haproxy") == "haproxy"
    assert census.process_label(["wrk", "-t2"], "wrk") == "wrk"
    assert census.process_label([], "kworker") == "kworker"


def test_the_census_counts_a_busy_process_and_the_client_apart():
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<0.8: pass"])
    c = census.CpuCensus()
    c.start()
    x = 0
    for i in range(2_000_000):  # the client's own CPU
        x += i
    busy.wait(timeout=30)
    time.sleep(0.05)
    cpu = c.stop()
    assert cpu["client_cpu_s"] > 0.02 and cpu["cores"] == (os.cpu_count() or 1)
    # the child exited before stop(): its time is gone from /proc (a lower bound, as documented) ...
    assert all(p["pid"] != os.getpid() for p in cpu["processes"])
    live = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<5: pass"])
    try:
        c.start()
        time.sleep(0.6)
        cpu = c.stop()
    finally:
        live.kill()
        live.wait()
    [row] = [p for p in cpu["processes"] if p["pid"] == live.pid]  # ... a live one is counted, by its label
    assert row["cpu_s"] >= 0.2 and row["label"] == "python" and cpu["by_label"]["python"] >= row["cpu_s"]


def test_cpu_per_request_of_labels():
    cpu = {"by_label": {"triton stub vqa": 2.0, "triton stub fusion": 1.0, "haproxy": 0.5}}
    assert census.label_cpu_per_request(cpu, 1000, ("triton stub",)) == 3.0
    assert census.label_cpu_per_request(None, 10, ("x",)) is None


def test_wrk_figures_become_a_run_result():
    from loadtests import wrk_driver

    figures = {"requests": 4100, "duration_us": 20000000, "bytes": 1, "connect": 0, "read": 0, "write": 0,
               "status": 100, "timeout": 2, "p50_us": 120000, "p90_us": 200000, "p99_us": 300000,
               "mean_us": 130000.5, "max_us": 400000}
    out = "Running 20s test\n  2 threads and 32 connections\nWRK_JSON " + json.dumps(figures) + "\n"
    fig = wrk_driver.parse(out)
    r = wrk_driver.to_result(fig, "w", 32, 1, 2)
    # requests answered non-2xx/3xx are errors, not throughput
    assert (r.completed, r.throughput_rps, r.p50_ms, r.p99_ms) == (4000, 200.0, 120.0, 300.0)
    assert r.errors == {"wrk_status": 100, "wrk_timeout": 2} and r.extra["driver"] == "wrk 2 threads (compiled)"
    with pytest.raises(RuntimeError, match="no figures"):
        wrk_driver.parse("Running 1s test\n")
