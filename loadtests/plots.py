"""PNG plots of a bench run: throughput against concurrency, latency CDF per setup, in-process items/s per batch."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from loadtests.common import RunResult  # noqa: E402

_NAME = re.compile(r"^(?P<setup>.+)-c(?P<c>\d+)$")


def series(runs: dict[str, RunResult]) -> dict[str, list[tuple[int, RunResult]]]:
    """Runs grouped by setup (name without its `-c<N>` suffix), sorted by concurrency."""
    out: dict[str, list[tuple[int, RunResult]]] = {}
    for name, r in runs.items():
        m = _NAME.match(name)
        if m and r.mode == "closed" and r.extra.get("kind", "vqa") == "vqa":
            out.setdefault(m.group("setup"), []).append((int(m.group("c")), r))
    return {k: sorted(v, key=lambda x: x[0]) for k, v in sorted(out.items())}


def plot_throughput(runs: dict[str, RunResult], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for setup, pts in series(runs).items():
        if len(pts) < 2:
            continue
        ax.plot([c for c, _ in pts], [r.items_per_s for _, r in pts], marker="o", label=setup)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency (closed loop)")
    ax.set_ylabel("items/s (one image × one question)")
    ax.set_title("Throughput against concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cdf(runs: dict[str, RunResult], path: Path, suffix: str = "-c32") -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in sorted(runs.items()):
        if not name.endswith(suffix) or not r.latencies_ms:
            continue
        lat = r.latencies_ms
        ax.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=f"{name} (p99 {r.p99_ms:.0f} ms)")
    ax.set_xscale("log")
    ax.set_xlabel("latency, ms")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Latency CDF at concurrency 32")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_engines(raw: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in ("engine_tiny", "engine_small", "engine_small_instances", "engine_small_fp32"):
        if key in raw:
            rows = raw[key]["rows"]
            label = f"{raw[key]['preset']} {raw[key].get('precision', 'fp32')}"
            if raw[key].get("streams", 1) > 1:
                label += f", {raw[key]['streams']} sets × {raw[key]['settings']['intra_threads']} thread at once"
            ax.plot([r["batch"] for r in rows], [r["items_per_s"] for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("items/s")
    ax.set_title("In-process ONNX Runtime, three engines per item")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(runs: dict[str, RunResult], raw: dict[str, Any], out: Path) -> list[Path]:
    """Write every plot under `out/`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    return [
        plot_throughput(runs, out / "throughput_vs_concurrency.png"),
        plot_cdf(runs, out / "latency_cdf_c32.png"),
        plot_engines(raw, out / "engine_items_per_batch.png"),
    ]
