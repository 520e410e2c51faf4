"""CPU per request of each process behind the public HTTP API, for HAProxy replay-buffer sizes.

For each `--replay-max-body` (bytes; `VTFUSE_HAPROXY_REPLAY_MAX_BODY`), a fresh Serve app with the
HAProxy front door in front of one Triton (`tiny`), `tiny` one-question `/v1/vqa` at concurrency
32 from the project's HTTP driver, and the CPU time each process used during the window (from
/proc: HAProxy, the Ingress replicas, Triton's stubs, ...), per request:

    PYTHONPATH=. python -m loadtests.front_cpu --replay-max-body 4194304 1048576 524288 \
        --out loadtests/results/front-cpu.json

`--idle VARIANT...` measures the same stack with no requests at all: CPU per second of each
process, for Ray settings given as `NAME=VALUE,NAME=VALUE` (`default`: none), a fresh stack each:

    PYTHONPATH=. python -m loadtests.front_cpu --idle default \
        RAY_SERVE_CONTROL_LOOP_INTERVAL_S=0.5,RAY_SERVE_METRICS_EXPORT_INTERVAL_MS=1000 \
        --duration 40 --out loadtests/results/idle-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from loadtests import http_driver, servers
from loadtests.common import RESULTS_DIR, make_corpus, write_json

log = logging.getLogger("loadtests.front_cpu")
TINY = servers.REPO_ROOT / "model_repository"
TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu() -> dict[int, tuple[str, float]]:
    """pid → (a short name, user + system CPU seconds) for every process readable in /proc."""
    out = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text()
            cmd = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(proc.name)] = (_name(cmd, stat), (int(fields[11]) + int(fields[12])) / TICKS)
    return out


def _name(cmd: str, stat: str) -> str:
    base = cmd.rsplit("/", 1)[-1] or stat[stat.index("(") + 1 : stat.rindex(")")]
    if not base.startswith("ray::"):
        return base
    # Ray retitles an actor while it runs a method (`ray::ServeController.listen_for_change`): the actor's name.
    return base.split(":", 2)[-1].split(".", 1)[0].split("(", 1)[0].strip()


def measure(replay_max_body: int, corpus: list[Any], duration: float, warmup: float) -> dict[str, Any]:
    """One window on a fresh stack: req/s and CPU ms per request per kind of process."""
    env = {"VTFUSE_HAPROXY_REPLAY_MAX_BODY": str(replay_max_body)}  # added to our environment
    with servers.triton(TINY, "front-cpu") as t, servers.serve_app(
        t.url_grpc, TINY, "tiny", "front-cpu", front="haproxy", env=env
    ) as app:
        result: dict[str, Any] = {}
        drive = threading.Thread(target=lambda: result.update(run=asyncio.run(http_driver.drive(
            app.url, corpus, concurrency=32, duration_s=duration, warmup_s=warmup, name="front-cpu"))))
        drive.start()
        time.sleep(warmup)
        before, t0 = process_cpu(), time.monotonic()
        drive.join()
        after, wall = process_cpu(), time.monotonic() - t0
    run = result["run"]
    requests = run.throughput_rps * wall
    per_kind = per_kind_cpu(before, after)
    top = sorted(per_kind.items(), key=lambda kv: -kv[1])[:8]
    return {
        "replay_max_body": replay_max_body,
        "throughput_rps": round(run.throughput_rps, 1),
        "p99_ms": round(run.p99_ms, 1),
        "errors": run.error_count,
        "cpu_ms_per_request": {k: round(1000 * v / requests, 3) for k, v in top if v > 0},
    }


def per_kind_cpu(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each kind of process used between two `process_cpu` snapshots (processes alive in both)."""
    out: dict[str, float] = {}
    for pid, (name, cpu) in after.items():
        if pid in before and before[pid][0] == name:
            out[name] = out.get(name, 0.0) + cpu - before[pid][1]
    return out


def measure_idle(variant: str, duration: float, settle: float = 20.0) -> dict[str, Any]:
    """A fresh stack with no requests: CPU ms per second of each kind of process after `settle` s."""
    env = dict(kv.split("=", 1) for kv in variant.split(",")) if variant != "default" else {}
    with servers.triton(TINY, "front-cpu-idle") as t, servers.serve_app(
        t.url_grpc, TINY, "tiny", "front-cpu-idle", front="haproxy", env=env
    ) as _app:
        time.sleep(settle)
        before, t0 = process_cpu(), time.monotonic()
        time.sleep(duration)
        after, wall = process_cpu(), time.monotonic() - t0
    used = sorted(per_kind_cpu(before, after).items(), key=lambda kv: -kv[1])
    ms_per_s = {k: round(1000 * v / wall, 1) for k, v in used if v > 0}
    return {"variant": variant, "seconds": round(wall, 1), "cpu_ms_per_s": ms_per_s,
            "total_cpu_ms_per_s": round(sum(ms_per_s.values()), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replay-max-body", type=int, nargs="+", default=[4 * 1024 * 1024, 1024 * 1024, 512 * 1024])
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--idle", nargs="+", metavar="VARIANT",
                   help="no load: CPU per second per process, per variant (`default` or NAME=VALUE,...)")
    p.add_argument("--out", type=Path, default=None, help="default results/front-cpu.json (--idle: idle-cpu.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.idle:
        idle = [measure_idle(v, args.duration) for v in args.idle]
        for r in idle:
            log.info("%s", r)
        write_json(args.out or RESULTS_DIR / "idle-cpu.json",
                   {"what": "CPU per second of each process of an idle stack (HAProxy front door, tiny)",
                    "runs": idle})
        return 0
    corpus = make_corpus(64)
    runs = []
    for size in args.replay_max_body:
        runs.append(measure(size, corpus, args.duration, args.warmup))
        log.info("%s", runs[-1])
    write_json(args.out or RESULTS_DIR / "front-cpu.json", {"what": __doc__.split("\n\n")[0], "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
