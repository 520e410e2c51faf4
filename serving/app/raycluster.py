"""The local Ray cluster of `vtfuse serve`: `ray start --head --block` in a session of its own.

Ray's processes (GCS, raylet, agents, the Serve controller, proxies and replicas) then live
outside the caller's process group: a signal to that group (Ctrl-C, `kill -- -PGID`,
make's forwarding) reaches `vtfuse serve` only, which drains the API before it stops Ray
itself. `stop()` sends SIGTERM to `ray start` (which stops everything it started), then
SIGKILL to whatever of the session is left. `ray start` gets SIGTERM from the kernel when
the thread that started it dies (`PR_SET_PDEATHSIG`), so a SIGKILLed `vtfuse serve` takes
its cluster down too. `ray stop` is never used: it would stop every Ray cluster of the machine.

While it runs, `ray start` points Ray's "current cluster" file at it, so `ray status` or a
`ray.init()` on this machine joins it. `stop()` puts back what the file said before when that
cluster still answers (a cluster of the user's), else removes it as `ray stop` does: left naming
a stopped cluster, it would send a later `ray.init()` there whenever any other Ray cluster runs on
the machine. (A SIGKILLed `vtfuse serve` cannot; the next one's stop removes what it left.)
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from serving.procs import free_port, kill_session, parent_death_signal, session_pids

log = logging.getLogger(__name__)

STARTED = b"Ray runtime started."


def address_file(env: dict[str, str]) -> Path:
    """Where `ray start`, run in `env`, records its address for `ray.init()` (Ray's rule on Linux)."""
    return Path(env.get("RAY_TMPDIR") or env.get("TMPDIR") or "/tmp") / "ray" / "ray_current_cluster"


def answers(address: str, timeout_s: float = 1.0) -> bool:
    """True if something accepts TCP connections at `host:port` (a running GCS does)."""
    host, _, port = address.strip().rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def ensure_auth_token() -> None:
    """This user's Ray token (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or ~/.ray/auth_token), made when missing.

    With `RAY_AUTH_MODE=token`, `ray start --head` refuses to start without one: `ray.init` of a new
    local cluster makes it, `ray start` does not. So on a fresh machine the first `vtfuse serve`
    makes it, as `ray get-auth-token --generate` would, readable by this user only (Ray's own file mode
    follows the umask). Nothing happens with token authentication off.
    """
    from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled

    umask = os.umask(0o077)  # at start-up, before Triton's and Ray's threads and processes exist
    try:
        ensure_token_if_auth_enabled(None, create_token_if_missing=True)
    finally:
        os.umask(umask)


class RayHead:
    """One `ray start --head --block` process on free ports; `start()`, `wait_started()`, `address`, `stop()`."""

    def __init__(
        self,
        num_cpus: int,
        metrics_export_port: int,
        system_config: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        drain_s: float = 5.0,
    ) -> None:
        self.num_cpus = num_cpus
        self.metrics_export_port = metrics_export_port
        self.system_config = system_config or {}
        self.env = env or {}
        self.log_path = log_path
        self.drain_s = drain_s
        self.gcs_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.address_file = address_file({**os.environ, **self.env})
        self._address_before: str | None = None  # the file's content before `ray start` overwrote it
        self._log: IO[bytes] | None = None
        self._offset = 0

    @property
    def address(self) -> str:
        """The GCS address for `ray.init(address=...)`."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def pid(self) -> int | None:
        """PID of `ray start` (also the id of its session)."""
        return None if self.process is None else self.process.pid

    def command(self) -> list[str]:
        """`ray start` with every port of the head chosen free (two stacks on one machine do not collide)."""
        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
            f"--port={self.gcs_port}",
            f"--num-cpus={self.num_cpus}",
            "--include-dashboard=false",
            f"--dashboard-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            f"--metrics-export-port={self.metrics_export_port}",
            "--disable-usage-stats",
        ]  # fmt: skip
        if self.system_config:
            cmd.append(f"--system-config={json.dumps(self.system_config)}")
        return cmd

    def start(self) -> RayHead:
        """Start `ray start` (not waiting: see `wait_started`)."""
        ensure_auth_token()
        try:
            self._address_before = self.address_file.read_text()
        except OSError:
            self._address_before = None
        env = {**os.environ, **self.env}
        # After the API drained, nothing is left for Ray's own SIGTERM drain to wait for.
        env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", f"{self.drain_s:g}")
        out: Any = subprocess.DEVNULL
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")  # noqa: SIM115 — closed in stop()
            self._offset = self._log.tell()
            out = self._log
        self.process = subprocess.Popen(
            self.command(),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a signal to our process group does not reach Ray before the drain
            preexec_fn=parent_death_signal(signal.SIGTERM),
        )
        log.info("ray start --head: pid %d, GCS %s, log %s", self.process.pid, self.address, self.log_path)
        return self

    def wait_started(self, timeout: float = 180.0) -> None:
        """Until `ray start` says the runtime started; RuntimeError if it exits or takes longer."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"ray start exited with code {code}{self._log_hint()}")
            if self.log_path is None:
                return
            with open(self.log_path, "rb") as f:
                f.seek(self._offset)
                if STARTED in f.read():
                    return
            time.sleep(0.25)
        raise RuntimeError(f"ray start did not start within {timeout:.0f} s{self._log_hint()}")

    def _log_hint(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            return f"; {self.log_path}:\n" + f.read()[-3000:].decode(errors="replace")

    def forget_address(self) -> None:
        """If Ray's current-cluster file names this cluster still: the one it named before if that answers, or none."""
        try:
            if self.address_file.read_text().strip().rpartition(":")[2] != str(self.gcs_port):
                return  # another cluster started since: the file is its now
            if self._address_before and answers(self._address_before):
                self.address_file.write_text(self._address_before)
            else:
                self.address_file.unlink()
        except OSError:  # no file, or not ours to change
            pass

    def alive(self) -> bool:
        """True while `ray start` runs."""
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM `ray start` (it stops the processes it started), wait, then SIGKILL what is left of its session."""
        if self.process is None:
            return
        sid = self.process.pid
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("ray start did not exit within %.0f s: killing its session", timeout)
        deadline = time.monotonic() + 10.0
        while session_pids(sid) and time.monotonic() < deadline:
            if not kill_session(sid, signal.SIGKILL):
                break
            time.sleep(0.2)
        if self.process.poll() is None:
            self.process.wait(timeout=10)
        left = session_pids(sid)
        if left:
            log.error("Ray processes still alive after SIGKILL: %s", left)
        self.forget_address()
        if self._log is not None:
            self._log.close()
            self._log = None
