"""The levers of loadtests/README.md "Closing the gap", each measured against its baseline in one process.

Sections (`--only` picks some; results merge into `--out`, default loadtests/results/levers.json):

- `ort`: ONNX Runtime session options in-process (threads, graph optimisation, memory arena,
  spinning, parallel execution) for `tiny` and `small`;
- `int8`: dynamic int8 quantisation of the three engines: items/s and parity against fp32
  (VQA answers on rendered scenes for `tiny`; logits and embeddings for `small`);
- `transport`: Triton direct, `tiny`: encoded images through `vqa` against client-side
  decoding with uint8 pixels through the engines; HTTP with JSON tensors against binary tensors;
- `triton`: engine threads, ONNX Runtime thread spinning and instance counts, and int8
  engines, inside Triton (config.pbtxt parameters of a repository copy);
- `pool`: gRPC channel pool of the load client, 1 against 4 channels;
- `serve`: Ray Serve settings in front of `tiny` as installed: preprocessing as its own
  deployment (2 hops) or inline in the ingress (1 hop), ingress replicas, Triton channels,
  one-question calls sent whole to Triton's `vqa`, Ray's gRPC transport from proxy to replica;
- `front`: the HTTP front door, `tiny` /v1/vqa at c=32, variants in interleaved windows (a fresh
  Serve app per window, `--rounds` rounds): Ray's proxy with our middleware (the shipped front
  door until HAProxy replayed calls), without it, HAProxy, user code on the replica's main loop,
  Serve's access log off; then `small`'s repeated-image sequences with Triton's response cache on and off;
- `front-haproxy`: the same windows for HAProxy (shipped) against itself with user code on the
  replica's main loop, with Serve's access log off, and Ray's proxy;
- `queue-delay`: Triton's `max_queue_delay_microseconds` on `vqa` and the engines behind the public
  HTTP API (`tiny` /v1/vqa, HAProxy): c=32 req/s and the engines' average batch, and c=1 p50 (what
  a wait for a fuller batch costs a lone caller), in interleaved windows, a fresh Triton each;
- `small-engines`, `tiny-engines`: that preset's engine instances and ORT threads behind the public
  HTTP API (one-question /v1/vqa at c=32, interleaved windows, a fresh Triton and Serve app each);
- `quantizers`: kinds of int8 for `small`'s engines (ONNX Runtime dynamic per tensor, per channel,
  uint8 weights, static, transformer fusions, attention's MatMuls too, MatMulNBits 8-bit) and
  OpenVINO's CPU runtime on the same graphs, against PyTorch's dynamic int8 as the naive server runs
  it, in-process on one core, and where the shipped int8 item spends its time (`quantizers.py`).

Queue delay, preferred batch sizes, instances and engine threads are swept by `vtfuse tune`.

    python -m loadtests.levers [--only ort int8 ...] [--duration 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from loadtests import engine_bench, flops, grpc_driver, precision, quantizers, servers
from loadtests.common import REPO_ROOT, RESULTS_DIR, Sample, make_corpus, uncontended, write_json
from loadtests.loops import closed_loop

log = logging.getLogger("loadtests.levers")

TINY = REPO_ROOT / "model_repository"
SMALL = REPO_ROOT / "build" / "model_repository-small"
SECTIONS = (
    "ort", "int8", "triton", "transport", "pool", "serve", "front", "front-haproxy", "queue-delay", "small-engines",
    "tiny-engines", "quantizers",
)


def ort_options(repo: Path, batch: int, min_time_s: float) -> list[dict[str, Any]]:
    """Items/s at `batch` for each session-option variant (one changed at a time from the served default)."""
    base = engine_bench.IN_PROCESS
    variants = {
        "served (threads=cores, opt all, arena on, spinning off)": base,
        "spinning on (the first committed engine.py)": replace(base, spinning=True),
        "intra_threads=1": replace(base, intra_threads=1),
        "opt_level=basic": replace(base, opt_level="basic"),
        "opt_level=disable": replace(base, opt_level="disable"),
        "mem_arena=off": replace(base, mem_arena=False),
        "execution_mode=parallel, inter_threads=2": replace(base, parallel=True, inter_threads=2),
    }
    rows = []
    cfg = engine_bench.repository_config(repo)
    paths = precision.engine_files(cfg.name, "fp32")  # the options measured on the fp32 graphs
    for label, settings in variants.items():
        eng = engine_bench.Engines(paths, cfg, settings)
        r, share, _ = uncontended(lambda eng=eng: eng.time_batch(batch, min_time_s), label)
        rows.append({"variant": label, **r, "foreign_cpu_share": share})
        log.info("   ort %s %-50s %8.1f items/s", cfg.name, label, r["items_per_s"])
    return rows


def _answers_of(engines: engine_bench.Engines, corpus: list[Sample], repo: Path) -> np.ndarray:
    from serving.model.preprocess import decode_image, load_tokenizer, tokenize

    ckpt = repo / "fusion" / "1" / "checkpoint"
    tok = load_tokenizer(ckpt / "tokenizer.json")
    cfg = engines.cfg
    pixels = np.stack([decode_image(s.image, cfg.image_size) for s in corpus])
    ids, mask = tokenize(tok, [s.question for s in corpus], cfg.max_text_len)
    return engines.run(pixels, ids, mask)["VQA_LOGITS"].argmax(axis=1)


def int8(repo: Path, batch: int, min_time_s: float, trained: bool) -> dict[str, Any]:
    """int8 against fp32: items/s at `batch`, output differences, and VQA accuracy when the weights are trained."""
    cfg = engine_bench.repository_config(repo)
    files = {p: precision.engine_files(cfg.name, p) for p in ("fp32", "int8")}
    fp32 = engine_bench.Engines(files["fp32"], cfg)
    q = engine_bench.Engines(files["int8"], cfg)
    x = fp32.inputs(16, seed=1)
    a, b = fp32.run(*x), q.run(*x)
    parity = {
        name: {
            "max_abs_diff": float(np.abs(a[name] - b[name]).max()),
            "max_abs_ref": float(np.abs(a[name]).max()),
        }
        for name in ("VQA_LOGITS", "ITM_LOGIT", "IMAGE_EMBEDDING", "TEXT_EMBEDDING")
    }
    cosines = [(a[k] * b[k]).sum(axis=1).min() for k in ("IMAGE_EMBEDDING", "TEXT_EMBEDDING")]
    parity["embedding_cosine_min"] = float(min(cosines))
    agree = a["VQA_LOGITS"].argmax(axis=1) == b["VQA_LOGITS"].argmax(axis=1)
    parity["vqa_argmax_agreement_random_inputs"] = float(agree.mean())
    out: dict[str, Any] = {
        "preset": cfg.name,
        "fp32": uncontended(lambda: fp32.time_batch(batch, min_time_s), "fp32")[0],
        "int8": uncontended(lambda: q.time_batch(batch, min_time_s), "int8")[0],
        "parity": parity,
        "model_bytes": {
            p: sum(f.stat().st_size for f in files[p].values()) for p in ("fp32", "int8")
        },
    }
    if trained:
        corpus = make_corpus(200, seed=11)
        truth = np.array([s.answer for s in corpus])
        answers = np.array(json.loads((repo / "fusion" / "1" / "checkpoint" / "answers.json").read_text()))
        pa, pb = answers[_answers_of(fp32, corpus, repo)], answers[_answers_of(q, corpus, repo)]
        out["vqa_accuracy"] = {"fp32": float((pa == truth).mean()), "int8": float((pb == truth).mean()),
                               "agreement": float((pa == pb).mean()), "samples": len(corpus)}
    out["speedup"] = out["int8"]["items_per_s"] / out["fp32"]["items_per_s"]
    log.info("   int8 %s: %.1f → %.1f items/s (×%.2f)", cfg.name, out["fp32"]["items_per_s"],
             out["int8"]["items_per_s"], out["speedup"])
    return out


async def _http_image_encoder(url: str, corpus: list[Sample], binary: bool, c: int, d: float, w: float) -> Any:
    import tritonclient.http.aio as httpaio
    from tritonclient.http import InferInput, InferRequestedOutput

    pre = grpc_driver.engine_inputs(corpus, TINY)
    client = httpaio.InferenceServerClient(url, conn_limit=c)

    async def call(i: int) -> int:
        t = InferInput("PIXELS", list(pre[i % len(pre)][0].shape), "UINT8")
        t.set_data_from_numpy(pre[i % len(pre)][0], binary_data=binary)
        await client.infer("image_encoder", [t], outputs=[InferRequestedOutput("IMAGE_FEATURES", binary_data=binary)])
        return 1

    try:
        return await closed_loop(call, c, d, w, name=f"http-image_encoder-{'binary' if binary else 'json'}",
                                 classify=grpc_driver.classify)
    finally:
        await client.close()


def transport(corpus: list[Sample], duration: float, warmup: float) -> dict[str, Any]:
    """Encoded bytes through `vqa` against uint8 pixels through the engines; JSON against binary HTTP tensors."""
    rows = {}
    with servers.triton(TINY, "levers-transport") as t:
        for target in ("vqa", "engines"):
            r, share, _ = uncontended(lambda target=target: asyncio.run(grpc_driver.drive(
                t.url_grpc, corpus, target=target, concurrency=32, duration_s=duration, warmup_s=warmup,
                repository=TINY, name=f"grpc-{target}")), target)
            rows[f"grpc {target} c32"] = r.to_dict() | {"foreign_cpu_share": share}
        for binary in (False, True):
            r, share, _ = uncontended(lambda binary=binary: asyncio.run(_http_image_encoder(
                t.url_http.removeprefix("http://"), corpus, binary, 32, duration, warmup)), "http")
            rows[f"http image_encoder {'binary' if binary else 'json'} c32"] = r.to_dict() | {
                "foreign_cpu_share": share}
    return _brief(rows)


def pool(corpus: list[Sample], duration: float, warmup: float) -> dict[str, Any]:
    """The load client's gRPC channels: 1 against 4, `vqa` at c=32 and c=64."""
    rows = {}
    with servers.triton(TINY, "levers-pool") as t:
        for c in (32, 64):
            for n in (1, 4):
                r, share, _ = uncontended(lambda c=c, n=n: asyncio.run(grpc_driver.drive(
                    t.url_grpc, corpus, concurrency=c, duration_s=duration, warmup_s=warmup, pool_size=n,
                    name=f"pool{n}-c{c}")), f"pool {n}")
                rows[f"pool {n} c{c}"] = r.to_dict() | {"foreign_cpu_share": share}
    return _brief(rows)


def serve(corpus: list[Sample], duration: float, warmup: float) -> dict[str, Any]:
    """Ray Serve in front of one Triton (`tiny` as installed): hops, replicas, Triton channels, /v1/vqa c=32."""
    from loadtests import http_driver

    repo = TINY
    off: dict[str, Any] = {"server_vqa": None}  # every call runs the three engines from the ingress
    variants = [
        ("preprocess deployment (2 hops), 1 ingress, pool 2",
         {"preprocess": "deployment", "ingress_replicas": 1} | off),
        ("preprocess inline (1 hop), 1 ingress, pool 2", {"preprocess": "inline", "ingress_replicas": 1} | off),
        ("preprocess inline, 2 ingress replicas, pool 2", {"preprocess": "inline", "ingress_replicas": 2} | off),
        ("preprocess inline, 1 ingress, pool 1", {"preprocess": "inline", "ingress_replicas": 1, "pool_size": 1} | off),
        ("preprocess inline, 1 ingress, pool 4", {"preprocess": "inline", "ingress_replicas": 1, "pool_size": 4} | off),
        ("inline, 2 ingress, one-question calls to Triton's vqa (shipped)", {"preprocess": "inline",
                                                                             "ingress_replicas": 2}),
        # Ray's proxy talks to replicas over gRPC instead of actor calls (part of Ray's
        # RAY_SERVE_THROUGHPUT_OPTIMIZED mode; not shipped: see loadtests/README.md).
        ("shipped + RAY_SERVE_PROXY_USE_GRPC=1", {"env": {"RAY_SERVE_PROXY_USE_GRPC": "1"}}),
    ]
    rows = {}
    with servers.triton(repo, "levers-serve") as t:
        r, share, _ = uncontended(lambda: asyncio.run(grpc_driver.drive(
            t.url_grpc, corpus, concurrency=32, duration_s=duration, warmup_s=warmup, name="direct")), "direct")
        rows["Triton direct gRPC (0 Serve hops)"] = r.to_dict() | {"foreign_cpu_share": share}
        for label, kw in variants:
            try:
                with servers.serve_app(t.url_grpc, repo, "tiny", "levers", **kw) as app:
                    r, share, _ = uncontended(lambda app=app, label=label: asyncio.run(http_driver.drive(
                        app.url, corpus, concurrency=32, duration_s=duration, warmup_s=warmup, name=label)), label)
                rows[label] = r.to_dict() | {"foreign_cpu_share": share}
            except Exception as e:  # noqa: BLE001 — one variant failing keeps the others
                rows[label] = {"error": str(e)}
            log.info("   serve %-55s %s", label, rows[label].get("throughput_rps"))
    return _brief(rows)


MAIN_LOOP_ENV = {  # Ray's throughput-optimised settings, without its switch to direct ingress
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_LOG_TO_STDERR": "0", "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000"}
FRONT_VARIANTS: dict[str, dict[str, Any]] = {
    "ray proxy + middleware (shipped)": {"front": "ray"},
    "ray proxy, no middleware": {"front": "ray", "proxy_middleware": False},
    "haproxy (VTFUSE_FRONT=haproxy)": {"front": "haproxy"},
    "ray proxy, user code on the replica's main loop": {"front": "ray", "env": MAIN_LOOP_ENV},
    "ray proxy, Serve access log off": {"front": "ray", "access_log": False},
}


# The HAProxy front door (shipped since it replays and answers JSON) against variants of itself.
HAPROXY_VARIANTS: dict[str, dict[str, Any]] = {
    "haproxy (shipped)": {"front": "haproxy"},
    "haproxy, user code on the replica's main loop": {"front": "haproxy", "env": MAIN_LOOP_ENV},
    "haproxy, Serve access log off": {"front": "haproxy", "access_log": False},
    "ray proxy + middleware": {"front": "ray"},
}


def front_windows(corpus: list[Sample], duration: float, warmup: float, rounds: int,
                  variants: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """`rounds` interleaved c=32 windows of `tiny` one-question /v1/vqa per front-door variant, a fresh stack each."""
    from loadtests import http_driver

    windows: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}
    with servers.triton(TINY, "levers-front") as t:
        for _ in range(rounds):
            for label, kw in variants.items():
                try:
                    with servers.serve_app(t.url_grpc, TINY, "tiny", "levers-front", **kw) as app:
                        r, share, _ = uncontended(lambda app=app, label=label: asyncio.run(http_driver.drive(
                            app.url, corpus, concurrency=32, duration_s=duration, warmup_s=warmup, name=label)),
                            label, 1, 1.0)
                    windows[label].append({"throughput_rps": round(r.throughput_rps, 1), "p99_ms": round(r.p99_ms),
                                           "errors": r.error_count, "foreign_cpu_share": share})
                except Exception as e:  # noqa: BLE001 — one variant failing keeps the others
                    windows[label].append({"error": str(e)[:300]})
                log.info("   front %-50s %s", label, windows[label][-1])
    return windows


def _mean_over(windows: dict[str, list[dict[str, Any]]], baseline: str) -> dict[str, float]:
    """Each variant's mean req/s ÷ the baseline's."""
    base = [w["throughput_rps"] for w in windows[baseline] if "throughput_rps" in w]
    return {
        k: round(float(np.mean([w["throughput_rps"] for w in v if "throughput_rps" in w])) / float(np.mean(base)), 3)
        for k, v in windows.items() if base and any("throughput_rps" in w for w in v)
    }


def front_haproxy(corpus: list[Sample], duration: float, warmup: float, rounds: int) -> dict[str, Any]:
    """HAProxy (shipped) against its variants and Ray's proxy, `rounds` interleaved windows each."""
    windows = front_windows(corpus, duration, warmup, rounds, HAPROXY_VARIANTS)
    return {"tiny vqa c32 windows": windows, "mean_over_shipped": _mean_over(windows, "haproxy (shipped)")}


def front(corpus: list[Sample], duration: float, warmup: float, rounds: int) -> dict[str, Any]:
    """Ray's proxy (shipped until HAProxy replayed calls) against its variants and HAProxy, then repeated images."""
    from loadtests import repeat_image

    windows = front_windows(corpus, duration, warmup, rounds, FRONT_VARIANTS)
    out: dict[str, Any] = {"tiny vqa c32 windows": windows,
                           "mean_over_shipped": _mean_over(windows, "ray proxy + middleware (shipped)")}
    if SMALL.exists():
        images, questions = repeat_image.corpus_for(5)
        rep: dict[str, Any] = {}
        for cache, mb in (("on", None), ("off", 0)):
            with servers.triton(SMALL, f"levers-repeat-{cache}", response_cache_mb=mb) as t:
                with servers.serve_app(t.url_grpc, SMALL, "small", f"levers-repeat-{cache}") as app:
                    rep[cache] = repeat_image.sequences(app.url, images, questions, 8, t.url_metrics)
        rep["speedup"] = rep["off"]["median_wall_ms"] / rep["on"]["median_wall_ms"]
        out["small repeated image, cache on vs off"] = rep
    return out


# max_queue_delay_microseconds of (vqa, the three engines).
QUEUE_DELAYS: dict[str, tuple[int, int]] = {
    "vqa 0 us, engines 0 us": (0, 0),
    "vqa 2000 us, engines 0 us": (2000, 0),
    "vqa 4000 us, engines 0 us": (4000, 0),
    "vqa 4000 us, engines 1000 us": (4000, 1000),
}


def http_windows(repo: Path, preset: str, edits: dict[str, Callable[..., None]], corpus: list[Sample],
                 duration: float, warmup: float, rounds: int, tag: str, lone: bool = False) -> dict[str, list[dict]]:
    """`rounds` interleaved c=32 windows of one-question /v1/vqa per variant (a config edit of `repo`'s models),
    each on a fresh Triton and Serve app: req/s, p99, the engines' and `vqa`'s average batch; with `lone`,
    also the p50 of one caller alone (what a wait for a fuller batch costs it)."""
    from loadtests import http_driver

    windows: dict[str, list[dict[str, Any]]] = {k: [] for k in edits}
    for _ in range(rounds):
        for label, edit in edits.items():
            dest = servers.variant_repository(repo, REPO_ROOT / "build" / "bench" / f"levers-{tag}", edit)
            try:
                # No response cache: the corpus repeats its images, and the lone caller's would be answered from it.
                with servers.triton(dest, f"levers-{tag}", response_cache_mb=0) as t, servers.serve_app(
                    t.url_grpc, dest, preset, f"levers-{tag}"
                ) as app:
                    before = grpc_driver.scrape(t.url_metrics)
                    r, share, _ = uncontended(lambda app=app, label=label: asyncio.run(http_driver.drive(
                        app.url, corpus, concurrency=32, duration_s=duration, warmup_s=warmup, name=label)), label, 1)
                    batches = grpc_driver.batch_delta(before, grpc_driver.scrape(t.url_metrics))
                    row = {"throughput_rps": round(r.throughput_rps, 2), "p99_ms": round(r.p99_ms),
                           "engines_avg_batch": batches["engines_avg_batch"],
                           "avg_batch": {m: v.get("avg_batch") for m, v in batches["models"].items()},
                           "errors": r.error_count, "foreign_cpu_share": share}
                    if lone:
                        one = asyncio.run(http_driver.drive(app.url, corpus, concurrency=1, duration_s=duration / 2,
                                                            warmup_s=1.0, name=f"{label} c=1"))
                        row |= {"c1_p50_ms": round(one.p50_ms, 1), "errors": r.error_count + one.error_count}
                windows[label].append(row)
            except Exception as e:  # noqa: BLE001 — one variant failing keeps the others
                windows[label].append({"error": str(e)[:300]})
            log.info("   %s %-40s %s", tag, label, windows[label][-1])
    return windows


def _c1_medians(windows: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Each variant's median c=1 p50 over its windows (those measured with `lone`)."""
    return {k: round(float(np.median([w["c1_p50_ms"] for w in v if "c1_p50_ms" in w])), 1)
            for k, v in windows.items() if any("c1_p50_ms" in w for w in v)}


def queue_delay(corpus: list[Sample], duration: float, warmup: float, rounds: int) -> dict[str, Any]:
    """Queue delays behind the public HTTP API: c=32 req/s and engine batch, c=1 p50; interleaved windows."""
    edits: dict[str, Callable[..., None]] = {}
    for label, (vqa_us, engine_us) in QUEUE_DELAYS.items():
        def edit(model: str, config: Any, vqa_us: int = vqa_us, engine_us: int = engine_us) -> None:
            if model == "vqa":
                config.dynamic_batching.max_queue_delay_microseconds = vqa_us
            elif model in flops.ENGINES:
                config.dynamic_batching.max_queue_delay_microseconds = engine_us

        edits[label] = edit
    windows = http_windows(TINY, "tiny", edits, corpus, duration, warmup, rounds, "queue-delay", lone=True)
    return {"tiny vqa http windows": windows, "mean_over_shipped": _mean_over(windows, "vqa 0 us, engines 0 us"),
            "c1_p50_ms_median": _c1_medians(windows)}


# Instances and ORT threads of the engines behind the public HTTP API: {model: (instances, threads)}.
# Until lever 40 the engines ran 2 instances x 2 threads, the baseline of results/levers.json's
# `small-engines*` and `tiny-engines` entries ("as installed (2 instances x 2 threads each)").
INSTALLED_ENGINES = "as installed (2 instances x 1 thread each)"
_ENGINES = ("image_encoder", "text_encoder", "fusion")
ENGINE_VARIANTS: dict[str, dict[str, tuple[int, int]]] = {
    INSTALLED_ENGINES: {},
    "every engine 2 instances x 2 threads": {e: (2, 2) for e in _ENGINES},
    "image_encoder 1 instance x 2 threads": {"image_encoder": (1, 2)},
    "every engine 1 instance x 2 threads": {e: (1, 2) for e in _ENGINES},
}


def engine_variants(preset: str, corpus: list[Sample], duration: float, warmup: float, rounds: int,
                    only: list[str] | None = None) -> dict[str, Any]:
    """The engines' instances and threads (`tiny` or `small`) behind the public HTTP API, c=32; interleaved windows.

    `only`: the variants whose label starts with one of these (the installed one is always run)."""
    edits: dict[str, Callable[..., None]] = {}
    for label, settings in ENGINE_VARIANTS.items():
        if only and settings and not label.startswith(tuple(only)):
            continue
        def edit(model: str, config: Any, settings: dict[str, tuple[int, int]] = settings) -> None:
            if model in settings:
                config.instance_group[0].count = settings[model][0]
                config.parameters["intra_op_threads"].string_value = str(settings[model][1])

        edits[label] = edit
    repo = SMALL if preset == "small" else TINY
    windows = http_windows(repo, preset, edits, corpus, duration, warmup, rounds, f"{preset}-engines", lone=True)
    return {f"{preset} vqa http windows": windows, "mean_over_shipped": _mean_over(windows, INSTALLED_ENGINES),
            "c1_p50_ms_median": _c1_medians(windows)}


def triton_engines(repo: Path, corpus: list[Sample], duration: float, warmup: float) -> dict[str, Any]:
    """Engine threads, ORT spinning and instances inside Triton (`vqa` at c=32), one repository copy each."""
    variants = {
        "threads 2, spinning on, 1 instance (first committed)": {"allow_spinning": "1"},
        "threads 2, spinning off, 1 instance": {"allow_spinning": "0"},
        "threads 1, 1 instance": {"intra_op_threads": "1"},
        "threads 1, 2 instances": {"intra_op_threads": "1", "count": "2"},
        "threads 2, spinning off, 2 instances": {"allow_spinning": "0", "count": "2"},
        "int8 engines, threads 1, 2 instances": {"intra_op_threads": "1", "count": "2", "int8": "1"},
    }
    rows = {}
    name = engine_bench.repository_config(repo).name
    for label, params in variants.items():
        def edit(model: str, config: Any, params: dict[str, str] = params) -> None:
            if model not in flops.ENGINES:
                return
            for k, v in params.items():
                if k == "int8":
                    continue
                if k == "count":
                    config.instance_group[0].count = int(v)
                else:
                    config.parameters[k].string_value = v

        dest = REPO_ROOT / "build" / "bench" / f"levers-{name}"
        swap = precision.replacements(name, "int8" if params.get("int8") else "fp32")
        servers.variant_repository(repo, dest, edit, swap)
        with servers.triton(dest, f"levers-{name}") as t:
            r, share, _ = uncontended(lambda t=t, label=label: asyncio.run(grpc_driver.drive(
                t.url_grpc, corpus, concurrency=32, duration_s=duration, warmup_s=warmup,
                metrics_url=t.url_metrics, name=label)), label)
        rows[label] = r.to_dict() | {"engines_avg_batch": r.extra["triton_batches"]["engines_avg_batch"],
                                     "foreign_cpu_share": share}
        log.info("   triton %s %-50s %8.1f req/s p99 %.0f ms", name, label, r.throughput_rps, r.p99_ms)
    keep = ("throughput_rps", "p50_ms", "p99_ms", "error_count", "engines_avg_batch", "foreign_cpu_share")
    return {k: {f: v.get(f) for f in keep} for k, v in rows.items()}


def _brief(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    keep = ("throughput_rps", "p50_ms", "p99_ms", "error_count", "completed", "error", "foreign_cpu_share")
    return {k: {f: v.get(f) for f in keep if f in v} for k, v in rows.items()}


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--min-time", type=float, default=2.0, help="seconds per in-process measurement")
    p.add_argument("--rounds", type=int, default=3, help="front: interleaved windows per variant")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "levers.json")
    p.add_argument("--variants", nargs="+", help="small-/tiny-engines: only the variants whose label starts so")
    p.add_argument("--key", help="small-/tiny-engines: its key in --out (default: the section), to keep a repeat apart")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)  # stop every server first, as Ctrl-C does
    signal.signal(signal.SIGINT, _interrupt)
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    corpus = make_corpus(64)
    for section in args.only:
        log.info("== %s", section)
        if section == "ort":
            results["ort"] = {"tiny batch 32": ort_options(TINY, 32, args.min_time)}
            if SMALL.exists():
                results["ort"]["small batch 16"] = ort_options(SMALL, 16, args.min_time)
        elif section == "int8":
            results["int8"] = {"tiny": int8(TINY, 32, args.min_time, trained=True)}
            if SMALL.exists():
                results["int8"]["small"] = int8(SMALL, 16, args.min_time, trained=False)
        elif section == "transport":
            results["transport"] = transport(corpus, args.duration, args.warmup)
        elif section == "pool":
            results["pool"] = pool(corpus, args.duration, args.warmup)
        elif section == "serve":
            results["serve"] = serve(corpus, args.duration, args.warmup)
        elif section == "front":
            results["front"] = front(corpus, args.duration, args.warmup, args.rounds)
        elif section == "front-haproxy":
            results["front-haproxy"] = front_haproxy(corpus, args.duration, args.warmup, args.rounds)
        elif section == "queue-delay":
            results["queue-delay"] = queue_delay(corpus, args.duration, args.warmup, args.rounds)
        elif section in ("small-engines", "tiny-engines"):
            preset = section.split("-")[0]
            results[args.key or section] = engine_variants(preset, corpus, args.duration, args.warmup, args.rounds,
                                                           args.variants)
        elif section == "quantizers":
            results["quantizers"] = quantizers.compare("small", SMALL, corpus, min_time_s=3 * args.min_time)
        elif section == "triton":
            results["triton"] = {"tiny": triton_engines(TINY, corpus, args.duration, args.warmup)}
            if SMALL.exists():
                results["triton"]["small"] = triton_engines(SMALL, corpus, 2 * args.duration, args.warmup)
        write_json(args.out, results)
    json.dump(results, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
