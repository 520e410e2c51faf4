"""Clean stop, every way: `make serve` under each signal leaves no process, port or shared memory behind.

Each case starts its own `make serve` (real tritonserver, real Ray Serve, free ports), records
every process of the stack (the descendants of make and the sessions they run in: Ray's and
Triton's are sessions of their own), sends one signal, and then checks within 60 s: no
recorded process alive, no process left in those sessions, every port bindable, no
`/dev/shm/vtfuse<grpc port>_*` region. Where the signal allows a drain, Ray's current-cluster file
no longer names the stopped cluster (a later `ray.init()` would try to join it), and VQA requests sent
by 8 clients while it arrives are answered (200, or a JSON 503 `shutting_down` for one
that had not reached the front door when the drain began; none dropped). Then: a port held by another process (one
that answers HTTP 200 to every GET) is refused by `vtfuse triton` and by `make serve` within
seconds, naming the port and the holder's pid. And on a machine where Ray has no token yet (a fresh
HOME), `make serve` makes one, readable by its owner only, and answers. A running cluster of the user's that
Ray's current-cluster file named before is named there again once ours stops. The case timings go to
build/chaos/stop-results.json.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from loadtests import chaos
from serving.app import raycluster
from serving.paths import REPO_ROOT
from serving.procs import free_port, session_pids
from serving.triton.launcher import TritonSettings
from tests.helpers import fresh_samples

pytestmark = [pytest.mark.integration]

STOP_BUDGET_S = 60.0
RESULTS: dict[str, dict] = {}

# A stranger on the ports: HTTP 200 to every GET on the first, a bare listening socket on the others.
HOLDER = textwrap.dedent(
    """
    import http.server, socket, sys
    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
        def log_message(self, *a): pass
    ports = [int(p) for p in sys.argv[1:]]
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", ports[0]), Ok)
    keep = []
    for p in ports[1:]:
        s = socket.socket(); s.bind(("127.0.0.1", p)); s.listen(); keep.append(s)
    print("listening", flush=True)
    srv.serve_forever()
    """
)


@contextlib.contextmanager
def port_holder(*ports: int) -> Iterator[subprocess.Popen[bytes]]:
    """Another process listening on `ports` (answering HTTP 200 on the first) for the duration."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, *map(str, ports)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"listening"
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def bindable(port: int) -> bool:
    """A server could listen on `port` now (SO_REUSEADDR, as servers bind: TIME_WAIT does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def stack_ports(st: chaos.ServeStack) -> list[int]:
    return [
        st.api_port,
        st.grpc_port,
        st.triton_http_port,
        st.triton_grpc_port,
        st.triton_metrics_port,
        st.ray_metrics_port,
    ]


def serve_process(st: chaos.ServeStack) -> psutil.Process:
    """The `vtfuse serve` process under make."""
    for p in chaos.descendants(st.pid):
        if "serving.cli" in " ".join(p.cmdline()) and " serve" in " ".join(p.cmdline()):
            return p
    raise AssertionError("no vtfuse serve process under make")


def sessions_of(pids: set[int]) -> set[int]:
    sids = set()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            sids.add(os.getsid(pid))
    return sids - {os.getsid(0)}


def leftovers(st: chaos.ServeStack, sids: set[int]) -> list[str]:
    left = st.leftovers()
    for sid in sids:
        for pid in session_pids(sid):
            with contextlib.suppress(psutil.NoSuchProcess):
                left.append(f"{pid} (session {sid}) {' '.join(psutil.Process(pid).cmdline())[:100]}")
    return left


def stop_timeline(st: chaos.ServeStack) -> str:
    """The stack's own log lines about its stop (drain, each step's time, what did not return), for a failure."""
    if st.log_path is None or not st.log_path.exists():
        return ""
    keys = ("serving.app.cli", "serving.app.raycluster", "serving.triton")
    lines = [ln for ln in st.log_path.read_text(errors="replace").splitlines() if any(k in ln for k in keys)]
    return "\n".join(lines[-20:])


CASES = {
    # name: (signal, whom)
    "sigterm-group": (signal.SIGTERM, "group"),
    "sigint-group": (signal.SIGINT, "group"),
    "sigterm-make": (signal.SIGTERM, "make"),
    "sigint-make": (signal.SIGINT, "make"),
    "sigkill-serve": (signal.SIGKILL, "serve"),
}


@pytest.mark.timeout(420)
@pytest.mark.parametrize("case", list(CASES))
def test_signal_stops_everything(case: str) -> None:
    sig, whom = CASES[case]
    drains = sig != signal.SIGKILL
    st = chaos.ServeStack(tag=f"stop-{case}", via_make=True, env={"DRAIN_TIMEOUT": "20"}, start_timeout_s=300)
    try:
        t_start = time.monotonic()
        st.start()
        started_s = time.monotonic() - t_start
        serve = serve_process(st)
        triton = chaos.find_tritonserver(st.pid)
        assert triton is not None
        shm = f"/dev/shm/{TritonSettings(grpc_port=st.triton_grpc_port).shm_prefix}*"
        assert glob.glob(shm), "the Python-backend stubs' shared memory should be there"
        # Ray's current-cluster file names this stack's GCS while it runs (`ray status` finds it here).
        address_file = raycluster.address_file({"RAY_TMPDIR": str(st.ray_tmp)})
        assert address_file.exists(), "ray start should point Ray's current-cluster file at its GCS"
        st.remember_pids()
        sids = sessions_of(st.seen_pids | {st.pid})
        assert len(sids) >= 2, f"Ray and Triton run in sessions of their own: {sids}"
        target = {"group": -st.pid, "make": st.pid, "serve": serve.pid}[whom]
        fault: dict[str, float] = {}

        def send() -> None:
            st.remember_pids()  # replicas started since
            fault["at"] = time.monotonic()
            os.kill(target, sig) if target > 0 else os.killpg(-target, sig)

        async def main() -> list[chaos.Outcome]:
            stop = asyncio.Event()
            load = asyncio.create_task(chaos.closed_loop(st.url, 8, stop, stop_on_refusal=True))
            await asyncio.sleep(2.0)
            send()
            fault["gone"] = await asyncio.to_thread(lambda: float(st.wait_gone(STOP_BUDGET_S)))
            fault["gone_s"] = time.monotonic() - fault["at"]
            stop.set()
            return await load

        outcomes = asyncio.run(main())
        sids |= sessions_of(st.seen_pids)
        left = leftovers(st, sids)
        deadline = fault["at"] + STOP_BUDGET_S
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = leftovers(st, sids)
        all_gone_s = time.monotonic() - fault["at"]
        taken = [p for p in stack_ports(st) if not bindable(p)]
        in_flight = [o for o in outcomes if o.start < fault["at"] < o.end]
        RESULTS[case] = {
            "start_s": round(started_s, 1),
            "all_gone_s": round(all_gone_s, 1),
            "make_exit": st.wait(5),
            "in_flight": len(in_flight),
            "in_flight_ok": sum(o.status == 200 for o in in_flight),
            "after": dict(Counter(str(o.status) if o.status else o.error.split(":")[0] for o in outcomes)),
        }
        assert not left, f"{case}: still alive {all_gone_s:.0f} s after the signal: {left}\n{stop_timeline(st)}"
        assert all_gone_s <= STOP_BUDGET_S
        assert not taken, f"{case}: ports still taken: {taken}"
        assert not glob.glob(shm), f"{case}: Triton shared memory left: {glob.glob(shm)}"
        if drains:  # admitted requests finish; one still queued before admission may get a clean 503
            # ...and, as `ray stop` does, the pointer goes with the cluster: a later ray.init() would try to join it.
            assert not address_file.exists(), f"{case}: Ray's current-cluster file still names the stopped cluster"
            assert in_flight and RESULTS[case]["in_flight_ok"], RESULTS[case]
            refused = [o for o in in_flight if o.status != 200]
            assert all(o.status == 503 and o.code == "shutting_down" for o in refused), f"{case}: {RESULTS[case]}"
    finally:
        st.stop(grace_s=30)
        st.cleanup()
        out = chaos.LOG_DIR / "stop-results.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(out.read_text()) if out.exists() else {}
        out.write_text(json.dumps({**previous, **RESULTS}, indent=2) + "\n")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("before", ["running", "stopped"])
def test_ray_head_gives_back_the_current_cluster_file_it_found(before: str) -> None:
    """A cluster of the user's named in Ray's current-cluster file is named there again once ours stops;
    an address from before that nothing answers any more (a killed cluster's) is not put back."""
    tmp = Path(tempfile.mkdtemp(prefix="vtf", dir="/tmp"))  # short: Ray's socket paths
    users = socket.create_server(("127.0.0.1", 0))  # stands in for the user's GCS: it accepts connections
    try:
        address = f"127.0.0.1:{users.getsockname()[1]}" if before == "running" else f"127.0.0.1:{free_port()}"
        file = raycluster.address_file({"RAY_TMPDIR": str(tmp)})
        file.parent.mkdir(parents=True)
        file.write_text(address)
        head = raycluster.RayHead(1, free_port(), env={"RAY_TMPDIR": str(tmp)}, log_path=tmp / "ray.log")
        try:
            head.start().wait_started(timeout=90)
            assert file.read_text().strip().endswith(f":{head.gcs_port}")  # ray start points it at ours
        finally:
            head.stop()
        if before == "running":
            assert file.read_text() == address
        else:
            assert not file.exists()
    finally:
        users.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.timeout(120)
def test_vtfuse_triton_refuses_a_taken_port() -> None:
    http, grpc, metrics = free_port(), free_port(), free_port()
    with port_holder(http, grpc) as holder:
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", "serving.cli", "triton", "--http-port", str(http), "--grpc-port", str(grpc)]
        res = subprocess.run(
            [*cmd, "--metrics-port", str(metrics)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=100
        )
        took = time.monotonic() - t0
    assert res.returncode == 2, res
    assert f"port {http} (Triton HTTP) is in use by pid {holder.pid}" in res.stderr, res.stderr
    assert f"port {grpc} (Triton gRPC) is in use by pid {holder.pid}" in res.stderr, res.stderr
    # No tritonserver of this command (the session's own servers, children of pytest too, do not count).
    ours = [p for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "tritonserver" and f"--http-port={http}" in (p.info["cmdline"] or [])]
    assert not ours and took < 60


@pytest.mark.timeout(200)
def test_make_serve_refuses_a_taken_port() -> None:
    """The stranger answers 200 on Triton's HTTP port: `make serve` names it instead of calling it ready."""
    st = chaos.ServeStack(tag="stop-port-taken", via_make=True, start_timeout_s=150)
    with port_holder(st.triton_http_port, st.triton_grpc_port) as holder:
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="exited"):
            st.start()
        took = time.monotonic() - t0
        text = st.log_path.read_text() if st.log_path else ""
        st.stop(grace_s=10)
        st.cleanup()
    assert st.process is not None and st.process.returncode != 0
    assert f"port {st.triton_http_port} (Triton HTTP, TRITON_HTTP_PORT) is in use by pid {holder.pid}" in text, text
    assert f"port {st.triton_grpc_port} (Triton gRPC, TRITON_GRPC_PORT) is in use by pid {holder.pid}" in text
    assert took < 120, took
    assert not [p for p in st.seen_pids if psutil.pid_exists(p)]


@pytest.mark.timeout(400)
def test_make_serve_starts_where_ray_has_no_token_yet(tmp_path) -> None:
    """A fresh machine: no Ray token in HOME. `make serve` makes one (owner-only) and answers questions right."""
    home = tmp_path / "home"
    home.mkdir()
    st = chaos.ServeStack(tag="stop-fresh-home", via_make=True, env={"HOME": str(home)}, start_timeout_s=300)
    try:
        st.start()
        samples = fresh_samples(8, seed=77)
        with httpx.Client(base_url=st.url, timeout=60) as client:
            answers = [
                client.post("/v1/vqa", json={"image": base64.b64encode(img).decode(), "questions": [qa.question]})
                for img, qa, _ in samples
            ]
    finally:
        st.stop(grace_s=30)
        st.cleanup()
    assert [r.status_code for r in answers] == [200] * len(samples), [r.text for r in answers]
    right = sum(r.json()["answers"][0]["answer"] == qa.answer for r, (_, qa, _) in zip(answers, samples))
    assert right >= 7, [(r.json()["answers"][0]["answer"], qa.answer) for r, (_, qa, _) in zip(answers, samples)]
    token = home / ".ray" / "auth_token"
    assert token.exists() and token.read_text().strip()
    assert token.stat().st_mode & 0o077 == 0, oct(token.stat().st_mode)  # a secret: the owner's alone
