"""summary.json from one bench run: the benchmark ratios, each with the raw figures it is computed from.

Keys (numbers; `null` where a setup failed, the reason under `errors`):

- `engine_efficiency`: `small` in-process ONNX Runtime, fp32 graphs, at its best batch, FLOPs/item ×
  items/s ÷ the measured fp32 matmul FLOP/s; where the served engines are int8,
  `engine_efficiency_int8` holds the same for them against the int8 (MatMulInteger) ceiling;
- `served_over_engine_grpc` / `served_over_engine_http`: `small` items/s through Triton direct
  gRPC / Ray Serve → Triton at c=32 ÷ in-process items/s of the same engines at their best
  batch (the conservative choice; the ratio at the in-process row nearest the batch the engines
  ran at is beside it, `at_engines_batch`), the better of one engine set on every core and as
  many sets at once as Triton runs instances, each with the instances' threads (`engine_small_instances`);
  for `served_over_engine_http`, the median over the paired rounds (bench step 7), whose engine windows
  are timed right next to their API window (`details.served_over_engine_http.paired` lists every round;
  the ratio from the sweep's windows, minutes apart, is `...sequential`, and is the figure where no
  round has both windows);
- `vs_naive_http_tiny`, `vs_naive_http_small`: the public HTTP API (Ray Serve → Triton) ÷ the naive
  server, both HTTP + JSON, the naive server at the precision of the served engines (int8 engines
  against PyTorch's dynamic int8, fp32 against fp32; `..._detail` says which and holds both p99s):
  the median over the paired rounds (bench step 7) of each round's ratio, its two windows adjacent
  (`..._detail.paired` lists every round; `..._detail` holds the median round's figures); the ratio of
  the sequential c=32 windows (measured ~15 minutes apart) is `..._detail.sequential`, and is the
  figure where no round has both windows;
- `grpc_raw_over_naive_http_tiny`: Triton's `vqa` over gRPC (raw image bytes) ÷ the naive server over HTTP +
  JSON, same precision: what a client talking to Triton directly gets, a protocol gain and a server gain
  together (its name says so; it was `vs_naive_grpc_tiny` before 2026-12-06);
- `int8_gain_small`: `small` through Triton direct at c=32, int8 engines ÷ fp32 engines, each with
  the engine threads it measured best with (int8 1 per instance, fp32 2);
- `repeat_image_speedup_small`: 8 one-question /v1/vqa calls in a row about one image, median wall
  time with Triton's response cache off ÷ on (`small` stack; image_encoder runs per 8 calls in
  `details`);
- `details.history`: the earlier ratios (`vs_naive_throughput_tiny`, `..._small_http`, `..._tiny_http`),
  each against the fp32 naive server whatever the served precision, and the first over gRPC: mixed
  comparisons kept to compare with earlier runs;
- `avg_batch_c32`: items ÷ executions over the three engines, Triton direct `tiny` at c=32;
- `batching_speedup_tiny`: Triton direct `tiny` c=32 throughput, dynamic batching on ÷ off;
- `retrieve64_over_vqa1`: median latency of one image × 64 captions through /v1/retrieve ÷ one
  single-question /v1/vqa, both at c=1 through Ray Serve → Triton (`tiny`);
- `caption_vs_naive`, `decode_rows_per_step_c16`, `ttft_*_s_c16`, `tpot_*_ms_c16`, `vqa_gen_8q_over_1q`:
  BLIP-base captioning and generative VQA (loadtests/caption_bench.py, its own summary in `caption/`):
  captions/s at c=16 through /v1/caption ÷ the naive `generate()` server (median of paired rounds),
  Triton's rows per decoder step over those windows, time to first token and per output token of
  streamed captions at c=16, and 8 questions ÷ 1 on one image through /v1/vqa. `make bench` measures
  them last; `python -m loadtests.bench --only caption` measures them alone and puts them into an
  existing summary.json (`caption_detail` says which run they come from);
- `blip_retrieve64_vs_naive`, `blip_retrieve64_all_vs_naive`, `blip_retrieve64_top5_same_order`,
  `blip_retrieve64_top5_overlap`, `blip_retrieve64_top1_agreement`, `blip_match64_before_over_after`,
  `blip_match64_after_mb`, `blip_match64_before_mb`: BLIP-base retrieval (loadtests/blip_bench.py, run on
  its own, its summary in `blip/`): one image × 64 captions through /v1/retrieve with the default
  shortlist (16) and with `shortlist: "all"`, each ÷ the naive server's p50; shortlist 16's top 5
  against the exact ranking (shortlist "all"); /v1/match's Triton calls before and after `NAME_itm`
  (p50 ratio, tensor MB per request). `python -m loadtests.report --blip loadtests/results/blip/summary.json`
  puts them into an existing summary.json (`blip_detail` says which run they come from), and a
  summary that `make bench` writes takes them from `blip/summary.json` of its results folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from loadtests.common import RunResult, git_commit, machine, versions, write_json
from loadtests.engine_bench import at_batch
from loadtests.rounds import STRAY, against_faster

C = 32
TARGETS = {
    "engine_efficiency": (">=", 0.6),
    "served_over_engine_grpc": (">=", 0.85),
    "served_over_engine_http": (">=", 0.8),
    "vs_naive_http_tiny": (">=", 1.2),
    "vs_naive_http_small": (">=", 1.5),
    "grpc_raw_over_naive_http_tiny": (">=", 2.0),
    "repeat_image_speedup_small": (">=", 2.5),
    "repeat_image_speedup_blip": (">=", 2.5),
    "avg_batch_c32": (">=", 8.0),
    "batching_speedup_tiny": (">=", 2.0),
    "retrieve64_over_vqa1": ("<=", 4.0),
    "caption_vs_naive": (">=", 1.6),
    "decode_rows_per_step_c16": (">=", 8.0),
    "vqa_gen_8q_over_1q": ("<=", 3.0),
    "blip_retrieve64_vs_naive": (">=", 5.0),
}
# The figures of loadtests/caption_bench.py's summary that summary.json carries.
CAPTION_KEYS = ("caption_vs_naive", "decode_rows_per_step_c16", "ttft_p50_s_c16", "ttft_p99_s_c16", "tpot_p50_ms_c16",
                "tpot_p99_ms_c16", "vqa_gen_8q_over_1q")
# The figures of loadtests/blip_bench.py's summary that summary.json carries.
BLIP_KEYS = ("blip_retrieve64_vs_naive", "blip_retrieve64_all_vs_naive", "blip_retrieve64_top5_same_order",
             "blip_retrieve64_top5_overlap", "blip_retrieve64_top1_agreement", "blip_match64_before_over_after",
             "blip_match64_after_mb", "blip_match64_before_mb")


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def _run(runs: dict[str, RunResult], name: str) -> RunResult | None:
    r = runs.get(name)
    return r if r is not None and r.completed else None


def _served_over_engine(run: RunResult | None, *engines: dict[str, Any] | None) -> tuple[float | None, dict[str, Any]]:
    """Served items/s ÷ the in-process best of the engines, over every arrangement timed (one set on every
    core; as many sets as Triton runs instances, `streams`)."""
    timed = [e for e in engines if e is not None]
    if run is None or not timed:
        return None, {}
    engine = max(timed, key=lambda e: e["best"]["items_per_s"])
    avg = (run.extra.get("triton_batches") or {}).get("engines_avg_batch") or 1.0
    row = at_batch(engine, avg)
    best = engine["best"]
    return _ratio(run.items_per_s, best["items_per_s"]), {
        "in_process_streams": engine.get("streams", 1),
        "in_process_threads_per_stream": (engine.get("settings") or {}).get("intra_threads"),
        "served_items_per_s": run.items_per_s,
        "run": run.name,
        "in_process_best_batch": best["batch"],
        "in_process_best_items_per_s": best["items_per_s"],
        "engines_avg_batch": avg,
        "in_process_batch_nearest_avg": row["batch"],
        "in_process_items_per_s_nearest_avg": row["items_per_s"],
        "at_engines_batch": _ratio(run.items_per_s, row["items_per_s"]),
    }


def _vs_naive(ours: RunResult | None, naive: RunResult | None, label: str) -> tuple[float | None, dict[str, Any]]:
    if ours is None or naive is None:
        return None, {}
    return _ratio(ours.throughput_rps, naive.throughput_rps), {
        label: round(ours.p99_ms, 2), "naive": round(naive.p99_ms, 2),
        f"{label}_p50": round(ours.p50_ms, 2), "naive_p50": round(naive.p50_ms, 2),
        f"{label}_rps": round(ours.throughput_rps, 2), "naive_rps": round(naive.throughput_rps, 2),
        f"{label}_errors": ours.error_count, "naive_errors": naive.error_count,
    }


NAIVE = ("naive_fp32", "naive_int8")  # step 7's naive sides: the faster one is divided by


def _window(runs: dict[str, RunResult], name: str) -> tuple[RunResult | None, bool]:
    """A round's window: its re-run where there is one (marked), else its first try."""
    again = _run(runs, f"{name}-rerun")
    return (again, True) if again is not None else (_run(runs, name), f"{name}-rerun" in runs)


def paired_rounds(runs: dict[str, RunResult], preset: str) -> list[dict[str, Any]]:
    """Step 7's rounds of one preset: each side's final window (a re-run in place of its first try) and rate."""
    rounds = []
    prefix = f"paired-serve-{preset}-r"
    for name in sorted(runs):
        if not name.startswith(prefix) or name.endswith("-rerun"):
            continue
        r = int(name[len(prefix):])
        row: dict[str, Any] = {"round": r, "rerun": False, "windows": {}}
        for side in ("serve", *NAIVE):
            w, again = _window(runs, f"paired-{side.replace('_', '-')}-{preset}-r{r}")
            row["rerun"] |= again
            row["windows"][side] = w
            row[side] = w.throughput_rps if w is not None else None
        rounds.append(row)
    return rounds


def paired_ratio(runs: dict[str, RunResult], preset: str) -> tuple[float | None, dict[str, Any]]:
    """Public HTTP API ÷ the faster naive server over step 7's rounds (loadtests/rounds.py has the rule).

    The details are the median round's own figures (as `_vs_naive` gives them), `paired`: every round
    (its ratio against the faster naive configuration, both naive rates, re-run or not, kept or not), and
    `baseline`: which naive configuration that is, with each one's median rate over the kept rounds.
    """
    rounds = paired_rounds(runs, preset)
    value, which = against_faster(rounds, "serve", NAIVE)
    if value is None:
        return None, {}
    naive = which["baseline"]
    by_round = {r["round"]: r for r in rounds}
    median = by_round[which["median_round"]]
    _, d = _vs_naive(median["windows"]["serve"], median["windows"][naive], "serve_http")
    kept = set(which["kept"])
    rows = [{"round": r["round"], "first": "serve" if r["round"] % 2 == 0 else "naive",
             "ratio": _ratio(r["serve"], r[naive]), "serve_http_rps": _r2(r["serve"]),
             **{f"{n}_rps": _r2(r[n]) for n in NAIVE}, "rerun": r["rerun"], "kept": r["round"] in kept}
            for r in rounds]
    return value, {**d, "paired": rows, "baseline": naive.replace("_", " "),
                   "baseline_medians_rps": {k.replace("_", " "): v for k, v in which["baseline_medians"].items()},
                   "median_round": which["median_round"], "left_out": which["left_out"],
                   "rule": f"{len(rounds)} rounds; a side > {int(100 * STRAY)} % from its median: round run again "
                           "once; still off: left out; median of the kept rounds"}


def _r2(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def _median_round(
    rounds: list[tuple[int, float, dict[str, Any]]], row: Callable[[int, dict[str, Any]], dict[str, Any]]
) -> tuple[float | None, dict[str, Any]]:
    """The median round's ratio, its details and `paired`: every round (`row` picks what each lists)."""
    if not rounds:
        return None, {}
    rounds.sort()
    by_ratio = sorted(rounds, key=lambda x: x[1])
    _, value, median = by_ratio[(len(by_ratio) - 1) // 2]  # an even count keeps the lower middle
    return value, {**median, "paired": [{"round": r, "ratio": ratio, **row(r, d)} for r, ratio, d in rounds]}


def paired_served_over_engine(
    runs: dict[str, RunResult], raw: dict[str, Any], preset: str
) -> tuple[float | None, dict[str, Any]]:
    """The median over rounds of (public HTTP API items/s ÷ the in-process best timed next to it), and each round.

    A round counts when its API window completed (`paired-serve-<preset>-r<r>`) and its engines were timed
    (`raw["paired_engine_<preset>_r<r>"]`: every arrangement, as step 2 times them). The details are the
    median round's own (as `_served_over_engine` gives them) plus `paired`: every round.
    """
    rounds: list[tuple[int, float, dict[str, Any]]] = []
    prefix = f"paired_engine_{preset}_r"
    for key in sorted(raw):
        if not key.startswith(prefix) or key.endswith("_rerun"):
            continue
        r = int(key[len(prefix):])
        engines = raw.get(f"{key}_rerun") or raw[key]  # a re-run round: its second try, both windows
        serve, _ = _window(runs, f"paired-serve-{preset}-r{r}")
        ratio, d = _served_over_engine(serve, *engines.values())
        if ratio is not None:
            rounds.append((r, ratio, d))
    return _median_round(rounds, lambda r, d: {"engines": "first" if r % 2 == 0 else "last", **{
        k: d[k] for k in ("served_items_per_s", "in_process_best_items_per_s", "in_process_streams",
                          "in_process_best_batch", "at_engines_batch")}})


def _faster_naive(runs: dict[str, RunResult], preset: str) -> tuple[RunResult | None, dict[str, float | None]]:
    """The faster of the sequential naive windows (fp32, int8) at c=32, and both rates."""
    both = {p: _run(runs, f"naive-{p}-{preset}-c{C}") for p in ("fp32", "int8")}
    rates = {f"naive {p}": _r2(r.throughput_rps) if r else None for p, r in both.items()}
    done = [r for r in both.values() if r is not None]
    return (max(done, key=lambda r: r.throughput_rps) if done else None), rates


def _faster_name(rates: dict[str, float | None]) -> str:
    done = {k: v for k, v in rates.items() if v is not None}
    return max(done, key=lambda k: done[k]) if done else "none measured"


# Who took the CPU in a window, by process label prefix (loadtests/census.py names them).
CPU_GROUPS = (
    ("triton_stubs", ("triton stub",)), ("tritonserver", ("tritonserver",)),
    ("ingress_replicas", ("ray::ServeReplica",)), ("ray_proxy", ("ray::ProxyActor",)), ("haproxy", ("haproxy",)),
    ("naive_server", ("naive server",)),
)


def cpu_split(run: RunResult | None) -> dict[str, Any] | None:
    """CPU milliseconds per completed request in one window: each group, every other process, the load client."""
    cpu = run.extra.get("cpu") if run is not None else None
    if run is None or not cpu or not run.completed:
        return None
    # The census spans the whole call (warm-up too): per request over the requests of the whole call.
    requests = run.completed * (cpu["window_s"] / run.duration_s) if run.duration_s else run.completed
    out: dict[str, Any] = {"window": run.name}
    grouped = 0.0
    for key, prefixes in CPU_GROUPS:
        v = sum(t for k, t in cpu["by_label"].items() if k.startswith(prefixes))
        grouped += v
        if v:
            out[key] = round(1000 * v / requests, 2)
    out["other_processes"] = round(1000 * (cpu["others_cpu_s"] - grouped) / requests, 2)
    out["load_client"] = round(1000 * cpu["client_cpu_s"] / requests, 2)
    return out


def cpu_per_request(runs: dict[str, RunResult], d: dict[str, Any]) -> dict[str, Any] | None:
    """`tiny`'s API and naive windows of the headline's median round (or the sequential ones): CPU ms per request."""
    if d.get("median_round") is not None:
        r = d["median_round"]
        serve, _ = _window(runs, f"paired-serve-tiny-r{r}")
        naive, _ = _window(runs, f"paired-{d['baseline'].replace(' ', '-')}-tiny-r{r}")
    else:
        serve, naive = _run(runs, f"serve-http-tiny-c{C}"), _faster_naive(runs, "tiny")[0]
    out = {"serve_http": cpu_split(serve), "naive": cpu_split(naive)}
    return out if any(out.values()) else None


TRAFFIC_WAYS = (("aiohttp", "bench"), ("wrk", "bench"), ("aiohttp", "png96-256"))


def traffic_check(runs: dict[str, RunResult]) -> dict[str, Any] | None:
    """Step 7b: `tiny`'s API ÷ the faster naive server with each load generator and image mix, and their spread."""
    rows = []
    for driver, mix in TRAFFIC_WAYS:
        sides = {side: _run(runs, f"traffic-{side}-tiny-{driver}-{mix}") for side in ("serve", "naive-fp32",
                                                                                        "naive-int8")}
        naive = [r for k, r in sides.items() if k != "serve" and r is not None]
        if sides["serve"] is None or not naive:
            continue
        faster = max(naive, key=lambda r: r.throughput_rps)
        rows.append({
            "driver": driver, "images": mix, "ratio": _ratio(sides["serve"].throughput_rps, faster.throughput_rps),
            "serve_http_rps": _r2(sides["serve"].throughput_rps),
            **{f"{k.replace('-', '_')}_rps": _r2(r.throughput_rps) if r else None for k, r in sides.items()
               if k != "serve"},
            "baseline": "naive " + faster.name.split("-")[2],
            "client_cpu_s": {k: (r.extra.get("cpu") or {}).get("client_cpu_s") for k, r in sides.items() if r},
            "answers_right": {k: f"{a['right']}/{a['checked']}" for k, r in sides.items() if r
                              and (a := r.extra.get("answers"))},
        })
    if not rows:
        return None
    ratios = [r["ratio"] for r in rows if r["ratio"]]
    return {"rows": rows, "spread": _ratio(max(ratios), min(ratios)) if ratios else None}


def traffic(s: Any) -> dict[str, str]:
    """Which traffic each figure represents (the same words as loadtests/README.md)."""
    http = (f"closed loop, {C} connections, {s.duration_s:g} s windows (`small` {s.small_duration_s:g} s) after "
            f"{s.warmup_s:g} s warm-up; one aiohttp client process on the same cores; 64 shapes renders of 64-320 px, "
            "half PNG half JPEG, base64 in JSON, one question each (/v1/vqa), every answer checked")
    rounds = (f"; {s.paired_rounds} paired rounds, fresh servers each window; checked with wrk and with PNG renders "
              "of 96-256 px (details.traffic_tiny)")
    grpc = (f"closed loop, {C} concurrent calls, tritonclient gRPC asyncio (one process), raw encoded image bytes, "
            f"the same 64 renders, {s.duration_s:g} s windows")
    return {
        "vs_naive_http_tiny": http + rounds, "vs_naive_http_small": http + rounds.split("; checked")[0],
        "grpc_raw_over_naive_http_tiny": f"Triton: {grpc}; naive: {http}",
        "served_over_engine_grpc": f"{grpc}; engines: in-process ONNX Runtime on synthetic inputs",
        "served_over_engine_http": f"{http}; engines: in-process ONNX Runtime on synthetic inputs",
        "int8_gain_small": grpc, "avg_batch_c32": grpc, "batching_speedup_tiny": grpc,
        "repeat_image_speedup_small": "one client, 8 one-question /v1/vqa calls in a row on one image, "
                                      f"{s.repeat_sequences} images",
        "repeat_image_speedup_blip": "one client, 8 one-text /v1/match calls in a row on one 256 px image, "
                                     f"{s.repeat_sequences} images",
        "retrieve64_over_vqa1": "one client, one request at a time (c=1)",
        "caption_*, decode_*, ttft_*, tpot_*, vqa_gen_*": "caption_detail (loadtests/caption_bench.py)",
        "blip_*": "blip_detail (loadtests/blip_bench.py)",
    }


def _precision_of(raw: dict[str, Any], preset: str) -> str:
    return (raw.get("precision") or {}).get(preset, "fp32")


def _repeat(raw: dict[str, Any], preset: str = "small") -> tuple[float | None, dict[str, Any]]:
    on, off = raw.get(f"repeat_image_{preset}_on"), raw.get(f"repeat_image_{preset}_off")
    if not on or not off:
        return None, {}
    return _ratio(off["median_wall_ms"], on["median_wall_ms"]), {
        "calls_per_sequence": on["calls_per_sequence"],
        "cache_on_median_ms": on["median_wall_ms"], "cache_off_median_ms": off["median_wall_ms"],
        "cache_on_ms": [r["wall_ms"] for r in on["sequences"]],
        "cache_off_ms": [r["wall_ms"] for r in off["sequences"]],
        "image_encoder_runs_per_sequence_on": on.get("image_encoder_runs_per_sequence"),
        "image_encoder_runs_per_sequence_off": off.get("image_encoder_runs_per_sequence"),
        "same_answers": [a["answers"] for a in on["sequences"]] == [b["answers"] for b in off["sequences"]],
    }


def caption_figures(cap: dict[str, Any] | None, source: str = "caption/summary.json") -> dict[str, Any]:
    """The headline figures of a caption_bench summary, and `caption_detail`: what they come from and which run."""
    if not cap:
        return {k: None for k in CAPTION_KEYS} | {"caption_detail": None}
    d = cap.get("caption_vs_naive_detail") or {}
    tokens = d.get("tokens") or {}
    vq = cap.get("vqa_gen_8q_over_1q_detail") or {}
    tt = cap.get("ttft_tpot_detail") or {}
    detail = {
        "source": source, "commit": cap.get("commit"), "measured_at": cap.get("started"), "wall_s": cap.get("wall_s"),
        "quick": cap.get("quick"), "served_captions_per_s": d.get("served_captions_per_s"),
        "naive_captions_per_s": d.get("naive_captions_per_s"),
        "served_p50_ms": d.get("served_p50_ms"), "naive_p50_ms": d.get("naive_p50_ms"),
        "rounds": [{"round": r["round"], "ratio": r["ratio"], "rerun": r["rerun"], "kept": r["kept"]}
                   for r in d.get("rounds") or []],
        "median_round": d.get("median_round"),
        "same_tokens": f"{tokens['identical']}/{tokens['compared']}" if tokens else None,
        "triton_ttft_histogram_s": tt.get("triton_ttft_histogram_s"), "streams": tt.get("streams"),
        "vqa_one_question_median_s": vq.get("one_question_median_s"),
        "vqa_eight_questions_median_s": vq.get("eight_questions_median_s"),
        "foreign_cpu_share_max": max([w.get("foreign_cpu_share") or 0.0 for r in d.get("rounds") or []
                                      for w in r["windows"].values()], default=None),
        "errors": cap.get("errors"),
    } | caption_costs(cap)
    return {k: cap.get(k) for k in CAPTION_KEYS} | {"caption_detail": detail}


def caption_costs(cap: dict[str, Any]) -> dict[str, Any]:
    """What the caption rows' "what limits it" is computed from: CPU per caption, the vision tower's rates, steps/s."""
    rounds = (cap.get("caption_vs_naive_detail") or {}).get("rounds") or []

    def cpu(side: str) -> float | None:
        per = [r["windows"][side].get("stack_cpu_s_per_caption") for r in rounds if r.get("kept", True)]
        per = [v for v in per if v is not None]
        return round(statistics.median(per), 3) if per else None

    cost = cap.get("cost_model") or {}
    vision = {(v.get("kind"), v.get("processes"), v.get("threads")): v.get("per_s") for v in cost.get("vision") or []}
    rows = cap.get("decode_rows_per_step_c16_detail") or {}
    return {
        "served_cpu_s_per_caption": cpu("served"), "naive_cpu_s_per_caption": cpu("naive"),
        "vision_gflop": cost.get("vision_gflop"),
        "served_vision_images_per_s": vision.get(("ort_vision", 2, 1)),  # the imported vision tower: 2 × 1 thread
        "naive_vision_images_per_s": vision.get(("torch_vision", 2, 1)),  # the naive server: 2 workers × 1 thread
        "decode_steps_per_s": rows.get("steps_per_s"), "decode_captions_per_s": rows.get("captions_per_s"),
    }


def caption_limits(cd: dict[str, Any]) -> dict[str, str]:
    """The caption rows' "what limits it", from the run's own measurements (the cost model in README explains)."""
    out: dict[str, str] = {}
    if cd.get("served_cpu_s_per_caption") and cd.get("naive_cpu_s_per_caption"):
        out["caption_vs_naive"] = (
            f"CPU per caption: served {_fmt(cd['served_cpu_s_per_caption'])} core-s against the naive "
            f"{_fmt(cd['naive_cpu_s_per_caption'])}")
        if cd.get("served_vision_images_per_s") and cd.get("naive_vision_images_per_s"):
            out["caption_vs_naive"] += (
                f", of which the vision tower ({_fmt(cd.get('vision_gflop'))} GFLOP an image) "
                f"{_fmt(2 / cd['served_vision_images_per_s'])} and {_fmt(2 / cd['naive_vision_images_per_s'])} "
                f"(2 cores at {_fmt(cd['served_vision_images_per_s'])} and {_fmt(cd['naive_vision_images_per_s'])} "
                "images/s)")
        out["caption_vs_naive"] += "; see the cost model"
    if cd.get("decode_steps_per_s") and cd.get("decode_captions_per_s"):
        out["decode_rows_per_step_c16"] = (
            f"rows a step = captions/s × 20 tokens ÷ steps/s: {_fmt(cd['decode_captions_per_s'])} captions a second "
            f"enter (the vision tower's rate) and the decoder runs {_fmt(cd['decode_steps_per_s'])} steps a second; "
            "see the cost model")
    return out


def blip_figures(blip: dict[str, Any] | None, source: str = "blip/summary.json") -> dict[str, Any]:
    """The headline figures of a blip_bench summary, and `blip_detail`: what they come from and which run."""
    if not blip:
        return {k: None for k in BLIP_KEYS} | {"blip_detail": None}
    d = blip.get("blip_retrieve64_vs_naive_detail") or {}
    sides = {k: d.get(k) or {} for k in ("served", "served_all", "naive")}
    sl = blip.get("blip_retrieve64_shortlist_detail") or {}
    m = blip.get("blip_match64_detail") or {}
    after, before = m.get("after") or {}, m.get("before") or {}
    shares = [v.get("foreign_cpu_share") for v in sides.values()] + [m.get("foreign_cpu_share")]
    detail = {
        "source": source, "commit": blip.get("commit"), "measured_at": blip.get("started"),
        "wall_s": blip.get("wall_s"), "quick": (blip.get("settings") or {}).get("quick"),
        **{f"{k}_p50_ms": v.get("p50_ms") for k, v in sides.items()},
        **{f"{k}_requests": v.get("requests_run") for k, v in sides.items()},
        "same_top_served_vs_naive": blip.get("blip_retrieve64_same_top"),
        "top5_same_order": f"{sl['same_order']}/{sl['compared']}" if sl else None,
        "top5_mean_overlap": sl.get("mean_overlap"),
        "top1_same": f"{sl['same_top1']}/{sl['compared']}" if sl else None,
        "match_after_p50_ms": after.get("p50_ms"), "match_before_p50_ms": before.get("p50_ms"),
        "match_requests": after.get("requests_run"),
        "match_after_payload": after.get("payload"), "match_before_payload": before.get("payload"),
        "match_app_p50_ms": m.get("app_p50_ms"),
        "match_itm_probability_max_abs_diff": m.get("itm_probability_max_abs_diff"),
        "foreign_cpu_share_max": max([x for x in shares if x is not None], default=None),
        "errors": blip.get("errors"),
    } | blip_costs(blip)
    return {k: blip.get(k) for k in BLIP_KEYS} | {"blip_detail": detail}


def blip_costs(blip: dict[str, Any]) -> dict[str, Any]:
    """What the BLIP rows' "what limits it" is computed from: the engines' GFLOP, the ITC shortlist against the
    exact top 5, the /v1/match tensors."""
    rows = (blip.get("blip_engine_efficiency_detail") or {}).get("rows") or []
    gflop = {r["engine"]: r.get("gflop_per_item") for r in rows}
    fusion: dict[str, Any] = next((r for r in rows if r["engine"] == "fusion"), {})
    d = blip.get("blip_retrieve64_vs_naive_detail") or {}
    itc = [r.get("itc_shortlist") for r in (d.get("top_index") or {}).get("requests") or []]
    sl = (blip.get("blip_retrieve64_shortlist_detail") or {}).get("requests") or []
    held, consistent = [], []
    if itc and len(itc) >= len(sl) and all(x is not None for x in itc):  # each exact top 5 against its ITC shortlist
        for r, short in zip(sl, itc):
            h = [x for x in r["exact"] if x in set(short)]
            held.append(len(h))
            consistent.append(r["approx"][:len(h)] == h)
    m = blip.get("blip_match64_detail") or {}
    after, before = (m.get("after") or {}).get("payload") or {}, (m.get("before") or {}).get("payload") or {}
    pixels = m.get("pixels_shape")
    pixel_bytes = None if not pixels else math.prod(int(x) for x in pixels)  # uint8
    return {
        "image_gflop": gflop.get("image_encoder"), "fusion_gflop_per_row": gflop.get("fusion"),
        "fusion_tokens": fusion.get("tokens"), "fusion_batch": fusion.get("batch"),
        "fusion_items_per_s": fusion.get("items_per_s"),
        "naive_torch_threads": (d.get("naive") or {}).get("torch_threads"),
        "exact_top5_in_itc_shortlist_mean": round(sum(held) / len(held), 3) if held else None,
        "differences_explained_by_shortlist": all(consistent) if consistent else None,
        "exact_top1_in_itc_shortlist": f"{sum(bool(r.get('naive_top_in_shortlist')) for r in top)}/{len(top)}"
        if (top := (d.get("top_index") or {}).get("requests")) and itc else None,
        "match_texts": m.get("texts"), "match_pixels_shape": pixels, "match_pixel_bytes": pixel_bytes,
        # Both paths get the same ITM logits back; before also gets the image features (once).
        "match_feature_bytes": (before["received"] - after["received"]) if before and after else None,
    }


def blip_limits(bd: dict[str, Any]) -> dict[str, str]:
    """The BLIP rows' "what limits it", from the run's own measurements."""
    out: dict[str, str] = {}
    img, fus = bd.get("image_gflop"), bd.get("fusion_gflop_per_row")
    if img and fus:
        out["blip_retrieve64_vs_naive"] = (
            f"served: one image encode ({_fmt(img)} GFLOP), 64 captions through the text encoder, ITM on the 16 "
            f"shortlisted ({_fmt(fus)} GFLOP a row at {bd.get('fusion_tokens')} tokens); naive: the vision tower "
            f"once per caption (64 × {_fmt(img)} GFLOP)")
        if (threads := bd.get("naive_torch_threads")) is not None:
            out["blip_retrieve64_vs_naive"] += f" in {threads} torch thread{'' if threads == 1 else 's'}"
    if bd.get("served_p50_ms") and bd.get("served_all_p50_ms"):
        extra = bd["served_all_p50_ms"] - bd["served_p50_ms"]
        out["blip_retrieve64_all_vs_naive"] = (
            f"ITM on 64 rows instead of 16: p50 +{_fmt(extra / 1e3)} s for the 48 more rows "
            f"({_fmt(extra / 48)} ms a row); the rest as with shortlist 16")
    if bd.get("exact_top5_in_itc_shortlist_mean") is not None:
        why = (f"the ITC shortlist of 16 held {_fmt(bd['exact_top5_in_itc_shortlist_mean'])} of the exact top 5 "
               "on average (a random-weight checkpoint: its ITC and ITM heads were never trained together)")
        if bd.get("differences_explained_by_shortlist"):
            why += ("; the captions it held, shortlist 16 ranks as the exact ranking does: every difference is one "
                    "it left out")
        for key in ("blip_retrieve64_top5_same_order", "blip_retrieve64_top5_overlap"):
            out[key] = why
    if bd.get("exact_top1_in_itc_shortlist"):
        out["blip_retrieve64_top1_agreement"] = (
            f"the naive server's top 1 (the exact one) was in the ITC shortlist in {bd['exact_top1_in_itc_shortlist']} "
            "requests")
    a, b = bd.get("match_after_p50_ms"), bd.get("match_before_p50_ms")
    feat = bd.get("match_feature_bytes")
    if a and b and feat and bd.get("match_texts") and bd.get("fusion_items_per_s"):
        out["blip_match64_before_over_after"] = (
            f"the fusion's {bd['match_texts']} rows: {_fmt(bd['match_texts'] / bd['fusion_items_per_s'])} s in-process "
            f"(at batch {bd.get('fusion_batch')} × {bd.get('fusion_tokens')} tokens) of p50 {_fmt(b / 1e3)} s "
            f"before and {_fmt(a / 1e3)} s after; `NAME_itm` repeats the {_fmt(feat / 1e6)} MB of features "
            f"{bd['match_texts']} times inside Triton and hands them to the fusion through the Python backend's "
            "IPC as before: what it saves is the gRPC hop "
            f"of {_fmt(feat * bd['match_texts'] / 1e6)} MB")
    after = bd.get("match_after_payload") or {}
    if after and bd.get("match_pixel_bytes"):
        out["blip_match64_after_mb"] = (
            f"the pixels ({' × '.join(str(x) for x in bd['match_pixels_shape'][1:])} uint8, "
            f"{_fmt(bd['match_pixel_bytes'] / 1e6)} MB) and the token ids + mask "
            f"({_fmt((after['sent'] - bd['match_pixel_bytes']) / 1e6)} MB); the image features stay inside Triton")
    if feat and bd.get("match_texts"):
        out["blip_match64_before_mb"] = (
            f"the image features ({_fmt(feat / 1e6)} MB) back once and out {bd['match_texts']} times "
            f"({_fmt(feat * bd['match_texts'] / 1e6)} MB)")
    return out


def _folder_summary(bench: Any, name: str) -> dict[str, Any] | None:
    """blip_bench's or caption_bench's own summary in the bench's results folder (`<name>/summary.json`), if any."""
    out = getattr(bench, "out", None)
    path = Path(out) / name / "summary.json" if out is not None else None
    return json.loads(path.read_text()) if path is not None and path.exists() else None


def _targets(out: dict[str, Any], keys: Any) -> dict[str, Any]:
    return {k: {"target": f"{TARGETS[k][0]} {TARGETS[k][1]}", "met": None if out.get(k) is None else
                (out[k] >= TARGETS[k][1] if TARGETS[k][0] == ">=" else out[k] <= TARGETS[k][1])} for k in keys}


def _merge(summary_path: Path, figures: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """Put one bench's figures (and their targets) into an existing summary.json; the other figures stay."""
    s = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    s.update(figures)
    s.setdefault("targets", {}).update(_targets(s, [k for k in TARGETS if k in keys]))
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(s, indent=2) + "\n")
    return s


def merge_caption(summary_path: Path, cap: dict[str, Any], source: str) -> dict[str, Any]:
    """Put a caption_bench run's figures into an existing summary.json (the other figures stay as measured)."""
    return _merge(summary_path, caption_figures(cap, source), CAPTION_KEYS)


def merge_blip(summary_path: Path, blip: dict[str, Any], source: str) -> dict[str, Any]:
    """Put a blip_bench run's figures into an existing summary.json (the other figures stay as measured)."""
    return _merge(summary_path, blip_figures(blip, source), BLIP_KEYS)


def summary(bench: Any, started: float | None = None) -> dict[str, Any]:
    """The summary of a finished Bench (loadtests.bench.Bench), or of one rebuilt from its files (`from_runs`).

    When, where and what it ran on come from `raw["meta"]` (the bench writes it before this is called);
    without it (unit tests), from now and this machine.
    """
    runs: dict[str, RunResult] = bench.runs
    raw: dict[str, Any] = bench.raw
    meta: dict[str, Any] = raw.get("meta") or {}
    started = time.time() if started is None else started
    details: dict[str, Any] = {}

    def efficiency(engine: str, ceiling: str, per_s: str) -> float | None:
        if ceiling not in raw or "flops" not in raw or engine not in raw:
            return None
        best = raw[engine]["best"]
        fl = raw["flops"]["small"]["flops_per_item"]
        details[f"{engine}_efficiency"] = {
            "flops_per_item": fl, "items_per_s": best["items_per_s"], "batch": best["batch"],
            "precision": raw[engine].get("precision", "fp32"), "achieved_flops_per_s": fl * best["items_per_s"],
            "ceiling_per_s": raw[ceiling][per_s], "ceiling_library": raw[ceiling].get("best_library",
                                                                                     raw[ceiling].get("library")),
            "threads": raw[ceiling]["threads"],
        }
        return round(fl * best["items_per_s"] / raw[ceiling][per_s], 4)

    fp32_engine = "engine_small_fp32" if "engine_small_fp32" in raw else "engine_small"
    eff = efficiency(fp32_engine, "ceiling", "flops_per_s")
    eff8 = efficiency("engine_small", "ceiling_int8", "ops_per_s") if fp32_engine != "engine_small" else None

    grpc_small = _run(runs, f"triton-grpc-small-c{C}")
    http_small = _run(runs, f"serve-http-small-c{C}")
    small = (raw.get("engine_small"), raw.get("engine_small_instances"))
    sog, details["served_over_engine_grpc"] = _served_over_engine(grpc_small, *small)
    soh, details["served_over_engine_http"] = _served_over_engine(http_small, *small)
    # The paired rounds' median where there is one (engines timed next to the API window, as for
    # vs_naive_http_*); the figure from the sweep's windows, minutes apart, stays beside it.
    psoh, d_psoh = paired_served_over_engine(runs, raw, bench.s.small_role)
    if psoh is not None:
        soh, details["served_over_engine_http"] = psoh, {
            **d_psoh, "sequential": {"value": soh, **details["served_over_engine_http"]}}

    grpc_tiny = _run(runs, f"triton-grpc-tiny-c{C}")
    http_tiny = _run(runs, f"serve-http-tiny-c{C}")
    tiny_p, small_p = _precision_of(raw, "tiny"), _precision_of(raw, "small")
    # The naive server a user would write, in fp32 and with PyTorch's dynamic int8: every ratio divides by the faster.
    naive_tiny, seq_tiny = _faster_naive(runs, "tiny")
    naive_small, seq_small = _faster_naive(runs, "small")
    vht, d_vht = _vs_naive(http_tiny, naive_tiny, "serve_http")
    vhs, d_vhs = _vs_naive(http_small, naive_small, "serve_http")
    for d, n in ((d_vht, seq_tiny), (d_vhs, seq_small)):
        if d:
            d["naive_sequential_rps"] = n
    # The paired rounds' median where there is one; the sequential windows' ratio stays beside it.
    # (quick runs pair `tiny` only: there `small` keeps the sequential figure)
    paired = {p: paired_ratio(runs, p) for p in ("tiny", "small")}
    if paired["tiny"][0] is not None:
        vht, d_vht = paired["tiny"][0], {**paired["tiny"][1], "sequential": {"value": vht, **d_vht}}
    if paired["small"][0] is not None:
        vhs, d_vhs = paired["small"][0], {**paired["small"][1], "sequential": {"value": vhs, **d_vhs}}
    vgt, p99_tiny = _vs_naive(grpc_tiny, naive_tiny, "triton_grpc")
    if p99_tiny:
        p99_tiny["naive_sequential_rps"] = seq_tiny
    for d, p, seq in ((d_vht, tiny_p, seq_tiny), (d_vhs, small_p, seq_small), (p99_tiny, tiny_p, seq_tiny)):
        if d:
            used = d.get("baseline") or _faster_name(seq)
            d["precision"] = f"{p} engines ÷ the faster naive server ({used})"
    details["cpu_per_request_ms_tiny"] = cpu_per_request(runs, d_vht)

    other = _run(runs, f"triton-grpc-small-{'fp32' if small_p == 'int8' else 'int8'}-c{C}")
    int8_gain = None
    if grpc_small is not None and other is not None:
        i8, f32 = (grpc_small, other) if small_p == "int8" else (other, grpc_small)
        int8_gain = _ratio(i8.throughput_rps, f32.throughput_rps)
        details["int8_gain_small"] = {"how": "Triton direct gRPC vqa, small, c=32", "int8_rps": i8.throughput_rps,
                                      "fp32_rps": f32.throughput_rps, "int8_p99_ms": i8.p99_ms,
                                      "fp32_p99_ms": f32.p99_ms}
    repeat, details["repeat_image_speedup_small"] = _repeat(raw)
    repeat_blip, details["repeat_image_speedup_blip"] = _repeat(raw, "blip")
    for front in ("haproxy", "ray"):  # the other front door, for comparison (serving/app/front.py)
        value, d = _vs_naive(_run(runs, f"serve-http-{front}-tiny-c{C}"), naive_tiny, "serve_http")
        if value is not None:
            details[f"vs_naive_http_tiny_front_{front}"] = {"value": value, **d, "shipped_front": False}

    avg_batch = None
    if grpc_tiny is not None:
        tb = grpc_tiny.extra.get("triton_batches", {})
        avg_batch = round(tb["engines_avg_batch"], 2) if tb.get("engines_avg_batch") else None
        details["avg_batch_c32"] = {m: v for m, v in tb.get("models", {}).items()}
    if raw.get("ceiling") and raw.get("ceiling_int8"):
        details["int8_gemm_over_fp32_gemm"] = _ratio(raw["ceiling_int8"].get("ops_per_s"),
                                                     raw["ceiling"].get("flops_per_s"))
    details["traffic_tiny"] = traffic_check(runs)

    nobatch = _run(runs, f"triton-grpc-tiny-nobatch-c{C}")
    speedup = _ratio(grpc_tiny.throughput_rps, nobatch.throughput_rps) if grpc_tiny and nobatch else None
    if speedup is not None:
        details["batching_speedup_tiny"] = {"on_rps": grpc_tiny.throughput_rps, "off_rps": nobatch.throughput_rps}  # type: ignore[union-attr]

    r64, v1 = _run(runs, "serve-http-tiny-retrieve64-c1"), _run(runs, "serve-http-tiny-vqa1-c1")
    reuse = _ratio(r64.p50_ms, v1.p50_ms) if r64 and v1 else None
    if reuse is not None:
        details["retrieve64_over_vqa1"] = {"retrieve64_p50_ms": r64.p50_ms, "vqa1_p50_ms": v1.p50_ms}  # type: ignore[union-attr]

    out: dict[str, Any] = {
        "engine_efficiency": eff,
        "engine_efficiency_int8": eff8,
        "served_over_engine_grpc": sog,
        "served_over_engine_http": soh,
        "vs_naive_http_tiny": vht,
        "vs_naive_http_tiny_detail": d_vht or None,
        "vs_naive_http_small": vhs,
        "vs_naive_http_small_detail": d_vhs or None,
        "grpc_raw_over_naive_http_tiny": vgt,
        "grpc_raw_over_naive_http_tiny_detail": p99_tiny or None,
        "int8_gain_small": int8_gain,
        "repeat_image_speedup_small": repeat,
        "repeat_image_speedup_blip": repeat_blip,
        "avg_batch_c32": avg_batch,
        "batching_speedup_tiny": speedup,
        "retrieve64_over_vqa1": reuse,
        **caption_figures(_folder_summary(bench, "caption")),
        **blip_figures(_folder_summary(bench, "blip")),
        "machine": meta.get("machine") or machine(),
        "versions": meta.get("versions") or versions(),
        "commit": meta.get("commit") or git_commit(),
        "quick": bench.s.quick,
        "measured_at": meta.get("measured_at") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "bench_seconds": meta["bench_seconds"] if "bench_seconds" in meta else round(time.time() - started, 1),
        "repositories": raw.get("repositories"),
        "precision": raw.get("precision"),
        "engine_overrides": raw.get("engine_overrides"),
        "serve_composition": raw.get("serve_composition"),
        "cpu_busy_before": raw.get("cpu_busy_before"),
        "foreign_cpu_share_max": max(
            [r.extra.get("foreign_cpu_share") or 0.0 for r in runs.values()]
            + [raw.get(f"engine_{p}", {}).get("foreign_cpu_share") or 0.0 for p in ("tiny", "small")],
            default=None,
        ),
        "offered_load": {"mode": "closed", "concurrency": C, "duration_s": bench.s.duration_s,
                         "small_duration_s": bench.s.small_duration_s, "warmup_s": bench.s.warmup_s,
                         "windows_per_c32_run": bench.s.repeats, "kept": "median throughput",
                         "paired_rounds": bench.s.paired_rounds, "stray": bench.s.stray},
        "traffic": traffic(bench.s),
    }
    out["targets"] = _targets(out, TARGETS)
    if p99_tiny:
        out["targets"]["grpc_p99_under_half_naive_http_p99_tiny"] = {
            "target": "Triton gRPC (raw bytes) p99 < the naive server's HTTP + JSON p99 / 2 (same precision): a "
                      "protocol and server gain together",
            "met": p99_tiny["triton_grpc"] < p99_tiny["naive"] / 2,
        }
    out["details"] = details
    out["runs"] = sorted(runs)
    out["errors"] = bench.errors
    return out


# -- the figures table of loadtests/README.md, written from a summary.json -----------------------------------

README = Path(__file__).resolve().parent / "README.md"
BEGIN, END = "<!-- figures:begin (written by `python -m loadtests.report`) -->", "<!-- figures:end -->"
# What each figure measures (its command is `make bench`) and what limits it, as measured on this machine.
ROWS: tuple[tuple[str, str, str], ...] = (
    ("engine_efficiency", "`small` in-process, fp32 graphs, best batch, ÷ the fp32 matmul ceiling",
     "GEMMs of 196 tokens × 384 run near the ceiling; the rest is softmax, LayerNorm, GELU"),
    ("engine_efficiency_int8", "`small` int8 graphs ÷ the int8 MatMulInteger ceiling",
     "the fp32 parts left in the int8 graphs weigh more beside faster GEMMs"),
    ("served_over_engine_grpc", "`small`, Triton direct gRPC items/s ÷ in-process best batch",
     "image decode + resize in `vqa`, the Python-backend IPC, the load client on the same cores"),
    ("served_over_engine_http", "`small`, public HTTP API items/s ÷ in-process best batch",
     "the serving processes' CPU per request on the same cores (Triton's Python stubs, the Ingress replicas, "
     "the front door)"),
    ("vs_naive_http_tiny", "`tiny`, public HTTP API ÷ the faster naive server (fp32 or PyTorch dynamic int8), both "
     "HTTP + JSON", "the serving processes' CPU per request (Triton's Python stubs, the Ingress replicas, the front "
     "door)"),
    ("vs_naive_http_small", "`small`, public HTTP API ÷ the faster naive server (fp32 or PyTorch dynamic int8), both "
     "HTTP + JSON", "the engines (GEMM-bound) and, less, the front door"),
    ("grpc_raw_over_naive_http_tiny",
     "`tiny`, Triton `vqa` over gRPC (raw bytes) ÷ the faster naive server over HTTP + JSON: protocol + server",
     "decode in the `vqa` stub, four Python-backend hops, the load client on the same cores"),
    ("int8_gain_small", "`small`, Triton direct gRPC, int8 engines ÷ fp32 engines (1 and 2 threads per instance)",
     "int8 GEMMs: AVX-512 VNNI where the CPU has it, else AVX2 (`machine.simd` in the summary says which)"),
    ("repeat_image_speedup_small", "`small`, 8 one-question /v1/vqa calls in a row on one image, "
     "Triton response cache off ÷ on", "text encoder + fusion + the front door per call, which the cache keeps"),
    ("repeat_image_speedup_blip", "BLIP-base (random weights, fp32 import), 8 one-text /v1/match calls in a row on "
     "one image, Triton response cache off ÷ on", "text encoder + ITM fusion + the front door per call"),
    ("avg_batch_c32", "`tiny`, Triton direct, items ÷ executions over the three engines at c=32",
     "`vqa` hands each engine one request per batch"),
    ("batching_speedup_tiny", "`tiny`, Triton direct c=32, dynamic batching on ÷ off",
     "with batching off, 2 `vqa` + 6 engine instances still overlap work; the unbatched run moves most "
     "between runs (see below)"),
    ("retrieve64_over_vqa1", "`tiny` through the API at c=1, p50 of 1 image × 64 captions ÷ 1 question",
     "one image encode, 64 captions encoded, a 16-caption shortlist by embedding, then ITM on 16 rows "
     "that each project the same image features again"),
    ("caption_vs_naive", "BLIP-base, 20-token captions/s at c=16 through /v1/caption ÷ naive FastAPI + `generate()` "
     "(2 workers × 1 thread), both fp32, HTTP + JSON",
     "the vision tower, most of a caption's CPU on both sides; see the cost model"),
    ("decode_rows_per_step_c16", "BLIP-base, rows per decoder step over the c=16 caption windows (Triton's metrics)",
     "rows a step = captions/s × 20 tokens ÷ steps/s: captions enter at the vision tower's rate; see the cost "
     "model"),
    ("ttft_p50_s_c16", "BLIP-base, time to first token, p50, streamed captions at c=16 (client side)",
     "the vision tower's queue: the 16 requests enter the decoder at the vision tower's rate"),
    ("ttft_p99_s_c16", "the same, p99", "the vision tower's queue"),
    ("tpot_p50_ms_c16", "BLIP-base, time per output token after the first, p50, streamed at c=16",
     "a decoder step on one thread sharing the 2 cores with the vision tower"),
    ("tpot_p99_ms_c16", "the same, p99", "as p50, with the vision tower's larger batches beside"),
    ("vqa_gen_8q_over_1q", "BLIP-base VQA (generated answers), 8 questions ÷ 1 on one image through /v1/vqa",
     "the image is encoded once; each question adds its pass through the question encoder (whose "
     "cross-attention projects the image tokens again) and its decoder row"),
    ("blip_retrieve64_vs_naive", "BLIP-base, 1 image × 64 captions, `top_k` 5, sequential: naive FastAPI + "
     "transformers (ITM on every caption) p50 ÷ /v1/retrieve p50 with the default shortlist (16)",
     "served: one image encode, 64 captions through the text encoder, ITM on the 16 shortlisted; naive: the "
     "vision tower once per caption"),
    ("blip_retrieve64_all_vs_naive", "the same with `shortlist: \"all\"` (ITM on all 64 captions: the exact ranking)",
     "ITM on 64 rows instead of 16, the rest as with shortlist 16"),
    ("blip_retrieve64_top5_same_order", "share of those requests whose top 5 with shortlist 16 equals the exact "
     "top 5, in order", "captions of the exact top 5 that the ITC shortlist of 16 leaves out"),
    ("blip_retrieve64_top5_overlap", "mean share of the exact top 5 that shortlist 16's top 5 holds",
     "captions of the exact top 5 that the ITC shortlist of 16 leaves out"),
    ("blip_retrieve64_top1_agreement", "share of those requests with the exact top 1",
     "whether the ITC shortlist holds the exact top 1"),
    ("blip_match64_before_over_after", "BLIP-base, 1 image × 64 texts, /v1/match's Triton calls straight from the "
     "app's gRPC client, p50: image encoder + fusion with the features repeated per text (before) ÷ `NAME_itm` "
     "(after)", "the fusion's 64 rows, on both paths"),
    ("blip_match64_after_mb", "tensor MB per request to and from Triton, after: the pixels once + 64 token rows to "
     "`NAME_itm`, 64 ITM logit pairs back", "the pixels; the image features stay inside Triton"),
    ("blip_match64_before_mb", "the same, before: pixels → image features back, then the features × 64 rows + "
     "token rows → logits", "the image features, back once and out once per text"),
)


def run_limits(s: dict[str, Any]) -> dict[str, str]:
    """The tiny/small rows' "what limits it" that quote figures, from this run's own measurements."""
    det = s.get("details") or {}
    out: dict[str, str] = {}
    if det.get("int8_gemm_over_fp32_gemm"):
        out["engine_efficiency_int8"] = (f"the fp32 parts left in the int8 graphs weigh more beside GEMMs "
                                         f"{_fmt(det['int8_gemm_over_fp32_gemm'])}× faster (the two matmul ceilings)")
    cpu = det.get("cpu_per_request_ms_tiny") or {}
    serve, naive = cpu.get("serve_http") or {}, cpu.get("naive") or {}
    if serve:
        names = (("triton_stubs", "Triton's Python stubs"), ("tritonserver", "tritonserver"),
                 ("ingress_replicas", "the Ingress replicas"), ("ray_proxy", "Ray's proxy"), ("haproxy", "HAProxy"),
                 ("other_processes", "every other process"), ("load_client", "the load client"))
        split = ", ".join(f"{label} {_fmt(serve[k])} ms" for k, label in names if serve.get(k) is not None)
        text = f"CPU per request on the same cores (`{serve['window']}`): {split}"
        if naive.get("naive_server") is not None:
            text += f"; the naive server {_fmt(naive['naive_server'])} ms a request"
        out["vs_naive_http_tiny"] = text
        out["served_over_engine_http"] = text.replace("CPU per request", "`tiny`'s CPU per request", 1)
    vqa = (det.get("avg_batch_c32") or {}).get("vqa") or {}
    if vqa.get("avg_batch"):
        out["avg_batch_c32"] = f"`vqa` hands each engine one request per batch of {_fmt(round(vqa['avg_batch'], 1))}"
    return out


def _machine(m: dict[str, Any] | None) -> str:
    """The CPU a summary ran on, as the table's header says it (int8 figures depend on its SIMD)."""
    if not m:
        return "machine not recorded"
    return f"{m.get('cpu_model')}, {m.get('cores')} cores, {'/'.join(m.get('simd') or []) or 'no SIMD flags read'}"


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def _rps(d: dict[str, Any] | None, ours: str) -> str:
    if not d:
        return ""
    text = (f"{d[f'{ours}_rps']:.1f} ÷ {d['naive_rps']:.1f} req/s, p99 {d[ours]:.0f} vs {d['naive']:.0f} ms; "
            f"{d.get('precision', '')}")
    if d.get("paired") and "kept" in d["paired"][0]:
        ratios = ", ".join(f"{_fmt(r['ratio'])}{'*' if r['rerun'] else ''}{'' if r['kept'] else ' (left out)'}"
                           for r in d["paired"])
        medians = ", ".join(f"{k} {_fmt(v)}" for k, v in (d.get("baseline_medians_rps") or {}).items())
        kept = sum(r["kept"] for r in d["paired"])
        text = (f"median of {kept} kept of {len(d['paired'])} paired rounds (ratios {ratios}"
                f"{'; * re-run' if any(r['rerun'] for r in d['paired']) else ''}); naive medians {medians} req/s; "
                f"its round {text}")
    elif d.get("paired"):
        ratios = ", ".join(f"{r['ratio']:.3g}" for r in d["paired"])
        text = f"median of {len(d['paired'])} paired rounds (ratios {ratios}), its round " + text
    seq = d.get("sequential") or {}
    if seq.get("value") is not None:
        text += (f"; the sequential windows: {seq['value']:.3g} "
                 f"({seq[f'{ours}_rps']:.1f} ÷ {seq['naive_rps']:.1f} req/s)")
    return text


def markdown(s: dict[str, Any], source: str = "loadtests/results/summary.json") -> str:
    """The figures table of one summary.json, with where each came from."""
    det = s.get("details", {})
    extra = {
        "vs_naive_http_tiny": _rps(s.get("vs_naive_http_tiny_detail"), "serve_http"),
        "vs_naive_http_small": _rps(s.get("vs_naive_http_small_detail"), "serve_http"),
        "grpc_raw_over_naive_http_tiny": _rps(s.get("grpc_raw_over_naive_http_tiny_detail"), "triton_grpc"),
    }
    for front in ("haproxy", "ray"):
        o = det.get(f"vs_naive_http_tiny_front_{front}")
        if o:
            extra["vs_naive_http_tiny"] += (f"; front door {front} (`VTFUSE_FRONT={front}`): **{o['value']:.3g}** "
                                            f"({o['serve_http_rps']:.1f} req/s, p99 {o['serve_http']:.0f} ms)")
    if det.get("int8_gain_small"):
        g = det["int8_gain_small"]
        extra["int8_gain_small"] = f"{g['int8_rps']:.1f} ÷ {g['fp32_rps']:.1f} req/s"
    for preset in ("small", "blip"):
        if det.get(f"repeat_image_speedup_{preset}"):
            r = det[f"repeat_image_speedup_{preset}"]
            extra[f"repeat_image_speedup_{preset}"] = (
                f"median {r['cache_off_median_ms']:.0f} ÷ {r['cache_on_median_ms']:.0f} ms per 8 calls; the image "
                f"encoder ran {r.get('image_encoder_runs_per_sequence_on')} times per 8 with the cache, "
                f"{r.get('image_encoder_runs_per_sequence_off')} without; same answers: {r.get('same_answers')}")
    tr = det.get("traffic_tiny") or {}
    if tr.get("rows"):
        ways = "; ".join(f"{r['driver']} on {r['images']}: {_fmt(r['ratio'])} ({_fmt(r['serve_http_rps'])} ÷ "
                         f"{_fmt(max(x for x in (r.get('naive_fp32_rps'), r.get('naive_int8_rps')) if x))} req/s)"
                         for r in tr["rows"])
        extra["vs_naive_http_tiny"] += f"; traffic check, one stack per side: {ways}"
    for key in ("served_over_engine_grpc", "served_over_engine_http"):
        if det.get(key):
            d = det[key]
            extra[key] = f"{d['served_items_per_s']:.2f} ÷ {d['in_process_best_items_per_s']:.2f} items/s"
            if d.get("paired"):
                ratios = ", ".join(f"{r['ratio']:.3g}" for r in d["paired"])
                extra[key] = (f"median of {len(d['paired'])} paired rounds (ratios {ratios}), its round "
                              f"{extra[key]}")
            seq = d.get("sequential") or {}
            if seq.get("value") is not None:
                extra[key] += (f"; the sequential windows: {seq['value']:.3g} ({seq['served_items_per_s']:.2f} ÷ "
                               f"{seq['in_process_best_items_per_s']:.2f} items/s)")
    cd = s.get("caption_detail") or {}
    if cd:
        run = (f"caption_bench run at `{str(cd.get('commit') or '?')[:12]}` on {cd.get('measured_at')}"
               f"{' (QUICK: not speeds)' if cd.get('quick') else ''}")
        if cd.get("rounds"):
            ratios = ", ".join(f"{r['ratio']:.3g}{'*' if r['rerun'] else ''}{'' if r['kept'] else ' (left out)'}"
                               for r in cd["rounds"] if r["ratio"] is not None)
            extra["caption_vs_naive"] = (
                f"median of {len(cd['rounds'])} paired rounds (ratios {ratios}"
                f"{'; * re-run' if any(r['rerun'] for r in cd['rounds']) else ''}), its round "
                f"{_fmt(cd.get('served_captions_per_s'))} ÷ {_fmt(cd.get('naive_captions_per_s'))} captions/s, p50 "
                f"{_fmt((cd.get('served_p50_ms') or 0) / 1e3)} vs {_fmt((cd.get('naive_p50_ms') or 0) / 1e3)} s; "
                f"same tokens {cd.get('same_tokens')}; {run}")
        for key in ("decode_rows_per_step_c16", "ttft_p50_s_c16", "ttft_p99_s_c16", "tpot_p50_ms_c16",
                    "tpot_p99_ms_c16", "vqa_gen_8q_over_1q"):
            extra.setdefault(key, run)
        tt = cd.get("triton_ttft_histogram_s") or {}
        for q in ("p50", "p99"):
            if tt.get(q) is not None:
                extra[f"ttft_{q}_s_c16"] = f"Triton's histogram: {tt[q]:.3g} s; {run}"
        if cd.get("vqa_one_question_median_s"):
            extra["vqa_gen_8q_over_1q"] = (f"median {cd['vqa_eight_questions_median_s']:.3g} ÷ "
                                           f"{cd['vqa_one_question_median_s']:.3g} s; {run}")
    bd = s.get("blip_detail") or {}
    if bd:
        run = (f"blip_bench run at `{str(bd.get('commit') or '?')[:12]}` on {bd.get('measured_at')}"
               f"{' (QUICK: not speeds)' if bd.get('quick') else ''}")

        def sec(ms: float | None) -> str:
            return _fmt(None if ms is None else ms / 1e3)

        naive = f"{sec(bd.get('naive_p50_ms'))} s ({bd.get('naive_requests')} requests)"
        extra["blip_retrieve64_vs_naive"] = (
            f"p50 {naive} ÷ {sec(bd.get('served_p50_ms'))} s ({bd.get('served_requests')}); same top caption as "
            f"naive {bd.get('same_top_served_vs_naive')}; {run}")
        extra["blip_retrieve64_all_vs_naive"] = (
            f"p50 {naive} ÷ {sec(bd.get('served_all_p50_ms'))} s ({bd.get('served_all_requests')}); {run}")
        extra["blip_retrieve64_top5_same_order"] = f"{bd.get('top5_same_order')} requests; {run}"
        extra["blip_retrieve64_top5_overlap"] = f"mean {_fmt(bd.get('top5_mean_overlap'))} of 5; {run}"
        extra["blip_retrieve64_top1_agreement"] = f"{bd.get('top1_same')} requests; {run}"
        extra["blip_match64_before_over_after"] = (
            f"p50 {sec(bd.get('match_before_p50_ms'))} ÷ {sec(bd.get('match_after_p50_ms'))} s, "
            f"{bd.get('match_requests')} requests each, the paths alternating; /v1/match through the app "
            f"p50 {sec(bd.get('match_app_p50_ms'))} s; {run}")
        for key, side in (("blip_match64_after_mb", "after"), ("blip_match64_before_mb", "before")):
            pay = bd.get(f"match_{side}_payload") or {}
            if pay:
                extra[key] = (f"{pay['calls']} Triton call{'s' if pay['calls'] != 1 else ''}: "
                              f"{_fmt(pay['sent'] / 1e6)} MB sent + {_fmt(pay['received'] / 1e6)} MB returned; {run}")
    lines = [
        f"Measured by `make bench` at commit `{str(s.get('commit', '?'))[:12]}` on {s.get('measured_at')} "
        f"({s.get('bench_seconds')} s; other work on the cores ≤ {_fmt(s.get('foreign_cpu_share_max'))} of them "
        f"in every window; {_machine(s.get('machine'))}; engines {s.get('precision')}; front door "
        f"{(s.get('serve_composition') or {}).get('front')}"
        f"{'; QUICK: not speeds' if s.get('quick') else ''}). Source: `{source}`.",
        "",
        "| figure | what | target | measured | from | what limits it |",
        "|---|---|---|---|---|---|",
    ]
    limits = caption_limits(cd) | blip_limits(s.get("blip_detail") or {}) | run_limits(s)
    for key, what, limit in ROWS:  # today's targets, whatever the summary's run had
        limit = limits.get(key, limit)
        value, (op, goal) = s.get(key), TARGETS.get(key, ("", None))
        ok = None if value is None or goal is None else value >= goal if op == ">=" else value <= goal
        met = "" if ok is None else " ✓" if ok else " ✗"
        lines.append(f"| `{key}` | {what} | {f'{op} {goal}' if goal is not None else '—'} | **{_fmt(value)}**{met} | "
                     f"{extra.get(key, '')} | {limit} |")
    return "\n".join(lines) + "\n"


def update_readme(summary_path: Path, readme: Path = README) -> bool:
    """Rewrite the figures block of the README from `summary_path`; False when the README has no block."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        return False
    s = json.loads(summary_path.read_text())
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{markdown(s)}{END}{tail}")
    return True


def _relative(path: Path, summary: Path) -> str:
    """`path` as the summary's folder sees it (how `caption_detail.source` names it), else as given."""
    try:
        return str(path.resolve().relative_to(summary.resolve().parent))
    except ValueError:
        return str(path)


def from_runs(folder: Path) -> dict[str, Any]:
    """summary.json again, from what a bench run left in `folder`: raw.json, runs/*.json, caption/ and blip/."""
    from loadtests.bench import BenchSettings

    saved = json.loads((folder / "raw.json").read_text())
    raw, errors = saved["raw"], saved["errors"]
    runs = {}
    names = {f.name for f in dataclasses.fields(RunResult)}
    for path in sorted((folder / "runs").glob("*.json")):
        d = json.loads(path.read_text())
        runs[d["name"]] = RunResult(**{k: v for k, v in d.items() if k in names})
    settings = BenchSettings.from_json(raw["meta"]["settings"])
    return summary(SimpleNamespace(runs=runs, raw=raw, errors=errors, s=settings, out=folder))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Print (or write into loadtests/README.md) the figures of a summary.json.")
    p.add_argument("summary", type=Path, nargs="?", default=README.parent / "results" / "summary.json")
    p.add_argument("--from-runs", type=Path, metavar="RESULTS",
                   help="rebuild the summary from a bench run's files in RESULTS (raw.json, runs/, caption/, blip/) "
                        "and write it to --out")
    p.add_argument("--out", type=Path, help="with --from-runs: where the rebuilt summary.json goes")
    p.add_argument("--update-readme", action="store_true", help="rewrite the README's figures block")
    p.add_argument("--blip", type=Path, metavar="BLIP_SUMMARY",
                   help="first put the figures of this blip_bench summary.json (loadtests/results/blip/summary.json) "
                        "into the summary (the other figures stay)")
    p.add_argument("--caption", type=Path, metavar="CAPTION_SUMMARY",
                   help="first put the figures of this caption_bench summary.json (loadtests/results/caption/"
                        "summary.json) into the summary (the other figures stay)")
    args = p.parse_args(argv)
    if args.from_runs:
        if not args.out:
            p.error("--from-runs needs --out FILE")
        write_json(args.out, from_runs(args.from_runs))
        print(f"{args.out}: rebuilt from {args.from_runs}")
        return 0
    if args.caption:
        merge_caption(args.summary, json.loads(args.caption.read_text()), _relative(args.caption, args.summary))
    if args.blip:
        merge_blip(args.summary, json.loads(args.blip.read_text()), _relative(args.blip, args.summary))
    if args.update_readme:
        return 0 if update_readme(args.summary) else 1
    sys.stdout.write(markdown(json.loads(args.summary.read_text()), str(args.summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
