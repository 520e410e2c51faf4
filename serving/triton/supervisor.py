"""Keep a tritonserver child alive: restart it with capped backoff when it dies, until asked to stop.

Triton stays a child of the process that runs the supervisor (`vtfuse serve`), so stopping
that process stops Triton too. Each restart first clears the dead server's process group
(orphaned Python-backend stubs) and its shared-memory regions. A server that is alive but
has not answered its liveness endpoint for `hang_after_s` (a deadlock, a stopped process)
is killed and restarted like a dead one; so is a restart that never becomes ready. A restart
that finds one of Triton's ports held by another process gives up instead of looping: `failure`
says why, and the owner (`vtfuse serve`) stops.

Restarted servers are children of the watching thread, and the kernel signals a child when the
thread that forked it dies (`PR_SET_PDEATHSIG`): that thread lives until `stop()` has stopped
the server.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from serving.procs import PortInUse
from serving.triton.launcher import TritonServer, TritonSettings, TritonStartError

log = logging.getLogger(__name__)


def is_live_http(host: str, http_port: int, timeout: float = 5.0) -> bool:
    """True when Triton's GET /v2/health/live answers 200 (it does while loading and draining too)."""
    try:
        with urllib.request.urlopen(f"http://{host}:{http_port}/v2/health/live", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


class TritonSupervisor:
    """Runs one TritonServer and restarts it when it exits unexpectedly."""

    def __init__(
        self,
        settings: TritonSettings,
        log_path: Path | None = None,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 15.0,
        ready_timeout_s: float = 180.0,
        probe_every_s: float = 5.0,
        hang_after_s: float = 60.0,
        is_live: Callable[[str, int], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.log_path = log_path
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.ready_timeout_s = ready_timeout_s
        self.probe_every_s = probe_every_s
        self.hang_after_s = hang_after_s
        self.is_live = is_live or is_live_http
        self.server = TritonServer(settings, log_path)
        self.restarts = 0
        self.failure: str | None = None  # set when it gave up restarting (a port taken by another process)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        """PID of the current tritonserver process."""
        p = self.server.process
        return None if p is None else p.pid

    def start(self) -> None:
        """Start Triton, wait until ready, then watch it in a background thread."""
        self.server.start()
        try:
            self.server.wait_ready(self.ready_timeout_s)
        except BaseException:
            self.server.stop()
            raise
        self._thread = threading.Thread(target=self._watch, name="triton-supervisor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        try:
            self._watch_loop()
        finally:
            self._stopped.wait()  # a server this thread started gets SIGTERM when the thread exits

    def _watch_loop(self) -> None:
        backoff = self.backoff_initial_s
        last_live = time.monotonic()
        next_probe = time.monotonic() + self.probe_every_s
        while not self._stopping.is_set():
            code = self.server.poll()
            if code is None:
                now = time.monotonic()
                if now >= next_probe:
                    next_probe = now + self.probe_every_s
                    if self.is_live(self.settings.host, self.settings.http_port):
                        last_live = now
                    elif now - last_live > self.hang_after_s:
                        log.error("tritonserver pid %s not live for %.0f s: killing it", self.pid, now - last_live)
                        self.server.kill()
                        continue
                if self._stopping.wait(0.5):
                    return
                continue
            with self._lock:
                if self._stopping.is_set():
                    return
                log.error("tritonserver pid %s exited with code %s: restarting in %.1f s", self.pid, code, backoff)
                self.server.stop()  # reap the group: stale stubs and shared memory
                if self._stopping.wait(backoff):
                    return
                self.restarts += 1
                self.server = TritonServer(self.settings, self.log_path)
                try:
                    self.server.start()
                    self.server.wait_ready(self.ready_timeout_s)
                    log.warning("tritonserver restarted (restart %d), pid %s", self.restarts, self.pid)
                    backoff = self.backoff_initial_s
                except PortInUse as e:
                    self.failure = f"tritonserver not restarted: {e}"
                    log.error("%s", self.failure)
                    self.server.kill()
                    return
                except (TritonStartError, OSError) as e:
                    log.error("tritonserver restart failed: %s", e)
                    self.server.kill()  # the next turn sees it exited and tries again
                    backoff = min(backoff * 2, self.backoff_max_s)
                last_live = next_probe = time.monotonic()

    def stop(self) -> int | None:
        """Stop watching, then drain and stop Triton (SIGTERM, exit timeout, SIGKILL)."""
        self._stopping.set()
        try:
            with self._lock:
                code = self.server.stop()
        finally:
            self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return code

    def wait_until_restarted(self, old_pid: int, timeout: float) -> bool:
        """For tests and operators: True once a new, ready server replaced `old_pid`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self.pid
            if pid is not None and pid != old_pid and self.server.poll() is None:
                from serving.triton.launcher import is_ready

                if is_ready(self.settings.host, self.settings.http_port):
                    return True
            time.sleep(0.5)
        return False
