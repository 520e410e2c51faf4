"""serving.procs (taken ports and their holders, parent-death signals, sessions); the supervisor and a taken port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

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
