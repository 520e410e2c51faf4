"""The load tools without servers: loops, statistics, FLOP counting, metrics deltas, config variants, summary, tune."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from loadtests import flops, grpc_driver, http_driver, report, servers
from loadtests.bench import BenchSettings
from loadtests.common import RunResult, make_corpus, summarize, write_json
from loadtests.loops import closed_loop, open_loop
from loadtests.tune import Candidate, grid, parse_preferred, pick_best
from serving.triton.model_config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_corpus_has_varied_sizes_and_decodable_images():
    corpus = make_corpus(32, seed=3)
    sides = {s.side for s in corpus}
    assert len(sides) >= 3
    assert {s.fmt for s in corpus} == {"PNG", "JPEG"}
    for s in corpus[:8]:
        img = Image.open(io.BytesIO(base64.b64decode(s.image_b64)))
        assert img.size == (s.side, s.side)
        assert s.question and s.answer and len(s.captions) == 8


def test_closed_loop_counts_successes_and_errors_in_the_window():
    async def call(i: int) -> int:
        await asyncio.sleep(0.002)
        if i % 3 == 0:
            raise ConnectionError("refused")
        return 1

    res = asyncio.run(closed_loop(call, concurrency=4, duration_s=0.5, warmup_s=0.1, name="fake"))
    assert res.mode == "closed" and res.concurrency == 4
    assert res.completed > 20
    assert res.errors.get("ConnectionError", 0) > 5
    assert res.throughput_rps == pytest.approx(res.completed / res.duration_s)
    assert res.p50_ms <= res.p90_ms <= res.p99_ms <= res.max_ms
    assert res.latencies_ms == sorted(res.latencies_ms)


def test_open_loop_reports_overflow_when_the_server_stalls():
    async def slow(i: int) -> int:
        await asyncio.sleep(0.3)
        return 1

    res = asyncio.run(open_loop(slow, rate=200, duration_s=0.4, warmup_s=0.0, max_inflight=2, drain_s=2))
    assert res.mode == "open" and res.rate == 200
    assert res.errors.get("client_overflow", 0) > 10
    assert res.completed <= 4


def test_open_loop_times_from_the_scheduled_arrival():
    async def fast(i: int) -> int:
        await asyncio.sleep(0.001)
        return 2

    res = asyncio.run(open_loop(fast, rate=300, duration_s=0.5, warmup_s=0.1))
    assert res.completed > 50 and not res.errors
    assert res.items == 2 * res.completed
    assert res.p50_ms >= 1.0


def test_summarize_of_no_requests_is_nan_and_json_writes_null(tmp_path):
    from collections import Counter

    res = summarize("none", "closed", [], Counter({"http_503": 3}), 2.0, concurrency=8)
    assert res.completed == 0 and res.error_count == 3 and np.isnan(res.p99_ms)
    data = json.loads(write_json(tmp_path / "r.json", res).read_text())
    assert data["p99_ms"] is None and data["errors"] == {"http_503": 3}


def _synthetic_graph(path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])
    w = helper.make_tensor("w", TensorProto.FLOAT, [5, 3, 3, 3], np.zeros(135, np.float32).tolist())
    m = helper.make_tensor("m", TensorProto.FLOAT, [8, 4], np.zeros(32, np.float32).tolist())
    g = helper.make_tensor("g", TensorProto.FLOAT, [2, 5 * 8 * 4], np.zeros(320, np.float32).tolist())
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 5 * 8 * 4])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),  # (B, 5, 8, 8): 320 outputs × 27 MACs
        helper.make_node("MatMul", ["c", "m"], ["mm"]),  # (B, 5, 8, 4): 160 outputs × 8 MACs
        helper.make_node("Reshape", ["mm", "shape"], ["flat"]),  # (B, 160)
        helper.make_node("Gemm", ["flat", "g"], ["y"], transB=1),  # (B, 2): 2 outputs × 160 MACs
    ]
    graph = helper.make_graph(nodes, "g", [x], [y], [w, m, g, shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_flops_count_matmul_gemm_conv_from_the_graph(tmp_path):
    _synthetic_graph(tmp_path / "g.onnx")
    r = flops.count_graph(tmp_path / "g.onnx")
    assert r["macs"] == {"Conv": 320 * 27, "MatMul": 160 * 8, "MatMulInteger": 0, "Gemm": 2 * 160}
    assert r["flops_per_item"] == 2 * (320 * 27 + 160 * 8 + 2 * 160)
    assert r["nodes_without_shapes"] == []


def test_int8_graphs_count_the_same_flops_as_fp32(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _synthetic_graph(tmp_path / "g.onnx")
    quantize_dynamic(tmp_path / "g.onnx", tmp_path / "q.onnx", weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul", "Gemm"])
    r = flops.count_graph(tmp_path / "q.onnx")
    # The quantizer turns both the MatMul and the Gemm into MatMulInteger.
    assert r["macs"]["MatMulInteger"] == 160 * 8 + 2 * 160 and r["macs"]["MatMul"] == r["macs"]["Gemm"] == 0
    assert r["flops_per_item"] == flops.count_graph(tmp_path / "g.onnx")["flops_per_item"]


def test_flops_of_the_committed_tiny_engines_match_the_architecture():
    try:
        paths = flops.repository_onnx(REPO / "model_repository")
    except FileNotFoundError:
        pytest.skip("model_repository is not built")
    r = flops.count_item(paths)
    assert all(not e["nodes_without_shapes"] for e in r["engines"].values())
    # tiny: ~0.1 GFLOP per item; the conv stem and all attention matmuls included.
    assert 5e7 < r["flops_per_item"] < 5e8


METRICS_BEFORE = """# HELP nv_inference_count x
nv_inference_count{model="fusion",version="1"} 100
nv_inference_exec_count{model="fusion",version="1"} 10
nv_inference_count{model="image_encoder",version="1"} 100
nv_inference_exec_count{model="image_encoder",version="1"} 10
nv_inference_count{model="vqa",version="1"} 100
nv_inference_exec_count{model="vqa",version="1"} 50
"""
METRICS_AFTER = """nv_inference_count{model="fusion",version="1"} 420
nv_inference_exec_count{model="fusion",version="1"} 30
nv_inference_count{model="image_encoder",version="1"} 420
nv_inference_exec_count{model="image_encoder",version="1"} 50
nv_inference_count{model="vqa",version="1"} 420
nv_inference_exec_count{model="vqa",version="1"} 70
"""


def test_batch_delta_is_items_over_executions_between_scrapes():
    d = grpc_driver.batch_delta(METRICS_BEFORE, METRICS_AFTER)
    assert d["models"]["fusion"]["avg_batch"] == pytest.approx(16.0)
    assert d["models"]["image_encoder"]["avg_batch"] == pytest.approx(8.0)
    assert d["models"]["vqa"]["avg_batch"] == pytest.approx(16.0)
    assert d["engines_avg_batch"] == pytest.approx(640 / 60)


def test_no_batching_variant_keeps_everything_but_dynamic_batching(tmp_path):
    src = tmp_path / "src"
    for cfg in (REPO / "model_repository").glob("*/config.pbtxt"):
        (src / cfg.parent.name / "1").mkdir(parents=True)
        shutil.copy(cfg, src / cfg.parent.name / "config.pbtxt")
    (src / "fusion" / "1" / "model.onnx").write_bytes(b"onnx")
    dest = servers.variant_repository(src, tmp_path / "dest", servers.no_dynamic_batching)
    for cfg in src.glob("*/config.pbtxt"):
        before, after = load_config(cfg), load_config(dest / cfg.parent.name)
        assert not after.HasField("dynamic_batching")
        before.ClearField("dynamic_batching")
        assert after == before
    assert (dest / "fusion" / "1" / "model.onnx").is_symlink()


def test_engine_settings_edit_touches_only_the_engines(tmp_path):
    edit = servers.engine_settings(threads=2, instances=2)
    for name in ("fusion", "vqa"):
        config = load_config(REPO / "model_repository" / name)
        before = load_config(REPO / "model_repository" / name)
        edit(name, config)
        if name == "vqa":
            assert config == before
        else:
            assert config.parameters["intra_op_threads"].string_value == "2"
            assert config.instance_group[0].count == 2


def test_http_bodies_follow_the_public_api():
    corpus = make_corpus(4)
    path, bodies, items = http_driver.bodies(corpus, "vqa")
    assert path == "/v1/vqa" and items == 1
    b = json.loads(bodies[0])
    assert b["questions"] == [corpus[0].question] and base64.b64decode(b["image"]) == corpus[0].image
    path, bodies, items = http_driver.bodies(corpus, "retrieve64", model="small")
    b = json.loads(bodies[1])
    assert path == "/v1/retrieve" and items == 64 and len(b["texts"]) == 64 and b["model"] == "small"


def _run(name: str, rps: float, p99: float, avg_batch: float | None = None, mode: str = "closed") -> RunResult:
    r = RunResult(name, mode, 32, 0.0, 10.0, int(rps * 10), int(rps * 10), {}, rps, rps, p99 / 2, p99 * 0.8, p99,
                  p99 / 2, p99 * 1.2)
    if avg_batch is not None:
        r.extra["triton_batches"] = {"engines_avg_batch": avg_batch, "models": {}}
    return r


def test_summary_computes_every_ratio_from_the_raw_figures():
    runs = {r.name: r for r in [
        _run("triton-grpc-tiny-c32", 1000, 50, avg_batch=12.0),
        _run("triton-grpc-tiny-nobatch-c32", 400, 120),
        _run("naive-fp32-tiny-c32", 250, 200),
        _run("naive-int8-tiny-c32", 200, 260),  # slower than fp32: not the one divided by
        _run("serve-http-tiny-c32", 300, 180, avg_batch=6.0),
        _run("serve-http-tiny-vqa1-c1", 50, 25),
        _run("serve-http-tiny-retrieve64-c1", 20, 60),
        _run("triton-grpc-small-c32", 18, 2000, avg_batch=30.0),
        _run("serve-http-small-c32", 16, 2500, avg_batch=20.0),
        _run("naive-fp32-small-c32", 8, 5000),
        _run("naive-int8-small-c32", 10, 4000),  # faster than fp32: the one divided by
        _run("triton-grpc-small-int8-c32", 36, 1000),
    ]}
    engine_small = {"rows": [{"batch": 1, "items_per_s": 10.0}, {"batch": 16, "items_per_s": 19.0},
                             {"batch": 32, "items_per_s": 20.0}], "best": {"batch": 32, "items_per_s": 20.0}}
    raw = {"ceiling": {"flops_per_s": 2e11, "best_library": "torch", "threads": 2},
           "flops": {"small": {"flops_per_item": 1e10}}, "engine_small": engine_small}
    raw["repeat_image_small_on"] = {"calls_per_sequence": 8, "median_wall_ms": 100.0,
                                    "sequences": [{"wall_ms": 100.0, "answers": ["red"]}]}
    raw["repeat_image_small_off"] = {"calls_per_sequence": 8, "median_wall_ms": 300.0,
                                     "sequences": [{"wall_ms": 300.0, "answers": ["red"]}]}
    bench = SimpleNamespace(runs=runs, raw=raw, errors={}, s=BenchSettings(duration_s=10, small_duration_s=10,
                                                                            warmup_s=2))
    s = report.summary(bench, 0.0)
    for key in ("engine_efficiency", "served_over_engine_grpc", "served_over_engine_http", "vs_naive_http_tiny",
                "vs_naive_http_small", "grpc_raw_over_naive_http_tiny", "int8_gain_small", "repeat_image_speedup_small",
                "avg_batch_c32", "batching_speedup_tiny", "retrieve64_over_vqa1", "machine", "versions", "commit"):
        assert key in s
    assert s["engine_efficiency"] == pytest.approx(1e10 * 20 / 2e11, abs=1e-4)
    assert s["served_over_engine_grpc"] == pytest.approx(18 / 20, abs=1e-4)  # ÷ the best in-process batch
    assert s["served_over_engine_http"] == pytest.approx(16 / 20, abs=1e-4)
    # beside it, the ratio at the in-process row nearest the batch the engines ran at
    assert s["details"]["served_over_engine_grpc"]["at_engines_batch"] == pytest.approx(18 / 20, abs=1e-4)
    assert s["details"]["served_over_engine_http"]["at_engines_batch"] == pytest.approx(16 / 19, abs=1e-4)
    assert s["engine_efficiency_int8"] is None  # fp32 engines: no int8 ceiling needed
    assert s["offered_load"]["windows_per_c32_run"] == 3
    assert s["grpc_raw_over_naive_http_tiny"] == pytest.approx(4.0)
    detail = dict(s["grpc_raw_over_naive_http_tiny_detail"])
    assert detail.pop("precision") == "fp32 engines ÷ the faster naive server (naive fp32)"
    assert detail.pop("naive_sequential_rps") == {"naive fp32": 250, "naive int8": 200}
    assert detail == pytest.approx(
        {"triton_grpc": 50, "naive": 200, "triton_grpc_p50": 25, "naive_p50": 100, "triton_grpc_rps": 1000,
         "naive_rps": 250, "triton_grpc_errors": 0, "naive_errors": 0})
    assert s["vs_naive_http_small"] == pytest.approx(1.6)  # ÷ the faster naive server: int8's 10 req/s
    assert s["vs_naive_http_small_detail"]["precision"] == "fp32 engines ÷ the faster naive server (naive int8)"
    assert s["vs_naive_http_tiny"] == pytest.approx(1.2)
    assert s["int8_gain_small"] == pytest.approx(36 / 18)  # both through Triton, int8 ÷ fp32
    assert s["repeat_image_speedup_small"] == pytest.approx(3.0)  # cache off ÷ on
    assert s["avg_batch_c32"] == pytest.approx(12.0)
    assert s["batching_speedup_tiny"] == pytest.approx(2.5)
    assert s["retrieve64_over_vqa1"] == pytest.approx(30 / 12.5, abs=1e-4)
    assert s["targets"]["vs_naive_http_small"]["met"] is True and s["targets"]["vs_naive_http_tiny"]["met"] is True
    assert s["traffic"]["vs_naive_http_tiny"].startswith("closed loop, 32 connections, 10 s windows")
    assert s["targets"]["grpc_p99_under_half_naive_http_p99_tiny"]["met"] is True  # 50 ms < 200 ms / 2


def test_served_over_engine_divides_by_the_better_in_process_arrangement():
    served = _run("serve-http-small-c32", 16, 2500, avg_batch=8.0)
    one_set = {"rows": [{"batch": 8, "items_per_s": 18.0}], "best": {"batch": 8, "items_per_s": 18.0},
               "settings": {"intra_threads": 2}}
    two_sets = {"rows": [{"batch": 8, "items_per_s": 20.0}], "best": {"batch": 8, "items_per_s": 20.0},
                "settings": {"intra_threads": 1}, "streams": 2}
    ratio, detail = report._served_over_engine(served, one_set, two_sets)
    assert ratio == pytest.approx(16 / 20, abs=1e-4)
    assert (detail["in_process_streams"], detail["in_process_threads_per_stream"]) == (2, 1)
    assert report._served_over_engine(served, one_set, None)[0] == pytest.approx(16 / 18, abs=1e-4)


def _engines(one: float, two: float) -> dict[str, dict[str, object]]:
    """A paired round's engine window: one set on every core, and two sets at once."""
    return {
        "small": {"rows": [{"batch": 8, "items_per_s": one}], "best": {"batch": 8, "items_per_s": one},
                  "settings": {"intra_threads": 2}},
        "small_instances": {"rows": [{"batch": 1, "items_per_s": two}], "best": {"batch": 1, "items_per_s": two},
                            "settings": {"intra_threads": 1}, "streams": 2},
    }


def test_served_over_engine_http_is_the_median_of_paired_rounds_with_the_sequential_ratio_beside_it():
    runs = {r.name: r for r in [
        _run("serve-http-small-c32", 15, 2500, avg_batch=8.0),  # sequential: 15 / 22 (the step-2 engines)
        _run("paired-serve-small-r0", 16, 2500, avg_batch=8.0),  # ÷ 20 (two sets) = 0.8
        _run("paired-serve-small-r1", 18, 2500, avg_batch=8.0),  # ÷ 20 (one set) = 0.9
        _run("paired-serve-small-r2", 14, 2500, avg_batch=8.0),  # ÷ 20 = 0.7
        # round 3's API window failed: it does not count
    ]}
    raw = {"engine_small": _engines(18.0, 22.0)["small_instances"],
           "paired_engine_small_r0": _engines(18.0, 20.0), "paired_engine_small_r1": _engines(20.0, 19.0),
           "paired_engine_small_r2": _engines(17.0, 20.0), "paired_engine_small_r3": _engines(17.0, 20.0)}
    s = report.summary(SimpleNamespace(runs=runs, raw=raw, errors={}, s=BenchSettings()), 0.0)
    assert s["served_over_engine_http"] == pytest.approx(0.8)  # the median round, not the sequential 15 / 22
    d = s["details"]["served_over_engine_http"]
    assert (d["served_items_per_s"], d["in_process_best_items_per_s"], d["in_process_streams"]) == (16, 20.0, 2)
    assert [(r["round"], r["engines"], r["ratio"], r["in_process_streams"]) for r in d["paired"]] == [
        (0, "first", 0.8, 2), (1, "last", 0.9, 1), (2, "first", 0.7, 2)]
    assert d["sequential"]["value"] == pytest.approx(15 / 22, abs=1e-4)
    text = report.markdown(s)
    assert "median of 3 paired rounds (ratios 0.8, 0.9, 0.7), its round 16.00 ÷ 20.00 items/s" in text
    assert "the sequential windows: 0.682 (15.00 ÷ 22.00 items/s)" in text
    # With no paired engine window, the sweep's windows give the figure.
    s = report.summary(SimpleNamespace(runs=runs, raw={"engine_small": raw["engine_small"]}, errors={},
                                       s=BenchSettings()), 0.0)
    assert s["served_over_engine_http"] == pytest.approx(15 / 22, abs=1e-4)
    assert "paired" not in s["details"]["served_over_engine_http"]


def test_engine_sets_run_at_once_count_every_batch_they_finish():
    from loadtests import engine_bench

    res = engine_bench.sweep(REPO / "model_repository", (2,), dataclasses.replace(engine_bench.IN_PROCESS,
                             intra_threads=1), min_time_s=0.3, passes=1, streams=2)
    row = res["rows"][0]
    assert res["streams"] == 2 and res["settings"]["intra_threads"] == 1
    assert row["reps"] >= 2 and row["items_per_s"] == pytest.approx(2 * 1e3 / row["ms_per_batch"])
    assert engine_bench.served_layout(REPO / "model_repository") == (2, 1)


def test_summary_leaves_a_failed_setup_null():
    bench = SimpleNamespace(runs={}, raw={}, errors={"naive": "boom"},
                            s=BenchSettings.quick_run())
    s = report.summary(bench, 0.0)
    assert s["vs_naive_http_tiny"] is None and s["targets"]["avg_batch_c32"]["met"] is None
    assert s["errors"] == {"naive": "boom"}


def test_tune_candidate_edits_batching_and_instances():
    config = load_config(REPO / "model_repository" / "fusion")
    Candidate(500, (8, 16, 128), 2, threads=2).apply(config)
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]  # 128 > max_batch_size dropped
    assert config.instance_group[0].count == 2
    assert config.parameters["intra_op_threads"].string_value == "2"
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 256  # untouched


def test_tune_grid_and_pick_best_respect_the_budget():
    assert len(grid([0, 1000], [(), (16,)], [1, 2])) == 8
    assert parse_preferred("none") == () and parse_preferred("16,32") == (16, 32)
    rows = [
        {"label": "a", "throughput_rps": 900, "p99_ms": 200, "errors": {}},
        {"label": "b", "throughput_rps": 700, "p99_ms": 90, "errors": {}},
        {"label": "c", "throughput_rps": 800, "p99_ms": 80, "errors": {"grpc_UNAVAILABLE": 2}},
        {"label": "d", "throughput_rps": 600, "p99_ms": 50, "errors": {}},
    ]
    assert pick_best(rows, 100)["label"] == "b"
    assert pick_best(rows, 10) is None


def test_vs_naive_http_is_the_median_of_kept_paired_rounds_against_the_faster_naive_server():
    # Round r: the API, naive fp32, naive int8 (req/s). int8 is the faster naive server (median 200 vs 150).
    windows = {0: (240, 150, 200), 1: (210, 140, 150), 2: (220, 150, 200), 3: (230, 160, 210), 4: (250, 155, 205)}
    runs = {r.name: r for r in [_run("serve-http-tiny-c32", 300, 100), _run("naive-fp32-tiny-c32", 200, 150),
                                _run("naive-int8-tiny-c32", 190, 150)]}  # sequential: 300 ÷ 200 = 1.5
    for r, (serve, fp32, int8) in windows.items():
        for side, rps in (("serve", serve), ("naive-fp32", fp32), ("naive-int8", int8)):
            runs[f"paired-{side}-tiny-r{r}"] = _run(f"paired-{side}-tiny-r{r}", rps, 100)
    # round 1's int8 window (150) strayed from its median (200) by 25 %+: it was run again (205), and kept
    runs["paired-naive-int8-tiny-r1-rerun"] = _run("paired-naive-int8-tiny-r1-rerun", 205, 100)
    runs["paired-serve-tiny-r1-rerun"] = _run("paired-serve-tiny-r1-rerun", 225, 100)
    runs["paired-naive-fp32-tiny-r1-rerun"] = _run("paired-naive-fp32-tiny-r1-rerun", 150, 100)
    # round 4's API window collapsed (100) and stayed off after its re-run (90): left out, not a median's pick
    runs["paired-serve-tiny-r4-rerun"] = _run("paired-serve-tiny-r4-rerun", 90, 100)
    runs["paired-naive-fp32-tiny-r4-rerun"] = _run("paired-naive-fp32-tiny-r4-rerun", 150, 100)
    runs["paired-naive-int8-tiny-r4-rerun"] = _run("paired-naive-int8-tiny-r4-rerun", 200, 100)
    runs["paired-serve-small-r0"] = _run("paired-serve-small-r0", 20, 100)  # its naive windows failed: no round
    runs |= {r.name: r for r in [_run("serve-http-small-c32", 16, 2500), _run("naive-fp32-small-c32", 8, 5000)]}
    s = report.summary(SimpleNamespace(runs=runs, raw={}, errors={}, s=BenchSettings()), 0.0)
    d = s["vs_naive_http_tiny_detail"]
    assert d["baseline"] == "naive int8" and d["baseline_medians_rps"] == {"naive fp32": 150, "naive int8": 202.5}
    # kept rounds 0-3 against int8: 1.2, 1.0976, 1.1, 1.0952 → the lower middle of four is 1.0976 (round 1)
    assert s["vs_naive_http_tiny"] == pytest.approx(225 / 205, abs=1e-4) and d["median_round"] == 1
    assert (d["serve_http_rps"], d["naive_rps"]) == (225, 205)  # the median round's own (re-run) windows
    assert [(r["round"], r["first"], r["rerun"], r["kept"]) for r in d["paired"]] == [
        (0, "serve", False, True), (1, "naive", True, True), (2, "serve", False, True), (3, "naive", False, True),
        (4, "serve", True, False)]
    assert d["left_out"] == [4] and d["sequential"]["value"] == pytest.approx(1.5)
    assert d["precision"] == "fp32 engines ÷ the faster naive server (naive int8)"
    assert s["vs_naive_http_small"] == pytest.approx(2.0)  # no complete round: the sequential windows
    assert "paired" not in s["vs_naive_http_small_detail"]
    text = report.markdown(s)
    assert "median of 4 kept of 5 paired rounds (ratios 1.2, 1.1*, 1.1, 1.1, 0.45* (left out); * re-run)" in text
    assert "naive medians naive fp32 150, naive int8 202 req/s" in text and "the sequential windows: 1.5" in text


def test_summary_json_is_rebuilt_from_the_run_files(tmp_path):
    from loadtests.bench import Bench

    bench = Bench(BenchSettings.quick_run(), tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "stale-window.json").write_text("{}")  # an earlier run's file: the run removes it
    for r in (_run("triton-grpc-tiny-c32", 1000, 50, avg_batch=12.0), _run("naive-fp32-tiny-c32", 250, 200),
              _run("naive-int8-tiny-c32", 260, 190), _run("paired-serve-tiny-r0", 300, 100),
              _run("paired-naive-fp32-tiny-r0", 240, 150), _run("paired-naive-int8-tiny-r0", 250, 150)):
        r.extra["cpu"] = {"window_s": 12.0, "cores": 2, "client_cpu_s": 1.0, "others_cpu_s": 20.0,
                          "by_label": {"triton stub vqa": 5.0, "naive server": 10.0}, "processes": []}
        bench.keep(r, 0.01, 1)
    bench.raw["repeat_image_small_on"] = {"calls_per_sequence": 8, "median_wall_ms": 100.0,
                                          "sequences": [{"wall_ms": 100.0, "answers": ["red"]}]}
    bench.raw["repeat_image_small_off"] = {"calls_per_sequence": 8, "median_wall_ms": 300.0,
                                           "sequences": [{"wall_ms": 300.0, "answers": ["red"]}]}
    for old in bench.runs_dir.glob("stale-*.json"):  # as Bench.run does first
        old.unlink()
    written = bench.finish(time.time() - 5)
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(written))
    assert written["vs_naive_http_tiny"] == pytest.approx(1.2)  # ÷ the faster naive window of the round (int8)
    rebuilt = report.from_runs(tmp_path)
    assert json.loads(json.dumps(rebuilt)) == json.loads((tmp_path / "summary.json").read_text())
    # and through the command line, into another file
    out = tmp_path / "again.json"
    assert report.main(["--from-runs", str(tmp_path), "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == json.loads((tmp_path / "summary.json").read_text())


def test_the_committed_summary_is_what_its_run_files_give():
    results = REPO / "loadtests" / "results"
    committed = json.loads((results / "summary.json").read_text())
    assert json.loads(json.dumps(report.from_runs(results))) == committed
    # every run file there is one the summary was computed from
    assert sorted(p.stem for p in (results / "runs").glob("*.json")) == committed["runs"]
