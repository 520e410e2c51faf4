"""Process plumbing for the servers vtfuse starts: ports, parent-death signals, sessions (Linux `/proc`).

* `free_port` hands out a port nobody listens on, outside the kernel's ephemeral range.
* `check_ports_free` refuses to start on a port another process listens on, naming the port
  and, where `/proc` tells, the holder's pid and name (`PortInUse`).
* `listens_on` tells whether a process of ours is the one listening on a port, so a readiness
  probe is not fooled by a stranger answering on it.
* `parent_death_signal` is a `preexec_fn`: the child gets a signal when the thread that
  started it dies (`prctl(PR_SET_PDEATHSIG)`), so a SIGKILLed parent leaves nothing behind.
* `session_pids` / `kill_session`: every process of a session, as a server started with
  `start_new_session=True` and its children (which may make process groups of their own).
* `ParentSignalWatch`: GNU make does not pass SIGINT on to its recipe (it counts on the
  terminal signalling the whole group); this notices that the parent is handling one.
* `SignalRelay`: SIGINT/SIGTERM handled on a thread of its own. A Python signal handler runs
  in the main thread between two bytecodes, wherever that thread is, even inside
  `threading.Event.wait` holding the event's lock: a handler that takes a lock can hang the
  process. The relay's handler only writes the signal's number into a pipe.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

PROC = Path("/proc")
_TCP_LISTEN = "0A"
PR_SET_PDEATHSIG = 1


class PortInUse(RuntimeError):
    """A port we were to listen on is taken; the message names it and its holder."""

    def __init__(self, message: str, ports: list[int]) -> None:
        super().__init__(message)
        self.ports = ports


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in (PROC / "sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


_handed_out: set[int] = set()  # ports this process gave out, which their server may not have bound yet


def reserve_ports(ports: Iterable[int]) -> None:
    """Never hand out `ports` here: a parent picked them for this process's servers, which have not bound them yet.

    `vtfuse serve` gets its API and Triton ports from its caller and picks Ray's and HAProxy's
    own with `free_port()`; without this it could pick its own API port before HAProxy binds it
    (a test run once failed so).
    """
    _handed_out.update(int(p) for p in ports)


def free_port(tries: int = 200) -> int:
    """A TCP port nobody listens on now, above the kernel's ephemeral range where there is room.

    A port from `bind(0)` comes out of the ephemeral range, where any outgoing connection (Ray's
    workers open many) may take it before the server it was meant for binds it: a CI run once
    failed so (HAProxy "cannot bind socket (Address already in use)"). Above the range only a
    server that picked the same number can collide, and a port is never handed out twice here.
    """
    _, hi = _ephemeral_range()
    if hi + 1000 <= 65535:
        for _ in range(tries):
            port = random.randint(hi + 1, 65535)
            if port in _handed_out:
                continue
            try:
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))  # also fails when something holds it on 127.0.0.1 only
            except OSError:
                continue
            _handed_out.add(port)
            return port
    with socket.socket() as s:  # no room above the range: the kernel's pick
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on TCP `port` (any address, IPv4 or IPv6), from /proc/net/tcp{,6}."""
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _TCP_LISTEN:
                continue
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def _pids_with_sockets(inodes: set[str], pids: list[int] | None = None) -> list[int]:
    """Processes holding one of these socket inodes open (those whose /proc/PID/fd we may read)."""
    if not inodes:
        return []
    targets = {f"socket:[{i}]" for i in inodes}
    found = []
    candidates = pids if pids is not None else [int(p.name) for p in PROC.glob("[0-9]*")]
    for pid in candidates:
        try:
            for fd in (PROC / str(pid) / "fd").iterdir():
                try:
                    if os.readlink(fd) in targets:
                        found.append(pid)
                        break
                except OSError:
                    continue
        except OSError:
            continue
    return found


def process_name(pid: int) -> str:
    """The process's command name (`/proc/PID/comm`), or "?"."""
    try:
        return (PROC / str(pid) / "comm").read_text().strip() or "?"
    except OSError:
        return "?"


def port_holders(port: int) -> list[tuple[int, str]]:
    """(pid, name) of every process listening on TCP `port`; empty when none or not visible to us."""
    return [(pid, process_name(pid)) for pid in _pids_with_sockets(_listening_inodes(port))]


def port_taken(host: str, port: int) -> bool:
    """True when binding `host:port` fails (someone listens there); TIME_WAIT leftovers do not count."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def describe_port(port: int, what: str) -> str:
    """'port 8000 (Triton HTTP) is in use by pid 1234 (python3)', or '... by another process' when unknown."""
    holders = port_holders(port)
    who = ", ".join(f"pid {pid} ({name})" for pid, name in holders) or "another process"
    return f"port {port} ({what}) is in use by {who}"


def check_ports_free(ports: Mapping[str, int], host: str = "127.0.0.1") -> None:
    """Raise PortInUse naming every port of `ports` (label → port) already taken on `host`, and its holder."""
    taken = [(what, port) for what, port in ports.items() if port and port_taken(host, port)]
    if taken:
        lines = [describe_port(port, what) for what, port in taken]
        raise PortInUse("; ".join(lines) + ": stop that process or choose another port", [port for _, port in taken])


def listens_on(pid: int, port: int) -> bool | None:
    """Whether process `pid` listens on TCP `port`; None where /proc cannot tell (not Linux)."""
    if not (PROC / str(pid)).exists():
        return None if not PROC.is_dir() else False
    return bool(_pids_with_sockets(_listening_inodes(port), [pid]))


def parent_death_signal(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` asking the kernel to send the child `sig` when its parent thread dies (Linux; else None).

    Start such a child from a thread that lives as long as the child should (the main thread):
    the signal follows the death of the *thread* that forked it. If the parent is already gone
    by the time the child runs, the child signals itself.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


def process_identity(pid: int) -> str:
    """`pid` and its start time from /proc (a pid reused by a later process has another); "" if none runs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return f"{pid} {stat.rsplit(')', 1)[-1].split()[19]}"  # field 22, counted after "pid (comm)"


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid` (their session id is field 6 of /proc/PID/stat)."""
    pids = []
    for p in PROC.glob("[0-9]*"):
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()  # after "pid (comm)": state ppid pgrp session ...
        if len(fields) > 3 and fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(p.name))
    return pids


def kill_session(sid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Send `sig` to every process of session `sid`; returns their pids."""
    pids = session_pids(sid)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    return pids


def _sigmask(pid: int, field: str) -> int:
    for line in (PROC / str(pid) / "status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    return 0


class ParentSignalWatch(threading.Thread):
    """Calls `on_signal(signum)` once when the parent process starts handling SIGINT, SIGTERM or SIGHUP.

    GNU make, sent SIGINT alone (not its whole process group), deletes its targets and waits
    for its recipe without passing the signal on. Its handler first resets the signal to its
    default action, and the signal stays blocked while the handler waits: in /proc/PID/status
    the signal is in `SigBlk` and has left `SigCgt`. Both are polled, so make's brief
    signal-blocking sections (starting a job blocks the fatal signals for a moment, SIGINT
    still caught) are not taken for it, at start or later. A signal that already looked handled
    when the watch began (a parent that blocks it and never catches it) is not watched.
    """

    WATCHED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, on_signal: Callable[[int], None], every_s: float = 0.25) -> None:
        super().__init__(name="parent-signal-watch", daemon=True)
        self.on_signal = on_signal
        self.every_s = every_s
        self.parent = os.getppid()
        self._cancel = threading.Event()
        try:
            self.watched = [s for s in self.WATCHED if s not in self.handling()]
        except OSError:
            self.watched = []

    def handling(self) -> list[signal.Signals]:
        """The watched signals the parent is handling now: blocked, and no longer caught."""
        blocked, caught = _sigmask(self.parent, "SigBlk"), _sigmask(self.parent, "SigCgt")
        return [s for s in self.WATCHED if blocked & (1 << (int(s) - 1)) and not caught & (1 << (int(s) - 1))]

    def run(self) -> None:
        while self.watched and not self._cancel.wait(self.every_s):
            if os.getppid() != self.parent:
                return  # the parent is gone: PR_SET_PDEATHSIG takes over
            try:
                now = [s for s in self.handling() if s in self.watched]
            except OSError:
                return
            if now:
                log.info("the parent process (pid %d) is handling %s: stopping", self.parent, now[0].name)
                self.on_signal(int(now[0]))
                return

    def cancel(self) -> None:
        """Stop watching."""
        self._cancel.set()


class SignalRelay(threading.Thread):
    """Calls `on_signal(signum)` on this thread for each SIGINT/SIGTERM the process gets.

    The handler `install` sets does nothing but `os.write` (no lock, no allocation that can
    block), so the main thread may be anywhere when the signal lands. Call `install` again
    after a library replaced the handlers (`ray.init` does).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_signal: Callable[[int], None]) -> None:
        super().__init__(name="signal-relay", daemon=True)
        self.on_signal = on_signal
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)  # a full pipe drops the byte: the relay already has work

    def _handler(self, signum: int, _frame: object) -> None:
        try:
            os.write(self._write, bytes([signum]))
        except OSError:
            pass

    def install(self) -> None:
        """(Re)install the handlers; starts the relay thread the first time."""
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)
        if not self.is_alive():
            self.start()

    def run(self) -> None:
        while True:
            try:
                data = os.read(self._read, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                self.on_signal(signum)
