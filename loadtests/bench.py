"""`make bench`: every benchmark figure measured in one run on this machine; summary.json, per-run JSON, plots.

Setups are measured one at a time (everything else stopped), the load generator on the same
machine. The offered load of every comparison is a closed loop at concurrency 32 for the
same duration. Triton runs without its response cache except where the cache itself is measured
(step 5): the load corpus repeats its images, and the naive server keeps no image features. Steps:

1. the machine's fp32 matmul ceiling (4096², ONNX Runtime's thread count), its int8 one where
   the engines are int8, and FLOPs/item;
2. in-process ONNX Runtime engines per batch size (`tiny`, `small` as installed; `small` fp32
   from its stage-1 folder too when the installed engines are int8, for `engine_efficiency`);
3. Triton direct gRPC `vqa` (`tiny`): a concurrency sweep, engine batch counts at c=32;
   then the same repository with dynamic batching removed from every model;
4. Ray Serve → Triton (`tiny`): /v1/vqa at c=32, one image × 64 captions through
   /v1/retrieve against one single-question /v1/vqa at c=1;
5. `small`: Triton direct gRPC and Ray Serve → Triton at c=32, the same with the other precision's
   engines (Triton direct, for `int8_gain_small`), and 8 sequential one-question /v1/vqa calls
   per image with Triton's response cache on (as shipped) and off (`repeat_image_speedup_small`,
   a fresh stack each);
   The `tiny` /v1/vqa c=32 run is repeated through the other HTTP front door (serving/app/front.py);
6. the naive server (FastAPI + PyTorch eager, one worker per core) on `tiny` and `small`, at the
   precision of the served engines (int8: PyTorch's dynamic quantisation of the Linear layers),
   and fp32 at c=32 too when that differs (the older, mixed-precision ratios in `details.history`);
7. paired rounds for `vs_naive_http_*`: the public HTTP API and the naive server at c=32 in
   adjacent windows, fresh stacks each, the order alternating between rounds; the ratio is the
   median over rounds of each round's ratio (steps 4–6 measure the two sides ~15 minutes apart,
   and windows of one setup that far apart differ by up to ±20 % on this machine). `small`'s rounds
   also time its in-process engines next to the API window, for `served_over_engine_http`;
8. BLIP-base captioning and generative VQA (loadtests/caption_bench.py → `caption/` of the results
   folder): `caption_vs_naive` from paired rounds at c=16 against a naive `generate()` server, rows per
   decoder step, time to first token and per output token, 8 questions ÷ 1. `--only caption` runs this
   step alone and puts its figures into the existing summary.json (and the README's table), the other
   figures as they were measured; `--quick` leaves it out (`--quick --only caption` runs its smoke run).

`--quick` is a smoke run: seconds-long windows, a 2048² matmul, and `tiny` stands in for
`small` (no `small` repository needed; its setups reuse tiny's servers); its figures say
nothing about speed.

    python -m loadtests.bench [--quick] [--out loadtests/results] [--only caption | --skip caption]
    python -m loadtests.report --from-runs loadtests/results --out FILE   # summary.json again, from raw.json + runs/
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from export.engine_layout import ENGINE_THREADS
from export.onnx_export import default_onnx_dir
from loadtests import engine_bench, flops, grpc_driver, http_driver, precision, repeat_image, servers, wrk_driver
from loadtests.census import CpuCensus
from loadtests.common import (
    REPO_ROOT,
    RunResult,
    Sample,
    git_commit,
    machine,
    make_corpus,
    uncontended,
    versions,
    wait_quiet,
    write_json,
)
from loadtests.rounds import STRAY, order, strayed
from serving import progress
from serving.triton.launcher import TritonServer

log = logging.getLogger("loadtests.bench")

TINY_REPO = REPO_ROOT / "model_repository"
SMALL_REPO = REPO_ROOT / "build" / "model_repository-small"
C = 32  # the offered load of every comparison
CONTENDED = 0.10  # share of all cores other processes may take during a measurement before it is repeated
T = TypeVar("T")
# Throughput and latency runs start Triton without its response cache: the corpus repeats its 64
# images, which the cache would answer from image features it kept, while the naive server computes
# every one. What the cache gains on repeated images is its own figure (`repeat_image_speedup_small`).
NO_CACHE = 0
# Step 7b's second image mix: PNG renders of 96-256 px only (the main corpus: 64-320 px, half JPEG).
PNG_MIX_SIDES = (96, 128, 160, 192, 224, 256)
NAIVE_PRECISIONS = ("fp32", "int8")  # the naive server a user would write, both ways: the faster one is divided by


@dataclass(frozen=True)
class BenchSettings:
    """Durations and sweeps of one bench run."""

    quick: bool = False
    duration_s: float = 20.0
    warmup_s: float = 4.0
    small_duration_s: float = 30.0
    sweep: tuple[int, ...] = (1, 4, 8, 16, 32, 64)
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    engine_min_time_s: float = 2.0
    matmul_reps: int = 5
    matmul_n: int = 4096
    latency_requests_s: float = 10.0  # c=1 windows of the retrieve/vqa latency ratio
    repeat_sequences: int = 5  # images, each asked 8 one-question /v1/vqa calls in a row (cache on vs off)
    repeat_blip: bool = True  # step 5b: 8 one-text /v1/match calls on one image, BLIP-base (quick: a tiny BLIP)
    attempts: int = 3  # measurements taken while other work used the CPU are repeated
    # Every c=32 comparison run is measured this many times back to back and the median-throughput
    # window kept (Ray's figures on 2 shared cores move ±15 % between windows; all are in the run JSON).
    repeats: int = 3
    paired_rounds: int = 5  # step 7: rounds of (public HTTP API, naive fp32, naive int8) adjacent windows per preset
    stray: float = STRAY  # step 7: a round with a side this far from its median is run again once (loadtests/rounds.py)
    traffic: bool = True  # step 7b: `tiny`'s comparison with wrk and with a second image mix
    serve: bool = True
    caption: bool = True  # step 8 (loadtests/caption_bench.py); quick runs leave it out (~5 min on its own)
    wait_quiet_s: float = 0.0  # step 8: before each of its measuring stages, wait up to this long for quiet
    tiny_repo: Path = TINY_REPO
    small_repo: Path = SMALL_REPO
    small_onnx: Path = default_onnx_dir("small")  # stage-1 folder of `small`: its fp32 graphs

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON (paths as text): raw.json keeps them, `report --from-runs` reads them back."""
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BenchSettings:
        """Settings written by `to_json` (keys this version does not know are left out)."""
        kinds = {f.name: f.type for f in fields(cls)}
        out: dict[str, Any] = {}
        for k, v in d.items():
            if k not in kinds:
                continue
            out[k] = Path(v) if "Path" in str(kinds[k]) else tuple(v) if isinstance(v, list) else v
        return cls(**out)

    @property
    def shared(self) -> bool:
        """True when `small` is the tiny repository (quick runs): its setups reuse tiny's servers."""
        return self.small_repo.resolve() == self.tiny_repo.resolve()

    @property
    def small_role(self) -> str:
        """The preset measured as `small`: `tiny` where it stands in (quick runs)."""
        return "tiny" if self.shared else "small"

    @classmethod
    def quick_run(cls, serve: bool = True, tiny_repo: Path = TINY_REPO) -> BenchSettings:
        """The smoke run's settings: `tiny` in both roles."""
        return cls(
            quick=True, duration_s=3.0, warmup_s=1.0, small_duration_s=3.0, sweep=(1, C), batches=(1, 8),
            engine_min_time_s=0.2, matmul_reps=1, matmul_n=2048, latency_requests_s=2.0, serve=serve, attempts=1,
            repeats=1, repeat_sequences=2, paired_rounds=1, caption=False,
            tiny_repo=tiny_repo, small_repo=tiny_repo, small_onnx=default_onnx_dir("tiny"),
        )


class Bench:
    """One bench run: stages write their raw results under `out/`, failures are recorded, not fatal."""

    def __init__(self, settings: BenchSettings, out: Path) -> None:
        self.s = settings
        self.out = out
        self.runs_dir = out / "runs"
        self.raw: dict[str, Any] = {}
        self.runs: dict[str, RunResult] = {}
        self.errors: dict[str, str] = {}
        self.corpus: list[Sample] = make_corpus(64, seed=0)

    def stage(self, name: str, fn: Callable[[], None]) -> None:
        log.info("== %s", name)
        t = time.perf_counter()
        try:
            with progress.stage(f"bench {name}"):  # elapsed time on a terminal, a line every 30 s in logs
                fn()
        except Exception as e:  # noqa: BLE001 — one failed setup must not lose the others' figures
            log.error("stage %s failed: %s", name, e)
            self.errors[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
        log.info("   %s took %.0f s", name, time.perf_counter() - t)

    def uncontended(self, label: str, fn: Callable[[], T]) -> tuple[T, float, int]:
        """`fn`'s result, the CPU share other work took meanwhile, attempts (repeated while contended).

        A RunResult (or dict) result also gets `cpu`: every process's CPU seconds over the call, warm-up
        included, the load client's own apart (loadtests/census.py)."""
        def counted() -> T:
            census = CpuCensus()
            census.start()
            result = fn()
            cpu = census.stop()
            if isinstance(result, RunResult):
                if "client_cpu_s" in result.extra:  # the driver's own count (wrk: a child process, gone by now)
                    cpu["client_cpu_s"] = result.extra["client_cpu_s"]
                result.extra["cpu"] = cpu
            elif isinstance(result, dict):
                result["cpu"] = cpu
            return result

        return uncontended(counted, label, self.s.attempts, CONTENDED)

    def measured(self, name: str, once: Callable[[], RunResult], concurrency: int,
                 repeats: int | None = None) -> RunResult:
        """`once` measured (`repeats` times, by default the settings' at c=32 and once otherwise, keeping the
        median-throughput window), then kept."""
        n = repeats if repeats is not None else self.s.repeats if concurrency == C else 1
        windows = [self.uncontended(name, once) for _ in range(n)]
        ordered = sorted(windows, key=lambda w: w[0].throughput_rps)
        res, share, attempts = ordered[len(ordered) // 2]
        if n > 1:
            res.extra["repeats"] = [
                {"throughput_rps": round(w[0].throughput_rps, 2), "p50_ms": round(w[0].p50_ms, 2),
                 "p99_ms": round(w[0].p99_ms, 2), "errors": w[0].error_count, "foreign_cpu_share": w[1]}
                for w in windows
            ]
        return self.keep(res, share, attempts)

    def keep(self, res: RunResult, share: float, attempts: int) -> RunResult:
        res.extra["foreign_cpu_share"] = share  # other work on the machine during the run, of all cores
        res.extra["attempts"] = attempts
        self.runs[res.name] = res
        write_json(self.runs_dir / f"{res.name}.json", res.to_dict())
        log.info(
            "   %-34s %8.1f req/s  p50 %7.1f ms  p99 %7.1f ms  errors %d  foreign cpu %.2f",
            res.name, res.throughput_rps, res.p50_ms, res.p99_ms, res.error_count, share,
        )
        return res

    # -- measurements ---------------------------------------------------------------------------
    def grpc(self, url: str, name: str, concurrency: int, metrics_url: str | None = None,
             duration: float | None = None) -> RunResult:
        def once() -> RunResult:
            return asyncio.run(grpc_driver.drive(
                url, self.corpus, concurrency=concurrency, duration_s=duration or self.s.duration_s,
                warmup_s=self.s.warmup_s, metrics_url=metrics_url, name=name,
            ))

        return self.measured(name, once, concurrency)

    def http(self, url: str, name: str, concurrency: int, kind: str = "vqa", duration: float | None = None,
             metrics_url: str | None = None, repeats: int | None = None, driver: str = "aiohttp",
             corpus: list[Sample] | None = None) -> RunResult:
        def once() -> RunResult:
            before = grpc_driver.scrape(metrics_url) if metrics_url else ""
            if driver == "wrk":
                res = wrk_driver.drive(url, corpus or self.corpus, kind=kind, concurrency=concurrency,
                                       duration_s=duration or self.s.duration_s, warmup_s=self.s.warmup_s, name=name)
            else:
                res = asyncio.run(http_driver.drive(
                    url, corpus or self.corpus, kind=kind, concurrency=concurrency,
                    duration_s=duration or self.s.duration_s, warmup_s=self.s.warmup_s, name=name,
                ))
            if metrics_url:  # warm-up included: the engines' batching over the whole run
                res.extra["triton_batches"] = grpc_driver.batch_delta(before, grpc_driver.scrape(metrics_url))
            return res

        return self.measured(name, once, concurrency, repeats)

    @property
    def small_int8(self) -> bool:
        return engine_bench.repository_precision(self.s.small_repo) == "int8"

    def precision(self, preset: str) -> str:
        """Precision of the served engines of `tiny` or `small` (the naive server is run at the same)."""
        repo = self.s.tiny_repo if preset == "tiny" else self.s.small_repo
        return engine_bench.repository_precision(repo)

    def repeat(self, app_url: str, metrics_url: str, cache: str) -> None:
        """8 sequential one-question /v1/vqa calls per image against the `small` stack, Triton's cache `on`/`off`."""
        images, questions = repeat_image.corpus_for(self.s.repeat_sequences)
        res, share, attempts = self.uncontended(f"repeat-image {cache}", lambda: repeat_image.sequences(
            app_url, images, questions, 8, metrics_url))
        self.raw[f"repeat_image_small_{cache}"] = res | {"foreign_cpu_share": share, "attempts": attempts}
        log.info("   repeat image, cache %s: median %.1f ms per 8 calls, image_encoder runs %s", cache,
                 res["median_wall_ms"], res.get("image_encoder_runs_per_sequence"))

    def ceiling(self) -> None:
        n, threads, reps = self.s.matmul_n, flops.ort_threads(), self.s.matmul_reps
        ceiling, share, attempts = self.uncontended("ceiling", lambda: flops.matmul_ceiling(n, threads, reps))
        self.raw["ceiling"] = ceiling | {"foreign_cpu_share": share, "attempts": attempts}
        if self.small_int8:
            c8, share, attempts = self.uncontended("ceiling int8", lambda: flops.matmul_ceiling_int8(n, threads, reps))
            self.raw["ceiling_int8"] = c8 | {"foreign_cpu_share": share, "attempts": attempts}
        # MatMulInteger counts as MatMul: both precisions give the same FLOPs per item.
        self.raw["flops"] = {
            "tiny": flops.count_item(flops.repository_onnx(self.s.tiny_repo)),
            "small": flops.count_item(flops.repository_onnx(self.s.small_repo)),
        }
        write_json(self.out / "ceiling_flops.json", {k: self.raw[k] for k in ("ceiling", "ceiling_int8", "flops")
                                                     if k in self.raw})

    def small_arrangements(self) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
        """The in-process sweeps of `small`'s engines that `served_over_engine_*` take the best of."""
        setups: list[tuple[str, Callable[[], dict[str, Any]]]] = [("small", lambda: engine_bench.sweep(
            self.s.small_repo, self.s.batches, min_time_s=self.s.engine_min_time_s))]
        instances, threads = engine_bench.served_layout(self.s.small_repo)
        if instances > 1 and threads:
            # As Triton runs them (instances at once, their own threads each): when that beats one set on every
            # core, it is the in-process best that `served_over_engine_*` divide by.
            layout = replace(engine_bench.IN_PROCESS, intra_threads=threads)
            setups.append(("small-instances", lambda: engine_bench.sweep(
                self.s.small_repo, self.s.batches, layout, self.s.engine_min_time_s, streams=instances)))
        return setups

    def engines(self) -> None:
        setups: list[tuple[str, Callable[[], dict[str, Any]]]] = [("tiny", lambda: engine_bench.sweep(
            self.s.tiny_repo, self.s.batches, min_time_s=self.s.engine_min_time_s))]
        setups += self.small_arrangements()
        if self.small_int8:  # engine_efficiency is defined against the fp32 ceiling: time the fp32 graphs too
            fp32 = {e: self.s.small_onnx / f"{e}.onnx" for e in flops.ENGINES}
            cfg = engine_bench.repository_config(self.s.small_repo)
            setups.append(("small-fp32", lambda: engine_bench.sweep_paths(
                fp32, cfg, self.s.batches, min_time_s=self.s.engine_min_time_s) | {"precision": "fp32"}))
        for name, fn in setups:
            res, share, attempts = self.uncontended(f"in-process {name}", fn)
            res |= {"foreign_cpu_share": share, "attempts": attempts}
            self.raw[f"engine_{name.replace('-', '_')}"] = res
            write_json(self.out / f"engine-{name}.json", res)
            log.info("   in-process %s: best %.1f items/s at batch %d", name, res["best"]["items_per_s"],
                     res["best"]["batch"])

    def triton_tiny(self) -> None:
        with servers.triton(self.s.tiny_repo, "tiny", response_cache_mb=NO_CACHE) as t:
            for c in self.s.sweep:
                if c != C:
                    self.grpc(t.url_grpc, f"triton-grpc-tiny-c{c}", c)
            self.grpc(t.url_grpc, f"triton-grpc-tiny-c{C}", C, metrics_url=t.url_metrics)
            if self.s.shared:
                self.grpc(t.url_grpc, f"triton-grpc-small-c{C}", C, t.url_metrics, self.s.small_duration_s)
            if self.s.serve:
                self.stage("serve-tiny", lambda: self.serve_tiny(t))
                self.stage("serve-tiny-other-front", lambda: self.serve_tiny_other_front(t))

    def serve_tiny(self, t: TritonServer) -> None:
        with servers.serve_app(t.url_grpc, self.s.tiny_repo, "tiny", "tiny") as app:
            for c in self.s.sweep:
                self.http(app.url, f"serve-http-tiny-c{c}", c, metrics_url=t.url_metrics if c == C else None)
            self.http(app.url, "serve-http-tiny-vqa1-c1", 1, "vqa", self.s.latency_requests_s)
            self.http(app.url, "serve-http-tiny-retrieve64-c1", 1, "retrieve64", self.s.latency_requests_s)
            if self.s.shared:
                self.http(app.url, f"serve-http-small-c{C}", C, duration=self.s.small_duration_s,
                          metrics_url=t.url_metrics)

    def serve_tiny_other_front(self, t: TritonServer) -> None:
        """/v1/vqa at c=32 through the other HTTP front door (HAProxy when Ray's proxy is shipped, and back)."""
        other = "haproxy" if self.raw.get("serve_composition", {}).get("front", "ray") == "ray" else "ray"
        with servers.serve_app(t.url_grpc, self.s.tiny_repo, "tiny", f"tiny-{other}", front=other) as app:
            self.http(app.url, f"serve-http-{other}-tiny-c{C}", C, metrics_url=t.url_metrics)

    def triton_tiny_unbatched(self) -> None:
        dest = REPO_ROOT / "build" / "bench" / "model_repository-tiny-nobatch"
        servers.variant_repository(self.s.tiny_repo, dest, servers.no_dynamic_batching)
        with servers.triton(dest, "tiny-nobatch", response_cache_mb=NO_CACHE) as t:
            self.grpc(t.url_grpc, f"triton-grpc-tiny-nobatch-c{C}", C, metrics_url=t.url_metrics)

    def triton_small(self) -> None:
        if self.s.shared:
            return
        with servers.triton(self.s.small_repo, "small", response_cache_mb=NO_CACHE) as t:
            self.grpc(t.url_grpc, f"triton-grpc-small-c{C}", C, t.url_metrics, self.s.small_duration_s)
            if self.s.serve:
                self.stage("serve-small", lambda: self.serve_small(t))

    def serve_small(self, t: TritonServer) -> None:
        with servers.serve_app(t.url_grpc, self.s.small_repo, "small", "small") as app:
            self.http(app.url, f"serve-http-small-c{C}", C, duration=self.s.small_duration_s, metrics_url=t.url_metrics)

    def repeat_small(self) -> None:
        """The repeated-image sequences on a `small` stack with Triton's response cache on (as shipped), then off."""
        if not self.s.serve:
            return
        for cache, mb in (("on", None), ("off", NO_CACHE)):
            with servers.triton(self.s.small_repo, f"small-cache-{cache}", response_cache_mb=mb) as t:
                with servers.serve_app(t.url_grpc, self.s.small_repo, "small", f"small-cache-{cache}") as app:
                    self.repeat(app.url, t.url_metrics, cache)

    def triton_small_other_precision(self) -> None:
        """`small` through Triton direct with the other precision's engines (for `int8_gain_small`)."""
        other = "fp32" if self.small_int8 else "int8"
        preset = engine_bench.repository_config(self.s.small_repo).name  # `tiny` stands in for `small` in --quick
        dest = REPO_ROOT / "build" / "bench" / f"model_repository-small-{other}"
        # Each precision with the engine threads it measured best with, as `vtfuse export install` sets them.
        edit = servers.engine_settings(threads=ENGINE_THREADS[other])
        servers.variant_repository(self.s.small_repo, dest, edit, precision.replacements(preset, other))
        with servers.triton(dest, f"small-{other}", response_cache_mb=NO_CACHE) as t:
            self.grpc(t.url_grpc, f"triton-grpc-small-{other}-c{C}", C, t.url_metrics, self.s.small_duration_s)

    def naive(self) -> None:
        """The naive server at the served engines' precision (tiny: the sweep), and fp32 at c=32 where that differs."""
        tiny_p, small_p = self.precision("tiny"), self.precision("small")
        with servers.baseline("tiny", precision=tiny_p) as b:
            for c in self.s.sweep:
                self.http(b.url, f"naive-{tiny_p}-tiny-c{c}", c)
            if self.s.shared:
                self.http(b.url, f"naive-{small_p}-small-c{C}", C, duration=self.s.small_duration_s)
        if tiny_p != "fp32":
            with servers.baseline("tiny", precision="fp32") as b:
                self.http(b.url, f"naive-fp32-tiny-c{C}", C)
                if self.s.shared:
                    self.http(b.url, f"naive-fp32-small-c{C}", C, duration=self.s.small_duration_s)
        if self.s.shared:
            return
        for p in dict.fromkeys((small_p, "fp32")):
            with servers.baseline("small", precision=p) as b:
                self.http(b.url, f"naive-{p}-small-c{C}", C, duration=self.s.small_duration_s)

    def paired(self) -> None:
        """Step 7: per preset, rounds of adjacent windows: the public HTTP API, the naive server in fp32 and in int8.

        Each window gets a fresh stack; even rounds run the API first, odd ones last (loadtests/rounds.py:
        `order`), so a drift of the machine favours no side. A round's windows are `paired-serve-<preset>-r<r>`,
        `paired-naive-fp32-<preset>-r<r>` and `paired-naive-int8-<preset>-r<r>`. After the rounds, a round where
        any side strays more than `stray` from that side's median is run again once, its windows named with
        `-rerun` (the first try's files stay); report.paired_ratio applies the rest of the rule.

        For `small` (`tiny` in quick runs, where it stands in) a round also times the in-process engines
        (`small_arrangements`) right next to the API window, on the far side from the naive ones
        (`raw["paired_engine_<preset>_r<r>"]`, report.paired_served_over_engine).
        """
        if not self.s.serve:
            return
        for preset in ("tiny",) if self.s.shared else ("tiny", "small"):
            rates = [self.paired_round(preset, r) for r in range(self.s.paired_rounds)]
            sides = ("serve", *(f"naive_{p}" for p in NAIVE_PRECISIONS))
            full = [i for i, x in enumerate(rates) if all(x.get(k) for k in sides)]
            if len(full) > 2:
                for i in strayed([rates[k] for k in full], self.s.stray, sides):
                    log.info("   %s round %d strays more than %.0f %% from the medians: running it again", preset,
                             full[i], 100 * self.s.stray)
                    self.paired_round(preset, full[i], rerun=True)

    def paired_round(self, preset: str, r: int, rerun: bool = False) -> dict[str, float]:
        """One round of step 7 (`rerun`: its second try); each side's rate (req/s), None for a failed window."""
        repo = self.s.tiny_repo if preset == "tiny" else self.s.small_repo
        duration = self.s.duration_s if preset == "tiny" else self.s.small_duration_s
        with_engines = preset == self.s.small_role
        sides: tuple[str, ...] = ("serve", *(f"naive-{p}" for p in NAIVE_PRECISIONS))
        if with_engines:
            sides = ("engine", *sides)
        suffix = "-rerun" if rerun else ""
        rates: dict[str, float] = {}
        for side in order(sides, r):
            name = f"paired-{side}-{preset}-r{r}{suffix}"
            try:
                if side == "engine":
                    self.paired_engines(f"paired_engine_{preset}_r{r}{suffix.replace('-', '_')}")
                    continue
                if side.startswith("naive-"):
                    with servers.baseline(preset, precision=side.split("-", 1)[1]) as b:
                        res = self.http(b.url, name, C, duration=duration, repeats=1)
                else:
                    with servers.triton(repo, name, response_cache_mb=NO_CACHE) as t, servers.serve_app(
                        t.url_grpc, repo, preset, name
                    ) as app:
                        res = self.http(app.url, name, C, duration=duration, repeats=1,
                                        metrics_url=t.url_metrics if with_engines else None)
                rates[side.replace("-", "_")] = res.throughput_rps
            except Exception as e:  # noqa: BLE001 — one failed window leaves its round incomplete, not the run
                log.error("   %s failed: %s", name, e)
                self.errors[name] = f"{type(e).__name__}: {e}"
        return rates

    def paired_engines(self, key: str) -> None:
        """`small`'s in-process arrangements, timed as step 2 times them, kept under `raw[key]`."""
        timed: dict[str, Any] = {}
        for name, fn in self.small_arrangements():
            res, share, attempts = self.uncontended(f"{key} {name}", fn)
            timed[name.replace("-", "_")] = res | {"foreign_cpu_share": share, "attempts": attempts}
            log.info("   %s %s: best %.1f items/s at batch %d", key, name, res["best"]["items_per_s"],
                     res["best"]["batch"])
        self.raw[key] = timed
        paired = {k: v for k, v in self.raw.items() if k.startswith("paired_engine_")}
        write_json(self.out / "engine-paired.json", paired)

    def traffic(self) -> None:
        """Step 7b: does `tiny`'s comparison hold for another load generator and another image mix?

        One stack per side (the public HTTP API, the naive server fp32, int8), each measured three ways back
        to back at c=32: the Python driver on the bench corpus, `wrk` (compiled, 2 threads) on the same
        bodies, the Python driver on PNG renders of 96-256 px (`traffic-<side>-tiny-<driver>-<mix>`).
        """
        if not self.s.serve:
            return
        png = make_corpus(64, seed=77, sides=PNG_MIX_SIDES, formats=("PNG",))
        ways = (("aiohttp", "bench", None), ("wrk", "bench", None), ("aiohttp", "png96-256", png))
        for side in ("serve", *(f"naive-{p}" for p in NAIVE_PRECISIONS)):
            with contextlib.ExitStack() as stack:
                if side == "serve":
                    t = stack.enter_context(servers.triton(self.s.tiny_repo, "traffic", response_cache_mb=NO_CACHE))
                    url = stack.enter_context(servers.serve_app(t.url_grpc, self.s.tiny_repo, "tiny", "traffic")).url
                else:
                    url = stack.enter_context(servers.baseline("tiny", precision=side.split("-", 1)[1])).url
                for driver, mix, corpus in ways:
                    name = f"traffic-{side}-tiny-{driver}-{mix}"
                    try:
                        self.http(url, name, C, repeats=1, driver=driver, corpus=corpus)
                    except Exception as e:  # noqa: BLE001 — wrk missing, say: the other ways stand
                        log.error("   %s failed: %s", name, e)
                        self.errors[name] = f"{type(e).__name__}: {e}"

    def repeat_blip(self) -> None:
        """Step 5b: 8 one-text /v1/match calls in a row on one image, BLIP-base (loadtests/blip_bench.py's import),
        Triton's response cache on, then off (`repeat_image_speedup_blip`)."""
        if not self.s.serve:
            return
        from loadtests import blip_bench

        bs = blip_bench.BlipBenchSettings.quick_run() if self.s.quick else blip_bench.BlipBenchSettings()
        self.raw["repeat_image_blip_checkpoint"] = blip_bench.ensure_checkpoint(bs)
        self.raw["repeat_image_blip_import"] = blip_bench.ensure_repository(bs)
        images, _ = repeat_image.corpus_for(self.s.repeat_sequences, side=bs.image_side)
        texts = list(dict.fromkeys(c for s in make_corpus(16, seed=909) for c in s.captions))
        encoder = f"{bs.name}_image_encoder"
        env = {"VTFUSE_LIMITS_REQUEST_TIMEOUT_S": str(bs.request_timeout_s)}
        for cache, mb in (("on", None), ("off", NO_CACHE)):
            with servers.triton(bs.repository, f"blip-cache-{cache}", response_cache_mb=mb) as t, \
                    servers.serve_app(t.url_grpc, bs.repository, "tiny", f"blip-cache-{cache}", env=env) as app:
                res, share, attempts = self.uncontended(f"repeat-image blip {cache}", lambda: repeat_image.sequences(
                    app.url, images, texts, 8, t.url_metrics, model=bs.name, kind="match", encoder=encoder,  # noqa: B023
                    timeout_s=bs.request_timeout_s))
            self.raw[f"repeat_image_blip_{cache}"] = res | {"foreign_cpu_share": share, "attempts": attempts}
            log.info("   repeat image (BLIP-base), cache %s: median %.1f ms per 8 calls, image encoder runs %s", cache,
                     res["median_wall_ms"], res.get("image_encoder_runs_per_sequence"))

    def run(self) -> dict[str, Any]:
        started = time.time()
        # The run files of an earlier run go: summary.json lists the runs it was computed from, every one here.
        for old in self.runs_dir.glob("*.json"):
            old.unlink()
        self.stage("ceiling+flops", self.ceiling)
        self.stage("engines", self.engines)
        self.stage("triton-tiny", self.triton_tiny)
        self.stage("triton-tiny-nobatch", self.triton_tiny_unbatched)
        self.stage("triton-small", self.triton_small)
        self.stage("triton-small-other-precision", self.triton_small_other_precision)
        self.stage("repeat-image-small", self.repeat_small)
        if self.s.repeat_blip:
            self.stage("repeat-image-blip", self.repeat_blip)
        self.stage("naive", self.naive)
        self.stage("paired", self.paired)
        if self.s.traffic:
            self.stage("traffic", self.traffic)
        if self.s.caption:
            self.stage("caption", self.caption)
        return self.finish(started)

    def finish(self, started: float) -> dict[str, Any]:
        """raw.json (what `report --from-runs` rebuilds summary.json from, with runs/), summary.json, plots."""
        from loadtests.report import summary

        self.raw["meta"] = {
            "commit": git_commit(), "machine": machine(), "versions": versions(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "bench_seconds": round(time.time() - started, 1), "settings": self.s.to_json(),
        }
        write_json(self.out / "raw.json", {"raw": self.raw, "errors": self.errors})
        result = summary(self)
        write_json(self.out / "summary.json", result)
        self.stage("plots", self.plots)
        return result

    def caption(self) -> None:
        """Step 8: loadtests/caption_bench.py into `out/caption/` (its summary.json, which the report reads)."""
        from loadtests import caption_bench

        s = caption_bench.CaptionBenchSettings.quick_run() if self.s.quick else caption_bench.CaptionBenchSettings()
        s = replace(s, wait_quiet_s=self.s.wait_quiet_s)
        out = self.out / "caption"
        out.mkdir(parents=True, exist_ok=True)
        command = f"python -m loadtests.bench{' --quick' if self.s.quick else ''} --only caption --out {self.out}"
        result = caption_bench.Run(s, out).run(command)  # writes out/caption/summary.json, which the report reads
        if result["errors"]:
            raise RuntimeError(f"caption_bench stages failed: {', '.join(result['errors'])} (see {out}/summary.json)")

    def plots(self) -> None:
        from loadtests.plots import plot_all

        plot_all(self.runs, self.raw, self.out)


def ensure_small_repository(path: Path) -> None:
    """Build the `small` repository (export stages 1, 2, 4) unless it is there."""
    if (path / "fusion" / "1" / "model.onnx").exists():
        return
    log.info("building %s (vtfuse export all --checkpoint small)", path)
    subprocess.run(
        [sys.executable, "-m", "serving.cli", "export", "all", "--target", "embedded", "--checkpoint", "small",
         "--repo", str(path)],
        cwd=REPO_ROOT, check=True,
    )


def only_caption(quick: bool, out: Path, wait_quiet_s: float) -> int:
    """Step 8 alone: its figures into `out/summary.json` (the other figures as they were) and the README's table."""
    from loadtests.report import merge_caption, update_readme

    settings = BenchSettings.quick_run() if quick else BenchSettings()
    bench = Bench(replace(settings, wait_quiet_s=wait_quiet_s, caption=True), out)
    bench.stage("caption", bench.caption)
    cap = out / "caption" / "summary.json"
    if "caption" in bench.errors and not cap.exists():
        log.error("failed: %s", bench.errors.get("caption", "")[:2000])
        return 1
    merged = merge_caption(out / "summary.json", json.loads(cap.read_text()), "caption/summary.json")
    log.info("summary: %s (caption figures replaced)", out / "summary.json")
    if not quick and out.resolve() == (REPO_ROOT / "loadtests" / "results").resolve() and update_readme(
            out / "summary.json"):
        log.info("loadtests/README.md: figures table rewritten from %s", out / "summary.json")
    for key in ("caption_vs_naive", "decode_rows_per_step_c16", "ttft_p50_s_c16", "ttft_p99_s_c16",
                "tpot_p50_ms_c16", "tpot_p99_ms_c16", "vqa_gen_8q_over_1q"):
        log.info("   %-32s %s", key, merged.get(key))
    return 1 if bench.errors else 0


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: short windows, tiny in place of small")
    p.add_argument("--no-serve", action="store_true", help="skip the Ray Serve setups")
    p.add_argument("--out", type=Path, default=None, help="results folder (default loadtests/results, "
                   "or build/bench-quick with --quick)")
    p.add_argument("--wait-quiet", type=float, default=None,
                   help="seconds to wait for other work to leave the CPU first (default 600, --quick 0)")
    p.add_argument("--engine-threads", type=int, help="measure with the engines' intra_op_threads set to this")
    p.add_argument("--engine-instances", type=int, help="measure with this many instances of each engine")
    p.add_argument("--precision", choices=("fp32", "int8"),
                   help="measure with these engines (from each preset's stage-1 folder) in copies of the "
                   "repositories under build/bench/ (default: the engines installed)")
    p.add_argument("--only", nargs="+", choices=("caption",),
                   help="run only these steps and put their figures into OUT/summary.json (the rest as it was)")
    p.add_argument("--skip", nargs="+", choices=("caption",), default=(),
                   help="leave these steps out: the summary takes their figures from OUT/caption/summary.json as it is")
    p.add_argument("--tiny-repo", type=Path, default=TINY_REPO)
    p.add_argument("--small-repo", type=Path, default=SMALL_REPO)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request of the sequential stages otherwise
    # SIGTERM, and SIGINT even when started in the background (where it is ignored), stop every server first.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    out = args.out or (REPO_ROOT / ("build/bench-quick" if args.quick else "loadtests/results"))
    if args.wait_quiet is None:
        args.wait_quiet = 0.0 if args.quick else 600.0
    if args.only:
        return only_caption(args.quick, out, args.wait_quiet)
    if not args.quick:
        ensure_small_repository(args.small_repo)
    # Another precision gets the engine threads it measured best with unless told (as `vtfuse export install`).
    threads = args.engine_threads or (ENGINE_THREADS[args.precision] if args.precision else None)
    if threads or args.engine_instances or args.precision:
        # Variant repositories under build/bench/; the committed ones stay untouched.
        edit = servers.engine_settings(threads, args.engine_instances)
        tag = f"t{threads or 'x'}-i{args.engine_instances or 'x'}-{args.precision or 'installed'}"
        for preset in ("tiny",) if args.quick else ("tiny", "small"):
            src = getattr(args, f"{preset}_repo")
            swap = precision.replacements(preset, args.precision) if args.precision else None
            dest = REPO_ROOT / "build" / "bench" / f"model_repository-{preset}-{tag}"
            setattr(args, f"{preset}_repo", servers.variant_repository(src, dest, edit, swap))
    if args.quick:
        settings = BenchSettings.quick_run(serve=not args.no_serve, tiny_repo=args.tiny_repo)
    else:
        settings = BenchSettings(serve=not args.no_serve, tiny_repo=args.tiny_repo, small_repo=args.small_repo,
                                 wait_quiet_s=args.wait_quiet, caption="caption" not in args.skip)
    bench = Bench(settings, out)
    bench.raw["engine_overrides"] = {
        "intra_op_threads": threads, "instances": args.engine_instances, "precision": args.precision,
    }
    bench.raw["serve_composition"] = servers.shipped_serve_composition()
    bench.raw["repositories"] = {"tiny": str(settings.tiny_repo), "small": str(settings.small_repo)}
    bench.raw["precision"] = {"tiny": bench.precision("tiny"), "small": bench.precision("small")}
    if args.wait_quiet > 0:
        busy = wait_quiet(timeout_s=args.wait_quiet)
        if busy >= 0.15:
            log.warning("the CPU is %.0f %% busy with other work: figures will be low", 100 * busy)
        bench.raw["cpu_busy_before"] = busy
    result = bench.run()
    log.info("summary: %s", out / "summary.json")
    if not args.quick and out.resolve() == (REPO_ROOT / "loadtests" / "results").resolve():
        from loadtests.report import update_readme

        if update_readme(out / "summary.json"):  # the README's figures table is this run's
            log.info("loadtests/README.md: figures table rewritten from %s", out / "summary.json")
    for k, v in result.items():
        if k not in ("machine", "versions", "details", "errors"):
            log.info("   %-32s %s", k, v)
    if bench.errors:
        log.error("failed stages: %s", ", ".join(bench.errors))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
