"""Where the CPU went during a measurement window: every process on the machine, named by what it is.

On 2 shared cores the load generator, the other side's leftovers, Ray's daemons and the servers all
take from the same CPU. A bench window records, next to its figures, the CPU seconds of every process
that used any (this process, the load client, apart), so a figure can be read with what else ran:

    census = CpuCensus(); census.start(); ...; cpu = census.stop()
    cpu["client_cpu_s"], cpu["by_label"]["naive server"], cpu["processes"][0]

Processes that started and ended inside the window are missed (their time is not in /proc any more):
the totals are lower bounds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from loadtests.common import _proc_table

# Below this many CPU seconds in a window a process is left out of the per-process list (its time still counts).
LIST_MIN_CPU_S = 0.05


def process_label(cmdline: list[str], comm: str) -> str:
    """A short name for one process: Triton's Python stub by its model, Ray's workers by their actor, our servers
    by their module."""
    joined = " ".join(cmdline)
    if "triton_python_backend_stub" in joined and len(cmdline) > 1:
        return "triton stub " + Path(cmdline[1]).parts[-3]  # <repository>/<model>/<version>/model.py
    if comm.startswith("ray::") or (cmdline and cmdline[0].startswith("ray::")):
        return (cmdline[0] if cmdline and cmdline[0].startswith("ray::") else comm).split(".")[0]
    for key in ("tritonserver", "haproxy", "raylet", "gcs_server", "caption_app", "blip_app", "serve_app", "wrk"):
        if key in joined or comm == key:
            return key
    if "loadtests.baseline" in joined:
        return "naive server"  # FastAPI + PyTorch (`tiny`, `small`): its supervisor and every worker
    return Path(cmdline[0]).name if cmdline else comm


def _describe(pid: int) -> str:
    try:
        cmdline = [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if a]
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "exited"
    return process_label(cmdline, comm)


class CpuCensus:
    """CPU seconds of every process between `start()` and `stop()`, this process (the load client) apart."""

    def __init__(self) -> None:
        self._before: dict[int, tuple[int, float]] = {}
        self._t0 = 0.0
        self._self0 = 0.0

    def start(self) -> None:
        self._before = _proc_table()
        self._self0 = time.process_time()
        self._t0 = time.perf_counter()

    def stop(self) -> dict[str, Any]:
        """{window_s, cores, client_cpu_s, others_cpu_s, by_label: {label: s}, processes: [{pid, label, cpu_s}]}."""
        after = _proc_table()
        window = time.perf_counter() - self._t0
        client = time.process_time() - self._self0
        me = os.getpid()
        rows = []
        for pid, (_, t) in after.items():
            used = t - self._before.get(pid, (0, 0.0))[1]
            if pid != me and used > 0:
                rows.append({"pid": pid, "label": _describe(pid), "cpu_s": round(used, 3)})
        rows.sort(key=lambda r: -r["cpu_s"])
        by_label: dict[str, float] = {}
        for r in rows:
            by_label[r["label"]] = round(by_label.get(r["label"], 0.0) + r["cpu_s"], 3)
        return {
            "window_s": round(window, 2), "cores": os.cpu_count() or 1, "client_cpu_s": round(client, 2),
            "others_cpu_s": round(sum(r["cpu_s"] for r in rows), 2),
            "by_label": dict(sorted(by_label.items(), key=lambda kv: -kv[1])),
            "processes": [r for r in rows if r["cpu_s"] >= LIST_MIN_CPU_S],
        }


def label_cpu_per_request(cpu: dict[str, Any] | None, completed: int, labels: tuple[str, ...]) -> float | None:
    """CPU milliseconds per completed request of the processes whose label starts with any of `labels`."""
    if not cpu or not completed:
        return None
    total = sum(v for k, v in (cpu.get("by_label") or {}).items() if k.startswith(labels))
    return round(1000 * total / completed, 3)
