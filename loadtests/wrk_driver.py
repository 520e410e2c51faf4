"""A second load generator, compiled: `wrk` (Debian's package) with a Lua script that cycles the JSON bodies.

The Python driver (loadtests/http_driver.py) is one process of aiohttp on the same 2 cores as the
servers; a figure that holds only for it is not a headline. This runs the same closed loop (the same
bodies, `concurrency` keep-alive connections, a warm-up run then the measured one) with `wrk -t THREADS`
and returns the same RunResult. wrk checks status codes only (non-2xx/3xx are errors), not answers:
the Python driver checks those.

    python -m loadtests.wrk_driver --url http://127.0.0.1:8080 --concurrency 32 --duration 20
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from loadtests.common import RunResult, Sample, make_corpus, write_json
from loadtests.http_driver import bodies

# Every wrk thread reads the bodies (one JSON document a line), starts at its own offset and cycles them;
# done() prints the figures as one JSON line (wrk's own text report is left for humans).
LUA = r"""
local bodies, n = {}, 0
local threads, next_id = {}, 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  for line in io.lines(args[1]) do
    bodies[#bodies + 1] = line
  end
  n = (id * 7) % #bodies
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  n = n % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[n])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nWRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, "write": %d, '
    .. '"status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "mean_us": %f, "max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""


def wrk_binary() -> str:
    """The wrk on PATH, or a RuntimeError that says how to get it."""
    path = shutil.which("wrk")
    if path is None:
        raise RuntimeError("wrk is not installed: `apt-get install wrk` (Debian/Ubuntu) or `brew install wrk`")
    return path


def parse(stdout: str) -> dict[str, float]:
    """The figures done() printed (the WRK_JSON line)."""
    for line in stdout.splitlines():
        if line.startswith("WRK_JSON "):
            return json.loads(line[len("WRK_JSON "):])
    raise RuntimeError(f"wrk printed no figures: {stdout[-1000:]!r}")


def to_result(fig: dict[str, float], name: str, concurrency: int, items: int, threads: int) -> RunResult:
    """A RunResult of wrk's figures: requests answered 2xx/3xx in the window (no latency list: wrk keeps its own)."""
    window = fig["duration_us"] / 1e6
    errors = Counter({f"wrk_{k}": int(fig[k]) for k in ("connect", "read", "write", "status", "timeout") if fig[k]})
    done = int(fig["requests"]) - int(fig["status"])
    return RunResult(
        name=name, mode="closed", concurrency=concurrency, rate=0.0, duration_s=round(window, 3), completed=done,
        items=done * items, errors=dict(errors), throughput_rps=done / window if window else 0.0,
        items_per_s=done * items / window if window else 0.0, p50_ms=fig["p50_us"] / 1e3, p90_ms=fig["p90_us"] / 1e3,
        p99_ms=fig["p99_us"] / 1e3, mean_ms=fig["mean_us"] / 1e3, max_ms=fig["max_us"] / 1e3,
        extra={"driver": f"wrk {threads} threads (compiled)", "wrk": fig},
    )


def drive(url: str, corpus: list[Sample], *, kind: str = "vqa", concurrency: int = 32, duration_s: float = 20.0,
          warmup_s: float = 3.0, threads: int = 2, model: str | None = None, name: str = "wrk") -> RunResult:
    """A warm-up run of `warmup_s`, then the measured closed loop of `duration_s` with `concurrency` connections."""
    binary = wrk_binary()
    path, body_list, items = bodies(corpus, kind, model)
    with tempfile.TemporaryDirectory(prefix="vtfuse-wrk-") as tmp:
        script, lines = Path(tmp) / "bodies.lua", Path(tmp) / "bodies.jsonl"
        script.write_text(LUA)
        lines.write_bytes(b"\n".join(body_list) + b"\n")
        target = url.rstrip("/") + path

        def run(seconds: float) -> dict[str, float]:
            cmd = [binary, f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "60s",
                   "-s", str(script), target, "--", str(lines)]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
            if out.returncode != 0:
                raise RuntimeError(f"wrk exited {out.returncode}: {out.stderr[-1000:]}")
            return parse(out.stdout)

        if warmup_s > 0:
            run(warmup_s)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        res = to_result(run(duration_s), name, concurrency, items, threads)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # wrk's own CPU over the measured run (the load generator's share of the cores)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    res.extra.update({"kind": kind, "path": path, "url": url, "items_per_request": items,
                      "client_cpu_s": round(cpu, 2)})
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--kind", choices=("vqa", "retrieve64", "match", "embed"), default="vqa")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--model")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    res = drive(args.url, make_corpus(args.samples), kind=args.kind, concurrency=args.concurrency,
                duration_s=args.duration, warmup_s=args.warmup, threads=args.threads, model=args.model)
    d = res.to_dict()
    if args.out:
        write_json(args.out, d)
    json.dump({k: v for k, v in d.items() if k != "latencies_ms"}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if res.completed else 1


if __name__ == "__main__":
    sys.exit(main())
