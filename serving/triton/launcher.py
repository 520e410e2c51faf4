"""Find, start, wait for and stop a real `tritonserver` on a model repository.

The binary is looked up in this order: `$TRITONSERVER`, `tritonserver` on PATH (NGC
containers), the bundle inside the `nvidia-pytriton` wheel. For the bundle, a backend
folder is assembled under build/ with the Python-backend stub matching this interpreter,
and the stub is given this interpreter's libpython and this virtual environment's
site-packages, so Python models run the same Python and packages as the caller.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from serving.paths import REPO_ROOT
from serving.procs import PortInUse, check_ports_free, describe_port, listens_on, parent_death_signal

log = logging.getLogger(__name__)

DEFAULT_REPOSITORY = REPO_ROOT / "model_repository"
BUILD_DIR = REPO_ROOT / "build"


class TritonNotFound(RuntimeError):
    """No tritonserver binary could be found."""


class TritonStartError(RuntimeError):
    """tritonserver exited or never became ready."""


@dataclass(frozen=True)
class TritonSettings:
    """How to run tritonserver (code-owned; the CLI and fixtures fill it)."""

    repository: Path = DEFAULT_REPOSITORY
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    host: str = "127.0.0.1"
    exit_timeout_s: int = 30
    log_verbose: int = 0
    # Production: model control off; repository / model-config / shared-memory APIs need a key.
    restrict_apis: bool = False
    restricted_key: str = "vtfuse-admin"
    restricted_value: str = field(default="", repr=False)
    # TLS on the gRPC endpoint (PEM files); with grpc_tls_root_cert, clients must present a certificate it signed.
    grpc_tls_cert: Path | None = None
    grpc_tls_key: Path | None = None
    grpc_tls_root_cert: Path | None = None
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    # Triton's response cache (the `local` cache, LRU, this many MiB): models whose config.pbtxt has
    # `response_cache { enable: true }` (image_encoder) answer a repeated input from it. 0: off.
    response_cache_mb: int = field(default_factory=lambda: int(os.environ.get("VTFUSE_RESPONSE_CACHE_MB", "64")))

    @property
    def shm_prefix(self) -> str:
        """Prefix of this server's Python-backend shared-memory regions, unique per gRPC port."""
        return f"vtfuse{self.grpc_port}_"


@dataclass(frozen=True)
class TritonInstall:
    """A tritonserver binary with the backend folder and environment it needs."""

    binary: Path
    backend_dir: Path | None
    lib_dirs: tuple[Path, ...]
    cache_dir: Path | None = None  # where libtritoncache_local.so lives, when not Triton's default


def _pytriton_root() -> Path | None:
    try:
        import pytriton  # noqa: F401 — only its location is needed
    except ImportError:
        return None
    import pytriton as _p

    root = Path(_p.__file__).parent / "tritonserver"
    return root if (root / "bin" / "tritonserver").exists() else None


def _bundle_backend_dir(bundle: Path) -> Path:
    """Assemble backends/python with the stub for this interpreter (the bundle ships one per version)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = bundle / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonNotFound(f"nvidia-pytriton has no Python-backend stub for Python {version}: use Python 3.8-3.13")
    dest = BUILD_DIR / "tritonserver" / "backends"
    py = dest / "python"
    py.mkdir(parents=True, exist_ok=True)
    for src in [*(bundle / "backends" / "python").iterdir(), stub]:
        if src.is_file():
            target = py / src.name
            if not target.exists() or target.stat().st_mtime < src.stat().st_mtime:
                shutil.copy2(src, target)
    return dest


def find_tritonserver() -> TritonInstall:
    """Locate tritonserver: $TRITONSERVER, then PATH, then the nvidia-pytriton bundle."""
    env_bin = os.environ.get("TRITONSERVER")
    if env_bin:
        if not Path(env_bin).exists():
            raise TritonNotFound(f"$TRITONSERVER={env_bin} does not exist: point it at a tritonserver binary")
        return TritonInstall(Path(env_bin), None, ())
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(Path(on_path), None, ())
    bundle = _pytriton_root()
    if bundle is None:
        raise TritonNotFound(
            "no tritonserver: set $TRITONSERVER, put tritonserver on PATH, or `pip install nvidia-pytriton`"
        )
    libs = bundle.parent.parent / "nvidia_pytriton.libs"
    return TritonInstall(bundle / "bin" / "tritonserver", _bundle_backend_dir(bundle), (libs,), bundle / "caches")


def server_environment(install: TritonInstall, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver: bundled libs, this interpreter's libpython, this venv's packages."""
    env = dict(os.environ)
    lib_dirs = [str(p) for p in install.lib_dirs]
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        lib_dirs.append(libdir)  # the stub links libpython3.X.so from here
    if env.get("LD_LIBRARY_PATH"):
        lib_dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(lib_dirs)
    site = sysconfig.get_paths()["purelib"]
    env["PYTHONPATH"] = ":".join(p for p in (str(REPO_ROOT), site, env.get("PYTHONPATH", "")) if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    # One ONNX Runtime / BLAS thread pool per model instance, not one per core each.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


MIN_RECV_PING_INTERVAL_MS = 5_000  # below the client's keepalive_time_ms


def build_command(settings: TritonSettings, install: TritonInstall) -> list[str]:
    """The tritonserver command line for these settings."""
    cmd = [
        str(install.binary),
        f"--model-repository={settings.repository}",
        f"--http-port={settings.http_port}",
        f"--grpc-port={settings.grpc_port}",
        f"--metrics-port={settings.metrics_port}",
        f"--http-address={settings.host}",
        f"--grpc-address={settings.host}",
        f"--metrics-address={settings.host}",
        "--allow-metrics=true",
        "--allow-cpu-metrics=true",
        "--model-control-mode=none",
        "--strict-readiness=true",
        f"--exit-timeout-secs={settings.exit_timeout_s}",
        f"--log-verbose={settings.log_verbose}",
        # The API's Triton client pings every 10 s, between calls too (serving/triton/client.py, to notice a dead
        # server): accept one every 5 s without data, or Triton's default (one in 5 min, 2 strikes) answers with
        # GOAWAY too_many_pings and drops the connection, calls in flight included.
        f"--grpc-http2-min-recv-ping-interval-without-data={MIN_RECV_PING_INTERVAL_MS}",
        f"--backend-config=python,shm-region-prefix-name={settings.shm_prefix}",
        # Small default regions: many Python models on a small machine add up.
        "--backend-config=python,shm-default-byte-size=4194304",
        "--backend-config=python,shm-growth-byte-size=4194304",
    ]
    if install.backend_dir is not None:
        cmd.append(f"--backend-directory={install.backend_dir}")
    if settings.response_cache_mb > 0:
        cmd.append(f"--cache-config=local,size={settings.response_cache_mb * 1024 * 1024}")
        if install.cache_dir is not None:
            cmd.append(f"--cache-directory={install.cache_dir}")
    if settings.restrict_apis:
        value = settings.restricted_value or os.environ.get("TRITON_ADMIN_KEY", "")
        if not value:  # nobody holds the key: the restricted APIs are simply off
            value = secrets.token_urlsafe(24)
            log.warning("restrict_apis without $TRITON_ADMIN_KEY: the restricted Triton APIs are off for everyone")
        for api in RESTRICTED_APIS:
            cmd.append(f"--http-restricted-api={api}:{settings.restricted_key}={value}")
            cmd.append(f"--grpc-restricted-protocol={api}:{settings.restricted_key}={value}")
    if settings.grpc_tls_cert or settings.grpc_tls_key:
        if not (settings.grpc_tls_cert and settings.grpc_tls_key):
            raise TritonStartError("gRPC TLS needs both a certificate and a key (grpc_tls_cert, grpc_tls_key)")
        cmd += [
            "--grpc-use-ssl=true",
            f"--grpc-server-cert={settings.grpc_tls_cert}",
            f"--grpc-server-key={settings.grpc_tls_key}",
        ]
        if settings.grpc_tls_root_cert:
            cmd += [f"--grpc-root-cert={settings.grpc_tls_root_cert}", "--grpc-use-ssl-mutual=true"]
    cmd.extend(settings.extra_args)
    return cmd


# Triton APIs that need the admin key when restrict_apis is on: model control (load/unload, repository
# index), model configuration, shared-memory registration, statistics, tracing and log settings.
RESTRICTED_APIS = ("model-repository", "model-config", "shared-memory", "statistics", "trace", "logging")


def redact(cmd: list[str]) -> list[str]:
    """The command line with restricted-API keys hidden, for logs."""
    return [c.split("=", 2)[0] + "=" + c.split("=", 2)[1] + "=***" if "restricted" in c else c for c in cmd]


def cleanup_stale_shm(prefix: str) -> int:
    """Remove shared-memory regions a dead server with this prefix left behind; returns how many."""
    shm = Path("/dev/shm")
    removed = 0
    if shm.is_dir():
        for p in shm.glob(f"{prefix}*"):
            try:
                p.unlink()
                removed += 1
            except OSError:
                pass
    return removed


def is_ready(host: str, http_port: int, timeout: float = 2.0) -> bool:
    """True when GET /v2/health/ready answers 200."""
    try:
        with urllib.request.urlopen(f"http://{host}:{http_port}/v2/health/ready", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


class TritonServer:
    """A tritonserver child process in its own session and process group; a context manager.

    `start()` refuses ports another process listens on (`PortInUse`, naming the holder);
    `wait_ready()` only believes a ready answer while our process is alive and is the one
    listening on the HTTP port. `stop()` sends SIGTERM (Triton drains in-flight requests for
    up to `exit_timeout_s`), then SIGKILL to the whole group, and removes the shared-memory
    regions it used. The server is also stopped at interpreter exit, and gets SIGTERM from the
    kernel when the thread that started it dies (a SIGKILLed parent included).
    """

    def __init__(self, settings: TritonSettings, log_path: Path | None = None) -> None:
        self.settings = settings
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def url_http(self) -> str:
        """Base URL of the HTTP endpoint."""
        return f"http://{self.settings.host}:{self.settings.http_port}"

    @property
    def url_grpc(self) -> str:
        """host:port of the gRPC endpoint."""
        return f"{self.settings.host}:{self.settings.grpc_port}"

    @property
    def url_metrics(self) -> str:
        """URL of the Prometheus metrics endpoint."""
        return f"http://{self.settings.host}:{self.settings.metrics_port}/metrics"

    def start(self) -> TritonServer:
        """Start tritonserver (not waiting for readiness)."""
        install = find_tritonserver()
        cmd = build_command(self.settings, install)
        s = self.settings
        check_ports_free(
            {"Triton HTTP": s.http_port, "Triton gRPC": s.grpc_port, "Triton metrics": s.metrics_port}, s.host
        )
        removed = cleanup_stale_shm(self.settings.shm_prefix)
        if removed:
            log.warning("removed %d stale shared-memory regions of a previous server", removed)
        log.info("starting %s", " ".join(redact(cmd)))
        out = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 — closed in stop()
            out = self._log_file
        self.process = subprocess.Popen(
            cmd,
            env=server_environment(install, self.settings.env),
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            start_new_session=True,  # own process group: stop() reaches the stubs too; a signal to ours does not
            preexec_fn=parent_death_signal(signal.SIGTERM),  # our death (even SIGKILL) drains and stops it
        )
        atexit.register(self.stop)
        return self

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Poll /v2/health/ready; fail fast if the process died."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise TritonStartError(f"tritonserver exited with code {code} before becoming ready{self._log_hint()}")
            if is_ready(self.settings.host, self.settings.http_port):
                if listens_on(self.process.pid, self.settings.http_port) is False:  # a stranger answered
                    raise PortInUse(
                        describe_port(self.settings.http_port, "Triton HTTP")
                        + ", which answered in place of the tritonserver we started: stop it or choose another port",
                        [self.settings.http_port],
                    )
                log.info(
                    "tritonserver ready: HTTP %s gRPC %s metrics %s", self.url_http, self.url_grpc, self.url_metrics
                )
                return
            time.sleep(0.5)
        raise TritonStartError(f"tritonserver not ready after {timeout:.0f} s{self._log_hint()}")

    def _log_hint(self) -> str:
        if self.log_path and self.log_path.exists():
            tail = self.log_path.read_text(errors="replace")[-3000:]
            return f"; log {self.log_path}:\n{tail}"
        return ""

    def poll(self) -> int | None:
        """The exit code, or None while running."""
        return None if self.process is None else self.process.poll()

    def kill(self) -> None:
        """SIGKILL the whole process group now (a hung or half-started server); `poll()` then has the exit code."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.error("tritonserver pid %s survived SIGKILL for 10 s", self.process.pid)

    def stop(self) -> int | None:
        """SIGTERM the group, wait for the drain, SIGKILL what is left; returns the exit code."""
        if self.process is None:
            return None
        atexit.unregister(self.stop)
        code = self.process.poll()
        if code is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                code = self.process.wait(timeout=self.settings.exit_timeout_s + 10)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not exit within its exit timeout: killing its process group")
        try:  # stubs may outlive a killed server: always clear the group
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if code is None:
            code = self.process.wait(timeout=10)
        cleanup_stale_shm(self.settings.shm_prefix)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return code

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
