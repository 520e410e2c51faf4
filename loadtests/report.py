"""summary.json from one bench run: the benchmark ratios, each with the raw figures it is computed from.

Keys (numbers; `null` where a setup failed, the reason under `errors`):

- `engine_efficiency`: `small` in-process ONNX Runtime, fp32 graphs, at its best batch, FLOPs/item ×
  items/s ÷ the measured fp32 matmul FLOP/s; where the served engines are int8,
  `engine_efficiency_int8` holds the same for them against the int8 (MatMulInteger) ceiling;
- `served_over_engine_grpc` / `served_over_engine_http`: `small` items/s through Triton direct
  gRPC / Ray Serve → Triton at c=32 ÷ in-process items/s of the same engines at their best
  batch (the conservative choice; the ratio at the in-process row nearest the batch the engines
  ran at is beside it, `at_engines_batch`);
- `vs_naive_throughput_tiny`, `vs_naive_throughput_small_http`, `vs_naive_throughput_tiny_http`:
  throughput ÷ the naive server's at c=32, each with a `..._p99_ms` entry holding both p99s;
- `avg_batch_c32`: items ÷ executions over the three engines, Triton direct `tiny` at c=32;
- `batching_speedup_tiny`: Triton direct `tiny` c=32 throughput, dynamic batching on ÷ off;
- `retrieve64_over_vqa1`: median latency of one image × 64 captions through /v1/retrieve ÷ one
  single-question /v1/vqa, both at c=1 through Ray Serve → Triton (`tiny`).
"""

from __future__ import annotations

import time
from typing import Any

from loadtests.common import RunResult, git_commit, machine, versions
from loadtests.engine_bench import at_batch

C = 32
TARGETS = {
    "engine_efficiency": (">=", 0.6),
    "served_over_engine_grpc": (">=", 0.85),
    "served_over_engine_http": (">=", 0.75),
    "vs_naive_throughput_tiny": (">=", 2.0),
    "vs_naive_throughput_small_http": (">=", 1.3),
    "avg_batch_c32": (">=", 8.0),
    "batching_speedup_tiny": (">=", 2.0),
    "retrieve64_over_vqa1": ("<=", 4.0),
}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def _run(runs: dict[str, RunResult], name: str) -> RunResult | None:
    r = runs.get(name)
    return r if r is not None and r.completed else None


def _served_over_engine(run: RunResult | None, engine: dict[str, Any] | None) -> tuple[float | None, dict[str, Any]]:
    if run is None or engine is None:
        return None, {}
    avg = (run.extra.get("triton_batches") or {}).get("engines_avg_batch") or 1.0
    row = at_batch(engine, avg)
    best = engine["best"]
    return _ratio(run.items_per_s, best["items_per_s"]), {
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


def summary(bench: Any, started: float) -> dict[str, Any]:
    """The summary of a finished Bench (loadtests.bench.Bench)."""
    runs: dict[str, RunResult] = bench.runs
    raw: dict[str, Any] = bench.raw
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
    sog, details["served_over_engine_grpc"] = _served_over_engine(grpc_small, raw.get("engine_small"))
    soh, details["served_over_engine_http"] = _served_over_engine(http_small, raw.get("engine_small"))

    grpc_tiny = _run(runs, f"triton-grpc-tiny-c{C}")
    http_tiny = _run(runs, f"serve-http-tiny-c{C}")
    naive_tiny = _run(runs, f"naive-tiny-c{C}")
    naive_small = _run(runs, f"naive-small-c{C}")
    vnt, p99_tiny = _vs_naive(grpc_tiny, naive_tiny, "triton_grpc")
    vns, p99_small = _vs_naive(http_small, naive_small, "serve_http")
    vnth, p99_tiny_http = _vs_naive(http_tiny, naive_tiny, "serve_http")

    avg_batch = None
    if grpc_tiny is not None:
        tb = grpc_tiny.extra.get("triton_batches", {})
        avg_batch = round(tb["engines_avg_batch"], 2) if tb.get("engines_avg_batch") else None
        details["avg_batch_c32"] = {m: v for m, v in tb.get("models", {}).items()}

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
        "vs_naive_throughput_tiny": vnt,
        "vs_naive_throughput_tiny_p99_ms": p99_tiny or None,
        "vs_naive_throughput_small_http": vns,
        "vs_naive_throughput_small_http_p99_ms": p99_small or None,
        "vs_naive_throughput_tiny_http": vnth,
        "vs_naive_throughput_tiny_http_p99_ms": p99_tiny_http or None,
        "avg_batch_c32": avg_batch,
        "batching_speedup_tiny": speedup,
        "retrieve64_over_vqa1": reuse,
        "machine": machine(),
        "versions": versions(),
        "commit": git_commit(),
        "quick": bench.s.quick,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "bench_seconds": round(time.time() - started, 1),
        "repositories": raw.get("repositories"),
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
                         "windows_per_c32_run": bench.s.repeats, "kept": "median throughput"},
    }
    out["targets"] = {
        k: {"target": f"{op} {v}", "met": None if out[k] is None else (out[k] >= v if op == ">=" else out[k] <= v)}
        for k, (op, v) in TARGETS.items()
    }
    if p99_tiny:
        out["targets"]["vs_naive_p99_tiny_under_half"] = {
            "target": "triton p99 < naive p99 / 2", "met": p99_tiny["triton_grpc"] < p99_tiny["naive"] / 2,
        }
    out["details"] = details
    out["runs"] = sorted(runs)
    out["errors"] = bench.errors
    return out
