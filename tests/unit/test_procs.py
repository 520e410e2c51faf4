"""serving.procs (taken ports and their holders, parent-death signals, sessions); the supervisor and a taken port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving.paths import REPO_ROOT
from serving.procs import (
    PortInUse,
    check_ports_free,
    free_port,
    listens_on,
    port_holders,
    port_taken,
    process_name,
    reserve_ports,
    session_pids,
)
from serving.triton.launcher import TritonSettings
from serving.triton.supervisor import TritonSupervisor

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux /proc")


def test_a_taken_port_is_refused_naming_its_holder():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port_taken("127.0.0.1", port)
        assert (os.getpid(), process_name(os.getpid())) in port_holders(port)
        assert listens_on(os.getpid(), port) is True
        with pytest.raises(PortInUse) as refused:
            check_ports_free({"Triton HTTP, TRITON_HTTP_PORT": port, "unused": 0})
        msg = str(refused.value)
        assert f"port {port} (Triton HTTP, TRITON_HTTP_PORT) is in use by pid {os.getpid()}" in msg
        assert refused.value.ports == [port]
    assert not port_taken("127.0.0.1", port) and listens_on(os.getpid(), port) is False
    check_ports_free({"free": port})


def test_free_ports_lie_above_the_ephemeral_range_and_are_never_handed_out_twice(monkeypatch):
    # An outgoing connection takes its local port from the ephemeral range: a port picked there can
    # be gone before our server binds it (a CI run failed so).
    lo, hi = (int(x) for x in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    if hi + 1000 <= 65535:
        assert all(hi < p <= 65535 for p in ports), (lo, hi)
    with socket.socket() as s:  # each is bindable on every address
        s.bind(("0.0.0.0", ports[-1]))
    # A port someone listens on is skipped, even one this process never handed out.
    import random

    randint = random.randint
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        taken = s.getsockname()[1]
        first = iter([taken])
        monkeypatch.setattr(random, "randint", lambda a, b: next(first, None) or randint(a, b))
        assert free_port() != taken


def test_reserved_ports_are_never_handed_out(monkeypatch):
    # `vtfuse serve` reserves the API and Triton ports its caller chose (not bound yet) before
    # picking Ray's and HAProxy's: a test stack once lost its API port to one of those picks.
    import random

    _, hi = (int(x) for x in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    if hi + 1000 > 65535:
        pytest.skip("no room above the ephemeral range: free_port() takes the kernel's pick")
    free = [free_port() for _ in range(3)]  # bindable now; handed out, so forget them again below
    from serving import procs

    monkeypatch.setattr(procs, "_handed_out", set())
    reserve_ports(free[:2])
    picks = iter(free)  # the picker draws both reserved ports first
    monkeypatch.setattr(random, "randint", lambda a, b: next(picks))
    assert free_port() == free[2]


def test_a_child_gets_the_parent_death_signal_and_sessions_are_listed():
    """The middle process starts `sleep` with the pre-exec hook, then exits: the kernel ends the sleep."""
    code = (
        "import subprocess, signal; from serving.procs import parent_death_signal; "
        "p = subprocess.Popen(['sleep', '60'], start_new_session=True, "
        "preexec_fn=parent_death_signal(signal.SIGTERM)); "
        "print(p.pid, flush=True)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    child = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10
    while child in session_pids(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child not in session_pids(child), "the child outlived its parent"


def test_session_pids_lists_a_session():
    p = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        assert session_pids(p.pid) == [p.pid]
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert session_pids(p.pid) == []


def test_the_supervisor_gives_up_when_a_restart_finds_its_port_taken(monkeypatch):
    class Server:
        started = 0

        def __init__(self, settings, log_path=None):
            self.code = None
            self.process = type("P", (), {"pid": 2000 + Server.started})()

        def start(self):
            Server.started += 1
            if Server.started > 1:
                raise PortInUse("port 8000 (Triton HTTP) is in use by pid 42 (python3)", [8000])
            return self

        def wait_ready(self, timeout=0):
            return None

        def poll(self):
            return self.code

        def kill(self):
            self.code = -9

        def stop(self):
            return self.code

    monkeypatch.setattr("serving.triton.supervisor.TritonServer", Server)
    sup = TritonSupervisor(TritonSettings(), backoff_initial_s=0.01, is_live=lambda h, p: True)
    sup.start()
    try:
        sup.server.code = -9  # dies; the restart finds the port taken
        deadline = time.monotonic() + 10
        while sup.failure is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
        assert sup.failure and "pid 42" in sup.failure and Server.started == 2  # no loop
    finally:
        sup.stop()


RELAY_CHILD = """
import os, signal, sys, threading, time
from serving.procs import SignalRelay

stop = threading.Event()
got = []
def on_signal(signum):
    got.append((signum, threading.current_thread().name))
    if len(got) == 2:
        stop.set()
SignalRelay(on_signal).install()
print("ready", flush=True)
while not stop.wait(0.001):  # the main thread spends its time inside Event.wait, as `vtfuse serve` does
    pass
print(got, flush=True)
"""


def test_signal_relay_hands_each_signal_to_its_own_thread():
    """SIGTERM then SIGINT reach `on_signal` in order, on the relay thread, while the main thread waits."""
    child = subprocess.Popen([sys.executable, "-c", RELAY_CHILD], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=10)
    finally:
        child.kill()
    assert child.returncode == 0
    assert out.strip() == str([(int(signal.SIGTERM), "signal-relay"), (int(signal.SIGINT), "signal-relay")])


WATCH_CHILD = """
import os, sys, time
sys.path.insert(0, sys.argv[2])
from serving.procs import ParentSignalWatch
out = sys.argv[1]

def fired(signum):
    with open(out, "w") as f:
        f.write(str(signum))
    os._exit(0)

watch = ParentSignalWatch(fired, every_s=0.05)
watch.start()
open(out + ".ready", "w").close()
time.sleep(30)
"""


def _busy_loops(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


@pytest.mark.parametrize("busy", [0, 2])
def test_the_parent_watch_sees_make_handle_a_sigint_even_on_a_saturated_cpu(tmp_path, busy):
    """SIGINT to make alone: make waits for its recipe without passing it on; the watch notices, every time."""
    makefile, script, out = tmp_path / "Makefile", tmp_path / "child.py", tmp_path / "fired"
    script.write_text(WATCH_CHILD)
    makefile.write_text(f"all:\n\t{sys.executable} {script} {out} {REPO_ROOT}\n")
    loops = _busy_loops(busy)
    try:
        for attempt in range(3 if busy else 1):
            for f in (out, Path(str(out) + ".ready")):
                f.unlink(missing_ok=True)
            make = subprocess.Popen(["make", "-s", "-f", str(makefile), "all"], cwd=tmp_path, start_new_session=True,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            try:
                deadline = time.monotonic() + 60
                while not Path(str(out) + ".ready").exists():
                    assert time.monotonic() < deadline and make.poll() is None, "the recipe never started"
                    time.sleep(0.05)
                os.kill(make.pid, signal.SIGINT)
                make.wait(timeout=30)  # the recipe stopped itself once it saw the signal, so make could end
                assert out.read_text() == str(int(signal.SIGINT)), attempt
            finally:
                if make.poll() is None:
                    os.killpg(make.pid, signal.SIGKILL)
    finally:
        for p in loops:
            p.kill()


PARENT_BLOCKING_AT_START = """
import signal, subprocess, sys, time
signal.signal(signal.SIGINT, lambda *a: None)                 # caught, as make catches it
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})      # blocked a moment, as make starting a job
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]])
while not __import__("os").path.exists(sys.argv[2] + ".ready"):
    time.sleep(0.02)                                           # the child built its watch in that moment
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
time.sleep(0.3)
signal.signal(signal.SIGINT, signal.SIG_DFL)                   # now handling it, as make's handler does
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
child.wait(timeout=20)
"""


def test_the_parent_watch_is_not_blinded_by_a_signal_blocked_when_it_started(tmp_path):
    out = tmp_path / "fired"
    done = subprocess.run([sys.executable, "-c", PARENT_BLOCKING_AT_START, WATCH_CHILD, str(out), str(REPO_ROOT)],
                          timeout=60, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.read_text() == str(int(signal.SIGINT))
