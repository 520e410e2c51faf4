"""Overload and fault drills against `vtfuse serve`: a burst, Triton killed under load, a replica killed, SIGTERM drain.

Each drill drives real HTTP traffic at the API and classifies every request: a status
with a JSON error body, a non-JSON error (Ray's or uvicorn's own text: a contract
violation), or a dropped connection (sent, never answered). `ServeStack` runs
`vtfuse serve` on free ports in its own process group and always tears it down;
tests/integration/test_reliability.py runs the drills on such stacks and RELIABILITY.md
reports their figures. From the command line, against a running stack:

    python -m loadtests.chaos burst --url http://127.0.0.1:8080 --requests 400
    python -m loadtests.chaos triton-kill --url http://127.0.0.1:8080 --clients 24
    python -m loadtests.chaos replica-kill --url http://127.0.0.1:8080 --clients 16
    python -m loadtests.chaos drain --clients 16          # starts (and SIGTERMs) a stack of its own
    python -m loadtests.chaos all --out build/chaos.json  # every drill on fresh stacks
    python -m loadtests.chaos nodes --clients 8           # two Ray nodes here + `vtfuse serve --ray-address`:
                                                          # a node SIGKILLed and rejoined, then one drained
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from serving.paths import REPO_ROOT
from serving.procs import free_port
from serving.shapes import world

log = logging.getLogger(__name__)

LOG_DIR = REPO_ROOT / "build" / "chaos"
OK_STATUSES = frozenset({200, 429, 503, 504})
QUESTIONS = ("how many circles are there?", "what color is the square?", "is there a red triangle?")


# -- traffic ---------------------------------------------------------------------------


def vqa_bodies(n: int = 16, seed: int = 0) -> list[bytes]:
    """`n` JSON bodies for /v1/vqa: fresh shapes-world renders (PNG and JPEG) with one question each."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        scene = world.random_scene(rng)
        img = world.render(scene, rng.choice([64, 96, 128]))
        data = world.encode(img, "PNG") if i % 2 else world.encode(img, "JPEG", 90)
        body = {"image": base64.b64encode(data).decode(), "questions": [QUESTIONS[i % len(QUESTIONS)]]}
        out.append(json.dumps(body).encode())
    return out


@dataclass(frozen=True)
class Outcome:
    """One request as the client saw it."""

    start: float  # time.monotonic() when sent
    end: float
    status: int  # HTTP status; 0 = no answer (see `error`)
    code: str = ""  # the JSON error code, "" on success
    json_body: bool = True  # an error body of the API's JSON shape (always True for 200s that parsed)
    retry_after: bool = False
    error: str = ""  # "refused" (could not connect: nothing was sent) or "dropped: ..." (sent, never answered)
    sent: float | None = None  # time.monotonic() when its last byte went to the socket (None: never all sent)

    @property
    def latency(self) -> float:
        """Seconds from send to answer."""
        return self.end - self.start


def _classify_exc(exc: BaseException) -> str:
    if isinstance(exc, httpx.ConnectError):
        return "refused"
    return f"dropped: {type(exc).__name__}: {exc}"[:200]


@dataclass
class OnTheWire:
    """How many requests are sent and not yet answered (the drain drill signals while some are)."""

    n: int = 0


async def send(
    client: httpx.AsyncClient, path: str, body: bytes, timeout: float = 90.0, wire: OnTheWire | None = None
) -> Outcome:
    """POST one JSON body; never raises: the outcome says what happened."""
    t0 = time.monotonic()
    sent: list[float] = []

    async def trace(event: str, info: dict[str, Any]) -> None:
        # On a busy machine the client's own event loop can hold a request for a while before
        # writing it: what was in flight at a given moment is what had been sent (the drain drill).
        if event == "http11.send_request_body.complete":
            sent.append(time.monotonic())
            if wire is not None:
                wire.n += 1

    try:
        return await _post(client, path, body, timeout, trace, t0, sent)
    finally:
        if wire is not None and sent:
            wire.n -= 1


async def _post(
    client: httpx.AsyncClient, path: str, body: bytes, timeout: float, trace: Any, t0: float, sent: list[float]
) -> Outcome:
    """`send`'s request and its outcome (`sent`: filled by `trace` when the body has gone out)."""
    try:
        r = await client.post(
            path,
            content=body,
            headers={"content-type": "application/json"},
            timeout=timeout,
            extensions={"trace": trace},
        )
    except Exception as e:  # every transport failure is an outcome
        return Outcome(t0, time.monotonic(), 0, error=_classify_exc(e), sent=sent[0] if sent else None)
    t1 = time.monotonic()
    at = sent[0] if sent else None
    if r.status_code == 200:
        try:
            ok = isinstance(r.json(), dict)
        except ValueError:
            ok = False
        return Outcome(t0, t1, 200, json_body=ok, sent=at)
    code, is_json = "", False
    try:
        body_json = r.json()
        code = body_json["error"]["code"]
        is_json = set(body_json) == {"error"} and bool(body_json["error"].get("message"))
    except (ValueError, KeyError, TypeError):
        code = r.text[:120]
    return Outcome(t0, t1, r.status_code, code, is_json, "retry-after" in r.headers, sent=at)


def new_client(url: str, connections: int, api_key: str | None = None) -> httpx.AsyncClient:
    """An async client with room for `connections` concurrent requests (sending `api_key` when given)."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    headers = {"X-API-Key": api_key} if api_key else {}
    return httpx.AsyncClient(base_url=url, limits=limits, timeout=90.0, headers=headers)


async def burst(
    url: str, n: int = 400, bodies: Sequence[bytes] | None = None, api_key: str | None = None
) -> list[Outcome]:
    """`n` requests at once (one connection each); every outcome."""
    bodies = bodies or vqa_bodies()
    async with new_client(url, n, api_key) as client:
        return list(await asyncio.gather(*(send(client, "/v1/vqa", bodies[i % len(bodies)]) for i in range(n))))


async def closed_loop(
    url: str,
    clients: int,
    stop: asyncio.Event,
    bodies: Sequence[bytes] | None = None,
    pause_on_error_s: float = 0.2,
    stop_on_refusal: bool = False,
    api_key: str | None = None,
    wire: OnTheWire | None = None,
) -> list[Outcome]:
    """`clients` callers each sending /v1/vqa back to back until `stop` is set.

    A caller that gets an error waits `pause_on_error_s` (a polite client honouring
    shedding); with `stop_on_refusal` it stops at the first 503 or refused connection
    (a client of a server that is going away).
    """
    bodies = bodies or vqa_bodies()
    out: list[Outcome] = []

    async def caller(k: int, client: httpx.AsyncClient) -> None:
        i = k
        while not stop.is_set():
            o = await send(client, "/v1/vqa", bodies[i % len(bodies)], wire=wire)
            out.append(o)
            i += clients
            if o.status != 200:
                if stop_on_refusal and (o.status == 503 or o.error == "refused"):
                    return
                await asyncio.sleep(pause_on_error_s)

    async with new_client(url, clients, api_key) as client:
        await asyncio.gather(*(caller(k, client) for k in range(clients)))
    return out


def summarize(outcomes: Sequence[Outcome], t0: float | None = None) -> dict[str, Any]:
    """Counts by status, contract violations (non-JSON errors, other statuses, drops) and latencies."""
    statuses = Counter(str(o.status) for o in outcomes if o.status)
    codes = Counter(o.code for o in outcomes if o.status and o.status != 200)
    dropped = [o.error for o in outcomes if o.error.startswith("dropped")]
    refused = sum(o.error == "refused" for o in outcomes)
    non_json = [(o.status, o.code) for o in outcomes if o.status and not o.json_body]
    unexpected = [(o.status, o.code) for o in outcomes if o.status and o.status not in OK_STATUSES]
    no_retry_after = sum(o.status in (429, 503) and not o.retry_after for o in outcomes)
    lat = sorted(o.latency for o in outcomes if o.status)
    base = t0 if t0 is not None else (min(o.start for o in outcomes) if outcomes else 0.0)

    def q(p: float, values: list[float] = lat) -> float:
        return round(values[min(len(values) - 1, int(p * len(values)))], 3) if values else 0.0

    by_status = {
        s: {"p50": q(0.5, v), "max": q(1.0, v)}
        for s in sorted(statuses)
        for v in [sorted(o.latency for o in outcomes if str(o.status) == s)]
    }

    return {
        "requests": len(outcomes),
        "statuses": dict(sorted(statuses.items())),
        "error_codes": dict(codes),
        "dropped": len(dropped),
        "dropped_examples": dropped[:3],
        "refused_connections": refused,
        "non_json_errors": len(non_json),
        "non_json_examples": non_json[:3],
        "unexpected_statuses": len(unexpected),
        "unexpected_examples": unexpected[:3],
        "missing_retry_after": no_retry_after,
        "latency_s": {"p50": q(0.5), "p99": q(0.99), "max": round(lat[-1], 3) if lat else 0.0},
        "latency_by_status_s": by_status,
        "last_answer_s": round(max((o.end for o in outcomes), default=base) - base, 3),
    }


def recovery(outcomes: Sequence[Outcome], fault_at: float) -> dict[str, Any]:
    """When errors began and ended after a fault, and when 200s were steady again (seconds after the fault)."""
    after = sorted((o for o in outcomes if o.end >= fault_at), key=lambda o: o.end)
    errors = [o for o in after if o.status != 200]
    first_err = errors[0].end - fault_at if errors else None
    last_err = errors[-1].end - fault_at if errors else None
    ok_after = [o for o in after if o.status == 200 and (not errors or o.start > errors[-1].start)]
    return {
        "first_error_s": None if first_err is None else round(first_err, 2),
        "last_error_s": None if last_err is None else round(last_err, 2),
        "recovered_s": round(ok_after[0].end - fault_at, 2) if ok_after else None,
        "errors_after_fault": len(errors),
        "ok_after_recovery": len(ok_after),
    }


# -- processes -------------------------------------------------------------------------


def descendants(pid: int) -> list[psutil.Process]:
    """Every live descendant of `pid` (empty when it is gone)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline()) or p.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def find_tritonserver(root_pid: int | None = None) -> psutil.Process | None:
    """The tritonserver under `root_pid` (or anywhere, when None): the one `vtfuse serve` supervises."""
    procs = descendants(root_pid) if root_pid else list(psutil.process_iter())
    for p in procs:
        try:
            if p.name() == "tritonserver" or _cmdline(p).split(" ", 1)[0].endswith("/tritonserver"):
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def find_replicas(
    root_pid: int | None = None, deployment: str = "Ingress", app: str = "vtfuse"
) -> list[psutil.Process]:
    """Ray Serve replica processes of `app`/`deployment` (process title `ray::ServeReplica:<app>:<deployment>`)."""
    tag = f"ServeReplica:{app}:{deployment}"
    procs = descendants(root_pid) if root_pid else list(psutil.process_iter())
    return [p for p in procs if tag in _cmdline(p)]


def wait_ready(url: str, timeout: float) -> float:
    """Poll GET /readyz until 200; seconds it took. Raises TimeoutError."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/readyz not 200 after {timeout:.0f} s")



@dataclass
class ServeStack:
    """`vtfuse serve` on free ports as a child process in its own process group; a context manager.

    `env` adds environment variables (VTFUSE_*, TRITON_ADMIN_KEY, ...), `args` adds flags.
    Ray's session files go to a private temporary directory (`ray_tmp`), so its logs are
    this stack's alone. `stop()` sends SIGTERM (the graceful path), waits, then SIGKILLs
    the group and every descendant that outlived it.
    """

    args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    tag: str = "stack"
    via_make: bool = False  # `make serve` (targets already built) instead of `python -m serving.cli serve`
    start_timeout_s: float = 300.0
    api_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    triton_http_port: int = field(default_factory=free_port)
    triton_grpc_port: int = field(default_factory=free_port)
    triton_metrics_port: int = field(default_factory=free_port)
    ray_metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    ray_tmp: Path | None = None
    log_path: Path | None = None
    seen_pids: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        """Base URL of the HTTP API."""
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def pid(self) -> int:
        """PID of the `vtfuse serve` process (of `make` with `via_make`)."""
        assert self.process is not None
        return self.process.pid

    def start(self) -> ServeStack:
        """Start the stack and wait until /readyz answers 200."""
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="vtf", dir="/tmp"))  # short: Ray's socket paths
        self.log_path = LOG_DIR / f"{self.tag}.log"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
            "API_PORT": str(self.api_port),
            "GRPC_PORT": str(self.grpc_port),
            "TRITON_HTTP_PORT": str(self.triton_http_port),
            "TRITON_GRPC_PORT": str(self.triton_grpc_port),
            "TRITON_METRICS_PORT": str(self.triton_metrics_port),
            "RAY_METRICS_PORT": str(self.ray_metrics_port),
            "RAY_TMPDIR": str(self.ray_tmp),
            "TRITON_LOG": str(LOG_DIR / f"{self.tag}-tritonserver.log"),
            "RAY_LOG": str(LOG_DIR / f"{self.tag}-ray.log"),
            **self.env,
        }
        cmd = [sys.executable, "-m", "serving.cli", "serve", *self.args]
        if self.via_make:  # the same interpreter's venv; its install and the model repository count as built
            venv = Path(sys.executable).parent.parent
            built = ["-o", f"{venv}/.installed", "-o", "model_repository/fusion/1/model.onnx"]
            cmd = ["make", "-s", f"VENV={venv}", *built, "serve", f"SERVE_ARGS={' '.join(self.args)}"]
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(
                cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vtfuse serve exited with {self.process.returncode}: see {self.log_path}")
            try:
                wait_ready(self.url, timeout=2)
                self.remember_pids()
                return self
            except TimeoutError:
                continue
        raise TimeoutError(f"{self.url}/readyz not 200 after {self.start_timeout_s:.0f} s: see {self.log_path}")

    def remember_pids(self) -> None:
        """Note every current descendant, so `leftovers()` can tell what outlived the stack."""
        self.seen_pids.update(p.pid for p in descendants(self.pid))

    def leftovers(self) -> list[str]:
        """Processes this stack started that are still alive (after it exited)."""
        alive = []
        for pid in sorted(self.seen_pids):
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{pid} {_cmdline(p)[:100]}")
            except psutil.NoSuchProcess:
                continue
        return alive

    def wait_gone(self, timeout: float) -> bool:
        """Wait until every process this stack started has exited (True) or `timeout` passed."""
        deadline = time.monotonic() + timeout
        while self.leftovers():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.25)
        return True

    def signal(self, sig: int = signal.SIGTERM) -> None:
        """Send a signal to the `vtfuse serve` process only (as `kill PID` would)."""
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        """Exit code after at most `timeout` s (None if still running)."""
        assert self.process is not None
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace_s: float = 90.0) -> int | None:
        """SIGTERM, wait up to `grace_s`, then SIGKILL the group and any descendant left; returns the exit code."""
        if self.process is None:
            return None
        with contextlib.suppress(psutil.NoSuchProcess):
            self.remember_pids()
        code = self.process.poll()
        if code is None:
            self.signal(signal.SIGTERM)
            code = self.wait(grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in self.seen_pids:  # Ray and Triton children live in process groups of their own
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                psutil.Process(pid).kill()
        if code is None:
            code = self.wait(10)
        return code

    def __enter__(self) -> ServeStack:
        try:
            return self.start()
        except BaseException:
            self.stop(grace_s=20)
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.cleanup()

    def cleanup(self) -> None:
        """Remove Ray's session directory of this stack (kept when VTFUSE_KEEP_RAY_TMP is set)."""
        if self.ray_tmp is not None and not os.environ.get("VTFUSE_KEEP_RAY_TMP"):
            shutil.rmtree(self.ray_tmp, ignore_errors=True)


# -- drills ----------------------------------------------------------------------------


async def raw_post(url: str, path: str, body: bytes, api_key: str | None = None, timeout: float = 90.0) -> Outcome:
    """One POST over a fresh socket with a minimal HTTP/1.1 client: far less client CPU than httpx, so that
    a burst from one process reaches the server nearly at once."""
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    key = f"X-API-Key: {api_key}\r\n" if api_key else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{key}\r\n"
    ).encode()
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
    except Exception as e:
        return Outcome(t0, time.monotonic(), 0, error=_classify_exc(httpx.ConnectError(str(e))))
    try:
        writer.write(head + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)  # Connection: close: read to EOF
    except Exception as e:
        return Outcome(t0, time.monotonic(), 0, error=f"dropped: {type(e).__name__}: {e}"[:200])
    finally:
        writer.close()
    t1 = time.monotonic()
    header, _, payload = raw.partition(b"\r\n\r\n")
    lines = header.decode(errors="replace").split("\r\n")
    if not lines or not lines[0].startswith("HTTP/1.1 "):
        return Outcome(t0, t1, 0, error=f"dropped: no HTTP response ({raw[:60]!r})")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":  # de-chunk
        out, rest = b"", payload
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            n = int(size_line.split(b";")[0] or b"0", 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2 :]
        payload = out
    try:
        obj = json.loads(payload)
    except ValueError:
        obj = None
    if status == 200:
        return Outcome(t0, t1, 200, json_body=isinstance(obj, dict))
    ok = isinstance(obj, dict) and set(obj) == {"error"} and bool(obj["error"].get("message"))
    code = obj["error"].get("code", "") if ok else payload[:120].decode(errors="replace")
    return Outcome(t0, t1, status, code, ok, "retry-after" in headers)


def drill_burst(url: str, n: int = 400, api_key: str | None = None) -> dict[str, Any]:
    """`n` requests at once, each on its own connection; each must be answered, quickly, as 200/429/503/504
    with JSON errors (the sockets are opened and written before any answer is read)."""
    bodies = vqa_bodies()

    async def main() -> list[Outcome]:
        return list(await asyncio.gather(*(raw_post(url, "/v1/vqa", bodies[i % 16], api_key) for i in range(n))))

    t0 = time.monotonic()
    outcomes = asyncio.run(main())
    return {"drill": "burst", **summarize(outcomes, t0)}


def _run_loop_with(url: str, clients: int, action: Any, duration_s: float, **kw: Any) -> list[Outcome]:
    """Drive a closed loop for `duration_s` while `action()` runs in a thread (started 3 s in)."""

    async def main() -> list[Outcome]:
        stop = asyncio.Event()
        task = asyncio.create_task(closed_loop(url, clients, stop, **kw))
        await asyncio.sleep(3.0)
        await asyncio.to_thread(action)
        end = time.monotonic() + duration_s
        while time.monotonic() < end and not task.done():
            await asyncio.sleep(0.2)
        stop.set()
        return await task

    return asyncio.run(main())


def drill_triton_kill(
    url: str,
    root_pid: int | None = None,
    clients: int = 24,
    sig: int = signal.SIGKILL,
    window_s: float = 90.0,
    api_key: str | None = None,
) -> dict[str, Any]:
    """Kill tritonserver while `clients` callers send VQA; wait for /readyz and steady 200s again."""
    old = find_tritonserver(root_pid)
    if old is None:
        raise RuntimeError("no tritonserver process found: is `vtfuse serve` running?")
    fault: dict[str, Any] = {}

    def kill() -> None:
        fault["at"] = time.monotonic()
        fault["old_pid"] = old.pid
        old.send_signal(sig)

    def watch() -> None:  # readiness and the new pid, in the background
        while time.monotonic() - fault.get("at", time.monotonic()) < window_s:
            new = find_tritonserver(root_pid)
            if new is not None and new.pid != old.pid and "new_pid" not in fault:
                fault["new_pid"] = new.pid
                fault["new_parent_chain"] = [p.pid for p in new.parents()][:4]
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=3) as r:
                    if r.status == 200 and "at" in fault and "new_pid" in fault:
                        fault.setdefault("ready_s", round(time.monotonic() - fault["at"], 2))
            except OSError:
                fault.setdefault("unready_seen", True)
            if "ready_s" in fault:
                return
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)

    def act() -> None:
        kill()
        watcher.start()

    # Keep the load on until readiness is back plus a few seconds of steady 200s (at most window_s).
    async def main() -> list[Outcome]:
        stop = asyncio.Event()
        task = asyncio.create_task(closed_loop(url, clients, stop, api_key=api_key))
        await asyncio.sleep(3.0)
        act()
        while time.monotonic() - fault["at"] < window_s and "ready_s" not in fault:
            await asyncio.sleep(0.5)
        await asyncio.sleep(8.0)
        stop.set()
        return await task

    outcomes = asyncio.run(main())
    watcher.join(timeout=5)
    return {
        "drill": "triton_kill",
        "signal": signal.Signals(sig).name,
        "clients": clients,
        "old_pid": fault.get("old_pid"),
        "new_pid": fault.get("new_pid"),
        "new_parent_chain": fault.get("new_parent_chain", []),
        "readyz_back_s": fault.get("ready_s"),
        **summarize(outcomes),
        **recovery(outcomes, fault["at"]),
    }


def drill_replica_kill(
    url: str, root_pid: int | None = None, clients: int = 16, api_key: str | None = None
) -> dict[str, Any]:
    """SIGKILL one Ingress replica under load: its in-flight calls are retried elsewhere, Serve replaces it."""
    before = find_replicas(root_pid)
    if not before:
        raise RuntimeError("no Ingress replica process found")
    fault: dict[str, Any] = {}

    def kill() -> None:
        victim = before[0]
        fault["at"] = time.monotonic()
        fault["killed_pid"] = victim.pid
        victim.kill()

    outcomes = _run_loop_with(url, clients, kill, duration_s=12.0, api_key=api_key)
    # Serve replaces the replica: wait for a new process with the same title.
    deadline = time.monotonic() + 90
    replaced = None
    while time.monotonic() < deadline:
        now = {p.pid for p in find_replicas(root_pid)}
        new = now - {p.pid for p in before}
        if new and len(now) >= len(before):
            replaced = round(time.monotonic() - fault["at"], 2)
            break
        time.sleep(0.5)
    return {
        "drill": "replica_kill",
        "clients": clients,
        "replicas": len(before),
        "killed_pid": fault["killed_pid"],
        "replaced_s": replaced,
        **summarize(outcomes),
        **recovery(outcomes, fault["at"]),
    }


def drill_drain(stack: ServeStack, clients: int = 16, api_key: str | None = None) -> dict[str, Any]:
    """SIGTERM to `vtfuse serve` under load: in-flight requests complete, new ones are refused, all of it exits."""
    stack.remember_pids()
    triton = find_tritonserver(stack.pid)
    fault: dict[str, Any] = {}

    def term() -> None:
        fault["at"] = time.monotonic()
        stack.signal(signal.SIGTERM)

    async def main() -> list[Outcome]:
        stop = asyncio.Event()
        wire = OnTheWire()
        task = asyncio.create_task(
            closed_loop(stack.url, clients, stop, stop_on_refusal=True, api_key=api_key, wire=wire)
        )
        await asyncio.sleep(3.0)
        # Signal while half the clients' requests are on the wire: on a busy machine most of them
        # can be in the client's own hands at a given moment, and those are not in flight.
        deadline = time.monotonic() + 10.0
        while wire.n < max(1, clients // 2) and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        fault["on_the_wire"] = wire.n
        term()
        code = await asyncio.to_thread(stack.wait, 120)
        fault["exit_code"] = code
        fault["exit_s"] = round(time.monotonic() - fault["at"], 2)
        fault["all_gone"] = await asyncio.to_thread(stack.wait_gone, 120)  # `make` exits before its child
        fault["all_gone_s"] = round(time.monotonic() - fault["at"], 2)
        stop.set()
        return await task

    outcomes = asyncio.run(main())
    # In flight: sent before the signal, answered after it. One started before it but still in the
    # client's hands then (not all sent) is a new request to a draining server: 503 is its answer.
    at = fault["at"]
    in_flight = [o for o in outcomes if o.sent is not None and o.sent < at < o.end]
    unsent = [o for o in outcomes if o.start < at < o.end and (o.sent is None or o.sent >= at)]
    after = [o for o in outcomes if o.start >= at] + unsent
    return {
        "drill": "drain",
        "clients": clients,
        "exit_code": fault["exit_code"],
        "exit_s": fault["exit_s"],
        "all_exited_s": fault["all_gone_s"] if fault["all_gone"] else None,
        "in_flight_at_sigterm": len(in_flight),
        "in_flight_ok": sum(o.status == 200 for o in in_flight),
        "on_the_wire_at_sigterm": fault["on_the_wire"],
        "started_not_sent_at_sigterm": len(unsent),
        "after_sigterm": dict(Counter(str(o.status) if o.status else o.error.split(":")[0] for o in after)),
        "triton_pid": triton.pid if triton else None,
        "triton_alive_after": bool(triton and triton.is_running() and triton.status() != psutil.STATUS_ZOMBIE),
        "leftover_processes": stack.leftovers(),
        **summarize(outcomes),
    }


# -- several Ray nodes on this machine: node loss and drain ----------------------------

NODE_HEALTH_CONFIG = {  # how fast the GCS declares a dead raylet dead (Ray's defaults: ~15-30 s)
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}


@dataclass
class RayNode:
    """One `ray start --block` in a session of its own, with its own ports and temp dir: the head or a worker."""

    name: str
    temp_dir: Path
    head_address: str | None = None  # None: this node is the head
    num_cpus: int = 1
    resources: dict[str, float] = field(default_factory=lambda: {"vtfuse_triton": 1})
    env: dict[str, str] = field(default_factory=dict)
    gcs_port: int = field(default_factory=free_port)
    manager_port: int = field(default_factory=free_port)  # the raylet's: how the GCS's node list names this node
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    seen_pids: set[int] = field(default_factory=set)

    @property
    def address(self) -> str:
        """The cluster's GCS address (`ray.init`, `--ray-address`)."""
        return self.head_address or f"127.0.0.1:{self.gcs_port}"

    def command(self) -> list[str]:
        """`ray start` with every port of this node its own (several nodes share the machine)."""
        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1", f"--num-cpus={self.num_cpus}", f"--resources={json.dumps(self.resources)}",
            f"--temp-dir={self.temp_dir}", f"--node-manager-port={self.manager_port}",
            f"--object-manager-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--min-worker-port=0", "--max-worker-port=0",  # workers on ports the kernel picks: no clash between nodes
        ]  # fmt: skip
        if self.head_address is None:
            cmd += [
                "--head", f"--port={self.gcs_port}", "--include-dashboard=false",
                f"--ray-client-server-port={free_port()}", f"--system-config={json.dumps(NODE_HEALTH_CONFIG)}",
            ]  # fmt: skip
        else:
            cmd.append(f"--address={self.head_address}")
        return cmd

    def start(self) -> RayNode:
        """Start the node (not waiting: see `LocalRayCluster.wait_nodes`)."""
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"ray-{self.name}.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH"))
                                                           if p), **self.env}
        env.pop("RAY_ADDRESS", None)
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                self.command(), cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self

    def processes(self) -> list[psutil.Process]:
        """Every live process of this node: `ray start`, its raylet, agents and workers, and their Triton."""
        if self.process is None:
            return []
        try:
            root = psutil.Process(self.process.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        self.seen_pids.update(p.pid for p in procs)
        return procs

    def kill(self) -> list[int]:
        """SIGKILL every process of the node at once (a machine lost); their pids."""
        procs = self.processes()
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        if self.process is not None:
            self.process.wait(10)
        return [p.pid for p in procs]

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM `ray start` (it stops what it started), then SIGKILL whatever of the node is left."""
        if self.process is None:
            return
        self.processes()
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in self.seen_pids:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                psutil.Process(pid).kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)


class LocalRayCluster:
    """A head and workers on this machine (loopback), each a `RayNode` with the `vtfuse_triton` resource.

    Never `ray stop` (it would stop every cluster of the machine): each node is stopped through its own
    process group, and every process it ever had is SIGKILLed at the end.
    """

    def __init__(self, workers: int = 1, num_cpus: int = 1, tag: str = "nodes") -> None:
        self.root = Path(tempfile.mkdtemp(prefix="vtn", dir="/tmp"))  # short: Ray's socket paths
        self.num_cpus = num_cpus
        self.tag = tag
        self.head = RayNode(f"{tag}-head", self.root / "h", num_cpus=num_cpus)
        self.workers: list[RayNode] = []
        self._planned = workers
        self._count = 0

    @property
    def address(self) -> str:
        """The GCS address of the head."""
        return self.head.address

    def add_worker(self, env: dict[str, str] | None = None) -> RayNode:
        """Start one more worker joining the head."""
        self._count += 1
        node = RayNode(f"{self.tag}-worker{self._count}", self.root / f"w{self._count}", self.address,
                       self.num_cpus, env=env or {})
        self.workers.append(node.start())
        return node

    def start(self, timeout_s: float = 120.0) -> LocalRayCluster:
        """Start the head, then the workers; wait until every node is alive in the GCS."""
        use_token_auth()
        self.head.start()
        wait_gcs(self.address, timeout_s)
        for _ in range(self._planned):
            self.add_worker()
        self.wait_nodes(1 + self._planned, timeout_s)
        return self

    def alive_nodes(self) -> list[dict[str, Any]]:
        """Alive nodes as the GCS lists them (`ray list nodes` would need the dashboard)."""
        from ray._raylet import GcsClient  # type: ignore[attr-defined]

        gcs = GcsClient(address=self.address)
        infos = gcs.get_all_node_info(timeout=5)
        return [
            {"node_id": nid.hex(), "name": info.node_name, "manager_port": info.node_manager_port}
            for nid, info in infos.items()
            if info.state == 0  # ALIVE
        ]

    def node_id(self, node: RayNode, timeout_s: float = 60.0) -> str:
        """The Ray node id of `node` (once it has joined)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                for n in self.alive_nodes():
                    if n["manager_port"] == node.manager_port:
                        return str(n["node_id"])
            time.sleep(0.5)
        raise TimeoutError(f"node {node.name} did not join within {timeout_s:.0f} s: see {node.log_path}")

    def wait_nodes(self, n: int, timeout_s: float = 120.0) -> list[dict[str, Any]]:
        """Until `n` nodes are alive; TimeoutError naming the logs otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                alive = self.alive_nodes()
                if len(alive) >= n:
                    return alive
            time.sleep(0.5)
        raise TimeoutError(f"{n} Ray nodes not alive after {timeout_s:.0f} s: see {LOG_DIR}/ray-{self.tag}-*.log")

    def stop(self) -> None:
        """Every worker, then the head, each by its own process group; their temp dirs removed."""
        for node in [*self.workers, self.head]:
            with contextlib.suppress(Exception):
                node.stop()
        if not os.environ.get("VTFUSE_KEEP_RAY_TMP"):
            shutil.rmtree(self.root, ignore_errors=True)


def use_token_auth() -> None:
    """Token authentication for every node, this process's GCS clients and `vtfuse serve` (they inherit it).

    Ray 2.60's `ray start --head` turns it on by itself where the user has a token (~/.ray/auth_token, which
    `vtfuse serve` makes), while a joining `ray start` and a driver do not: left implicit, the worker would be
    refused by its own head. The token is made when missing, as the one-machine stack does.
    """
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    from serving.app.raycluster import ensure_auth_token

    os.environ["RAY_AUTH_MODE"] = "token"
    _enable_token_auth()  # Ray caches the mode when it loads: refresh it in this process
    ensure_auth_token()


def wait_gcs(address: str, timeout_s: float) -> None:
    """Until something accepts connections at the GCS address."""
    from serving.app.raycluster import answers

    deadline = time.monotonic() + timeout_s
    while not answers(address, 1.0):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no Ray GCS at {address} after {timeout_s:.0f} s")
        time.sleep(0.25)


def cluster_view(url: str, api_key: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """GET /v1/cluster through a front door."""
    headers = {"X-API-Key": api_key} if api_key else {}
    r = httpx.get(url + "/v1/cluster", headers=headers, timeout=timeout)
    r.raise_for_status()
    return dict(r.json())


def ingress_by_node(view: dict[str, Any]) -> Counter[str]:
    """RUNNING Ingress replicas per node id in a /v1/cluster answer."""
    return Counter(r["node_id"] for r in view["replicas"] if r["deployment"] == "Ingress" and r["state"] == "RUNNING")


def ready_tritons(view: dict[str, Any]) -> dict[str, str]:
    """Node id → gRPC address of every ready Triton in a /v1/cluster answer."""
    return {t["node_id"]: t["grpc"] for t in view["tritons"] if t["state"] == "ready"}


def wait_view(url: str, check: Any, timeout_s: float, api_key: str | None = None) -> tuple[float, dict[str, Any]]:
    """Poll /v1/cluster until `check(view)` holds: (seconds it took, the view). TimeoutError with the last view."""
    t0 = time.monotonic()
    view: dict[str, Any] = {}
    while time.monotonic() - t0 < timeout_s:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            view = cluster_view(url, api_key)
            if check(view):
                return round(time.monotonic() - t0, 2), view
        time.sleep(0.5)
    raise TimeoutError(f"/v1/cluster did not show it within {timeout_s:.0f} s; last: {json.dumps(view)[:1500]}")


def tally(outcomes: Sequence[Outcome]) -> dict[str, int]:
    """Requests sent, completed (200), shed (JSON 429/503 with Retry-After), failed (other JSON errors), lost."""
    completed = sum(o.status == 200 and o.json_body for o in outcomes)
    shed = sum(o.status in (429, 503) and o.json_body and o.retry_after for o in outcomes)
    lost = sum(o.status == 0 or not o.json_body for o in outcomes)
    return {"sent": len(outcomes), "completed": completed, "shed": shed,
            "failed": len(outcomes) - completed - shed - lost, "lost": lost}


def load_during(url: str, clients: int, actions: Any, api_key: str | None = None) -> list[Outcome]:
    """Closed-loop load through `url` while `actions()` runs in a thread (started 3 s in, load stops 3 s after)."""

    async def main() -> list[Outcome]:
        stop = asyncio.Event()
        task = asyncio.create_task(closed_loop(url, clients, stop, api_key=api_key))
        await asyncio.sleep(3.0)
        try:
            await asyncio.to_thread(actions)
        finally:
            await asyncio.sleep(3.0)
            stop.set()
        return await task

    return asyncio.run(main())


def drill_node_kill(
    url: str, cluster: LocalRayCluster, node: RayNode, clients: int = 8, rejoin: bool = True,
    worker_env: dict[str, str] | None = None, api_key: str | None = None, window_s: float = 180.0,
) -> dict[str, Any]:
    """SIGKILL every process of `node` under load through `url` (another node's front door), then let it rejoin.

    Measured: what the load saw (sent, completed, shed, lost), when the GCS declared the node dead,
    when its replicas ran again elsewhere, and with `rejoin`, when a new node in its place had its
    Triton ready and replicas again.
    """
    before = cluster_view(url, api_key)
    replicas = sum(ingress_by_node(before).values())
    victim = cluster.node_id(node)
    fault: dict[str, Any] = {"node_id": victim, "replicas_before": dict(ingress_by_node(before))}
    marks: dict[str, float] = {}

    def act() -> None:
        marks["kill"] = time.monotonic()
        fault["killed_pids"] = len(node.kill())
        cluster.workers.remove(node)
        fault["node_dead_s"], _ = wait_view(
            url, lambda v: not any(n["node_id"] == victim and n["alive"] for n in v["nodes"]), window_s, api_key)
        fault["replicas_rescheduled_s"], view = wait_view(
            url, lambda v: sum(ingress_by_node(v).values()) >= replicas and victim not in ingress_by_node(v),
            window_s, api_key)
        fault["node_dead_s"] = round(fault["node_dead_s"], 2)
        fault["replicas_rescheduled_s"] = round(time.monotonic() - marks["kill"], 2)
        fault["replicas_after_loss"] = dict(ingress_by_node(view))
        marks["loss_over"] = time.monotonic()
        if not rejoin:
            return
        new = cluster.add_worker(worker_env)
        fault["rejoined_node"] = new.name
        t0 = time.monotonic()
        old = {n["node_id"] for n in view["nodes"]}

        def back(v: dict[str, Any]) -> bool:
            fresh = {n["node_id"] for n in v["nodes"] if n["alive"]} - old
            return any(nid in ready_tritons(v) and ingress_by_node(v).get(nid, 0) >= 1 for nid in fresh)

        _, view = wait_view(url, back, window_s, api_key)
        fault["capacity_back_s"] = round(time.monotonic() - t0, 2)
        fault["replicas_after_rejoin"] = dict(ingress_by_node(view))
        fault["tritons_after_rejoin"] = len(ready_tritons(view))

    outcomes = load_during(url, clients, act, api_key)
    kill_at = marks["kill"]
    loss = [o for o in outcomes if o.start < marks.get("loss_over", float("inf"))]
    after = [o for o in outcomes if o.start >= marks.get("loss_over", float("inf"))]
    return {
        "drill": "node_kill",
        "clients": clients,
        **fault,
        "during_loss": tally(loss),
        "during_rejoin": tally(after),
        **summarize(outcomes),
        **recovery(outcomes, kill_at),
    }


def drill_node_drain(
    url: str, cluster: LocalRayCluster, node: RayNode, clients: int = 8, deadline_s: int = 60,
    api_key: str | None = None, window_s: float = 180.0,
) -> dict[str, Any]:
    """`ray drain-node` a node under load through `url`, wait until its replicas run elsewhere, then stop it."""
    node_id = cluster.node_id(node)
    before = cluster_view(url, api_key)
    replicas = sum(ingress_by_node(before).values())
    fault: dict[str, Any] = {"node_id": node_id, "replicas_before": dict(ingress_by_node(before))}
    marks: dict[str, float] = {}

    def act() -> None:
        marks["drain"] = time.monotonic()
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "drain-node", f"--address={cluster.address}",
               f"--node-id={node_id}", "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=vtfuse drain drill",
               f"--deadline-remaining-seconds={deadline_s}"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        fault["drain_command"] = " ".join(["ray", *cmd[3:]])
        fault["drain_rc"] = r.returncode
        if r.returncode != 0:
            raise RuntimeError(f"ray drain-node failed: {r.stdout[-500:]} {r.stderr[-1500:]}")
        fault["replicas_moved_s"], view = wait_view(
            url, lambda v: sum(ingress_by_node(v).values()) >= replicas and node_id not in ingress_by_node(v),
            window_s, api_key)
        fault["replicas_after"] = dict(ingress_by_node(view))
        fault["triton_state_while_draining"] = next(
            (t["state"] for t in view["tritons"] if t["node_id"] == node_id), None)
        # Once nothing runs there (vtfuse stops its Triton when its replicas have moved), Ray lets the drained
        # node's raylet exit; a node that is still up after that is stopped, as the drain's deadline announced.
        gone = lambda v: not any(n["node_id"] == node_id and n["alive"] for n in v["nodes"])  # noqa: E731
        try:
            fault["node_left_s"], _ = wait_view(url, gone, 45, api_key)
            fault["node_left_by_itself"] = True
        except TimeoutError:
            fault["node_left_by_itself"] = False
            node.kill()
            fault["node_left_s"], _ = wait_view(url, gone, window_s, api_key)
        fault["node_left_s"] = round(time.monotonic() - marks["drain"], 2)
        node.kill()  # whatever of it is left
        cluster.workers.remove(node)

    outcomes = load_during(url, clients, act, api_key)
    return {
        "drill": "node_drain",
        "clients": clients,
        **fault,
        "load": tally(outcomes),
        **summarize(outcomes),
    }


@dataclass
class ClusterServe:
    """A `LocalRayCluster` and `vtfuse serve --ray-address` on it: the head's and the workers' front doors."""

    cluster: LocalRayCluster
    stack: ServeStack
    worker_api_port: int

    @property
    def head_url(self) -> str:
        """The head node's front door."""
        return self.stack.url

    @property
    def worker_url(self) -> str:
        """The front door of the other nodes (one port for all of them on this machine)."""
        return f"http://127.0.0.1:{self.worker_api_port}"

    @classmethod
    def start(cls, workers: int = 1, tag: str = "nodes", env: dict[str, str] | None = None,
              start_timeout_s: float = 400.0) -> ClusterServe:
        """The cluster, then `vtfuse serve --ray-address` on it, ready on the head's front door."""
        cluster = LocalRayCluster(workers=workers, tag=tag)
        worker_api_port, worker_grpc_port = free_port(), free_port()
        stack = ServeStack(
            args=("--ray-address", "", "--worker-api-port", str(worker_api_port),
                  "--worker-grpc-port", str(worker_grpc_port)),
            env={"VTFUSE_FRONT": "ray", **(env or {})},
            tag=f"{tag}-serve",
            start_timeout_s=start_timeout_s,
        )
        try:
            cluster.start()
            stack.args = ("--ray-address", cluster.address, *stack.args[2:])
            stack.start()
        except BaseException:
            stack.stop(grace_s=60)
            cluster.stop()
            raise
        return cls(cluster, stack, worker_api_port)

    def wait_spread(self, timeout_s: float = 180.0) -> dict[str, Any]:
        """Until every node runs a ready Triton and an Ingress replica, and each front door is ready; the view.

        A front door is ready when Serve calls its proxy HEALTHY (a proxy is STARTING for a while after a node
        gets its first replica, longer on a busy machine) and the worker's answers /readyz.
        """
        n = 1 + len(self.cluster.workers)

        def spread(v: dict[str, Any]) -> bool:
            alive = {x["node_id"] for x in v["nodes"] if x["alive"]}
            by_node = ingress_by_node(v)
            doors = {d["node_id"] for d in v["front_doors"] if d["status"] == "HEALTHY"}
            return len(alive) == n and alive <= doors and all(
                by_node.get(a, 0) >= 1 and a in ready_tritons(v) for a in alive)

        _, view = wait_view(self.head_url, spread, timeout_s)
        wait_ready(self.worker_url, timeout_s)
        return view

    def stop(self) -> None:
        """`vtfuse serve` (SIGTERM: it removes the app and its Tritons), then every node by its process group."""
        try:
            self.stack.stop(grace_s=90)
        finally:
            self.cluster.stop()
            self.stack.cleanup()


def node_drills(clients: int = 8) -> list[dict[str, Any]]:
    """Two nodes here and `vtfuse serve --ray-address`: the worker killed and rejoined, then drained; the figures."""
    cs = ClusterServe.start()
    try:
        cs.wait_spread()
        results = [drill_node_kill(cs.head_url, cs.cluster, cs.cluster.workers[0], clients)]
        cs.wait_spread()
        results.append(drill_node_drain(cs.head_url, cs.cluster, cs.cluster.workers[0], clients))
        return results
    finally:
        cs.stop()

def main(argv: list[str] | None = None) -> int:
    """CLI: one drill (against --url) or `all` (each on a fresh stack); prints JSON."""
    p = argparse.ArgumentParser(prog="python -m loadtests.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("drill", choices=["burst", "triton-kill", "replica-kill", "drain", "all", "nodes"])
    p.add_argument("--url", default="http://127.0.0.1:8080", help="a running stack's API (not for drain/all)")
    p.add_argument("--requests", type=int, default=400, help="burst size")
    p.add_argument("--clients", type=int, default=24)
    p.add_argument("--signal", default="SIGKILL", help="signal for triton-kill (SIGKILL or SIGTERM)")
    p.add_argument("--api-key", default=os.environ.get("VTFUSE_API_KEY"), help="X-API-Key (env VTFUSE_API_KEY)")
    p.add_argument("--out", help="also write the JSON here")
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sig = signal.Signals[ns.signal]
    results: list[dict[str, Any]] = []
    if ns.drill == "burst":
        results.append(drill_burst(ns.url, ns.requests, ns.api_key))
    elif ns.drill == "triton-kill":
        results.append(drill_triton_kill(ns.url, clients=ns.clients, sig=sig, api_key=ns.api_key))
    elif ns.drill == "replica-kill":
        results.append(drill_replica_kill(ns.url, clients=ns.clients, api_key=ns.api_key))
    elif ns.drill == "drain":
        with ServeStack(tag="drain") as stack:
            results.append(drill_drain(stack, ns.clients))
    elif ns.drill == "nodes":  # a two-node Ray cluster of its own: node loss and drain
        results.extend(node_drills(ns.clients))
    else:
        with ServeStack(tag="chaos") as stack:
            results.append(drill_burst(stack.url, ns.requests))
            results.append(drill_triton_kill(stack.url, stack.pid, ns.clients, sig))
            results.append(drill_replica_kill(stack.url, stack.pid, min(ns.clients, 16)))
            results.append(drill_drain(stack, min(ns.clients, 16)))
    text = json.dumps(results if len(results) > 1 else results[0], indent=2)
    print(text)
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
