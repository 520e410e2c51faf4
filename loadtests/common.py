"""Shared pieces of the load tools: a request corpus from the shapes renderer, run statistics, machine facts, JSON.

Every load generator reports a `RunResult`: completed requests, errors by kind, throughput and
latency percentiles over a measurement window that starts after a warm-up, plus a down-sampled
sorted latency list for CDF plots.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import platform
import random
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from serving.shapes import world

log = logging.getLogger(__name__)
T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "loadtests" / "results"
# Image sides the renderer draws at: every request is resized by the server, as real traffic would be.
SIDES = (64, 96, 128, 160, 224, 256, 320)
CDF_POINTS = 400


@dataclass(frozen=True)
class Sample:
    """One request's payload: an encoded image, one question about it, captions (one true, others not)."""

    image: bytes
    question: str
    answer: str
    captions: tuple[str, ...]
    side: int
    fmt: str

    @property
    def image_b64(self) -> str:
        """The image as base64 text, as the JSON API takes it."""
        return base64.b64encode(self.image).decode()


def make_corpus(n: int = 64, seed: int = 0, sides: tuple[int, ...] = SIDES,
                formats: tuple[str, ...] = ("JPEG", "PNG")) -> list[Sample]:
    """`n` renders of random scenes at varied sizes, half PNG half JPEG (or all of the one format in `formats`),
    each with a question and 8 captions."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = world.random_scene(rng)
        side = rng.choice(sides)
        img = world.render(scene, side, supersample=rng.choice([1, 2]))
        fmt = "JPEG" if rng.random() < 0.5 else "PNG"  # drawn whatever `formats` says: the same scenes either way
        fmt = fmt if fmt in formats else formats[0]
        data = world.encode(img, fmt, rng.randint(75, 95))
        qa = world.sample_question(scene, rng)
        captions = (world.caption(world.scene_items(scene), rng), *world.distractor_captions(scene, rng, 7))
        out.append(Sample(data, qa.question, qa.answer, tuple(captions), side, fmt))
    return out


def many_captions(corpus: list[Sample], n: int) -> list[str]:
    """`n` captions drawn from the corpus (for one-image × many-captions retrieval)."""
    pool = [c for s in corpus for c in s.captions]
    return [pool[i % len(pool)] for i in range(n)]


def percentile(values: np.ndarray | list[float], q: float) -> float:
    """The q-th percentile (0-100), NaN for no values."""
    return float(np.percentile(values, q)) if len(values) else float("nan")


@dataclass
class RunResult:
    """One load run: what was offered, what came back, how fast.

    Attributes:
        name: the setup measured (e.g. `triton-grpc-tiny`).
        mode: `closed` (fixed concurrency) or `open` (Poisson arrivals at `rate`).
        concurrency: workers of a closed loop (0 for open).
        rate: offered requests/s of an open loop (0 for closed).
        duration_s: the measurement window (after warm-up).
        completed: requests answered successfully within the window.
        items: items (one image × one question through all three engines) in those requests.
        errors: failures in the window by kind (status code or exception class).
        latencies_ms: sorted latencies of the completed requests, down-sampled for plots.
    """

    name: str
    mode: str
    concurrency: int
    rate: float
    duration_s: float
    completed: int
    items: int
    errors: dict[str, int]
    throughput_rps: float
    items_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    latencies_ms: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        """All failures in the window."""
        return sum(self.errors.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["error_count"] = self.error_count
        return d


def summarize(
    name: str,
    mode: str,
    latencies_s: list[float],
    errors: Counter[str],
    window_s: float,
    concurrency: int = 0,
    rate: float = 0.0,
    items_per_request: int = 1,
) -> RunResult:
    """Turn raw per-request latencies (seconds) and errors into a RunResult."""
    lat = np.sort(np.asarray(latencies_s, dtype=np.float64) * 1e3)
    n = len(lat)
    idx = np.linspace(0, n - 1, min(n, CDF_POINTS)).round().astype(int) if n else np.array([], dtype=int)
    return RunResult(
        name=name,
        mode=mode,
        concurrency=concurrency,
        rate=rate,
        duration_s=round(window_s, 3),
        completed=n,
        items=n * items_per_request,
        errors=dict(errors),
        throughput_rps=n / window_s if window_s > 0 else 0.0,
        items_per_s=n * items_per_request / window_s if window_s > 0 else 0.0,
        p50_ms=percentile(lat, 50),
        p90_ms=percentile(lat, 90),
        p99_ms=percentile(lat, 99),
        mean_ms=float(lat.mean()) if n else float("nan"),
        max_ms=float(lat.max()) if n else float("nan"),
        latencies_ms=[round(float(x), 3) for x in lat[idx]],
    )


class Window:
    """The measurement window of a run: requests that finish inside it count, warm-up ones do not."""

    def __init__(self, warmup_s: float, duration_s: float) -> None:
        self.start = time.perf_counter() + warmup_s
        self.end = self.start + duration_s
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()

    def record(self, t_sent: float, t_done: float, error: str | None = None, by_send: bool = False) -> bool:
        """Count one request if it finished inside the window (or, `by_send`, was sent inside it)."""
        key = t_sent if by_send else t_done
        if self.start <= key <= self.end:
            if error is None:
                self.latencies.append(t_done - t_sent)
            else:
                self.errors[error] += 1
            return True
        return False

    def open(self) -> bool:
        """True until the window has closed."""
        return time.perf_counter() < self.end

    @property
    def length(self) -> float:
        """Seconds the window spans."""
        return self.end - self.start


def _cpu_times() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields), idle


def cpu_busy(seconds: float = 2.0) -> float:
    """Fraction of the machine's CPU time busy over the next `seconds` (0-1; NaN without /proc/stat)."""
    try:
        t0, i0 = _cpu_times()
        time.sleep(seconds)
        t1, i1 = _cpu_times()
    except OSError:
        return float("nan")
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def wait_quiet(threshold: float = 0.15, timeout_s: float = 600.0, sample_s: float = 3.0) -> float:
    """Wait until other work leaves the CPU (busy < `threshold`) or `timeout_s` passes; returns the last sample."""
    deadline = time.monotonic() + timeout_s
    busy = cpu_busy(sample_s)
    while busy >= threshold and time.monotonic() < deadline:
        busy = cpu_busy(sample_s)
    return busy


def _proc_table() -> dict[int, tuple[int, float]]:
    """{pid: (ppid, utime + stime in seconds)} of every process readable in /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        out[int(d.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return out


def _descendants(table: dict[int, tuple[int, float]], root: int) -> set[int]:
    mine, changed = {root}, True
    while changed:
        new = {pid for pid, (ppid, _) in table.items() if ppid in mine and pid not in mine}
        mine |= new
        changed = bool(new)
    return mine


class ForeignCpu:
    """CPU seconds that processes outside this process's tree used between `start()` and `stop()`.

    A bench run on a shared machine records this next to its figures, so that a figure taken
    while other work ran is visible as such (exited processes' time is missed: a lower bound).
    """

    def __init__(self) -> None:
        self._before: dict[int, tuple[int, float]] = {}

    def start(self) -> None:
        self._before = _proc_table()

    def stop(self) -> float:
        after = _proc_table()
        mine = _descendants(after, os.getpid())
        return sum(t - self._before.get(pid, (0, 0.0))[1] for pid, (_, t) in after.items() if pid not in mine)


def uncontended(
    fn: Callable[[], T], label: str = "measurement", attempts: int = 3, threshold: float = 0.10
) -> tuple[T, float, int]:
    """Run `fn`, measuring the CPU share other work took meanwhile; above `threshold`, wait for quiet and rerun.

    Returns (the last result, the foreign CPU share of all cores during it, attempts made).
    """
    cores = os.cpu_count() or 1
    share, attempt = 0.0, 0
    for attempt in range(1, attempts + 1):
        foreign = ForeignCpu()
        foreign.start()
        t = time.perf_counter()
        result = fn()
        share = round(foreign.stop() / ((time.perf_counter() - t) * cores), 3)
        if share <= threshold or attempt == attempts:
            break
        log.warning("   %s: other work took %.0f %% of the CPU: measuring again when it is quiet", label, 100 * share)
        wait_quiet(threshold, timeout_s=600)
    return result, share, attempt


def git_commit() -> str:
    """The checkout's commit (with `-dirty` when code has uncommitted changes), or `unknown`.

    Files under loadtests/results/ do not count: a bench run rewrites them before it asks.
    """
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)loadtests/results"],
            cwd=REPO_ROOT, capture_output=True, text=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict[str, Any]:
    """CPU model, cores, memory and OS of this machine."""
    model = ""
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "cpu_model": model or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "simd": [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags],
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    """Versions of the packages and the Triton server the figures depend on."""
    out = {}
    for pkg in ("onnxruntime", "torch", "numpy", "ray", "tritonclient", "nvidia-pytriton", "fastapi", "uvicorn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    out["tritonserver"] = "2.51 (nvidia-pytriton bundle)" if out["nvidia-pytriton"] != "absent" else "absent"
    return out


def write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON (NaN written as null), creating parent folders."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(_clean(obj), indent=2) + "\n")
    return p


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if obj != obj or obj in (float("inf"), float("-inf")) else obj
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    if isinstance(obj, RunResult):
        return _clean(obj.to_dict())
    return obj
