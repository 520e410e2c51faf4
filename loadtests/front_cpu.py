"""CPU per request of each process behind the public HTTP API, for HAProxy replay-buffer sizes.

For each `--replay-max-body` (bytes; `VTFUSE_HAPROXY_REPLAY_MAX_BODY`), a fresh Serve app with the
HAProxy front door in front of one Triton (`tiny`), `tiny` one-question `/v1/vqa` at concurrency
32 from the project's HTTP driver, and the CPU time each process used during the window (from
/proc: HAProxy, the Ingress replicas, Triton's stubs, ...), per request:

    PYTHONPATH=. python -m loadtests.front_cpu --replay-max-body 4194304 1048576 524288 \
        --out loadtests/results/front-cpu.json
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
    return base.split(":", 2)[-1] if base.startswith("ray::") else base


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
    per_kind: dict[str, float] = {}
    for pid, (name, cpu) in after.items():
        if pid in before and before[pid][0] == name:
            per_kind[name] = per_kind.get(name, 0.0) + cpu - before[pid][1]
    top = sorted(per_kind.items(), key=lambda kv: -kv[1])[:8]
    return {
        "replay_max_body": replay_max_body,
        "throughput_rps": round(run.throughput_rps, 1),
        "p99_ms": round(run.p99_ms, 1),
        "errors": run.error_count,
        "cpu_ms_per_request": {k: round(1000 * v / requests, 3) for k, v in top if v > 0},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replay-max-body", type=int, nargs="+", default=[4 * 1024 * 1024, 1024 * 1024, 512 * 1024])
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "front-cpu.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    corpus = make_corpus(64)
    runs = []
    for size in args.replay_max_body:
        runs.append(measure(size, corpus, args.duration, args.warmup))
        log.info("%s", runs[-1])
    write_json(args.out, {"what": __doc__.split("\n\n")[0], "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
