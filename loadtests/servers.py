"""Start and stop the servers a benchmark measures: Triton (with config variants), the naive baseline, Ray Serve.

Every server runs as a child process in its own process group on free ports, and is always
stopped (SIGTERM, then SIGKILL of the group) when its context exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.model.io_spec import ENGINES
from serving.procs import free_port
from serving.triton.launcher import TritonServer, TritonSettings
from serving.triton.model_config import dump_config, load_config

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_DIR = REPO_ROOT / "build" / "bench" / "logs"
# Large built artefacts are linked into a variant repository, never copied.
LINKED = ("model.onnx", "model.plan")

ConfigEdit = Callable[[str, object], None]



def wait_http(
    url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None, log_path: Path | None = None
) -> None:
    """Poll `url` until it answers 200; fail fast if `proc` exits."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path and log_path.exists() else ""
            raise RuntimeError(f"process for {url} exited with {proc.returncode} before it was ready:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError as e:
            last = e
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s: {last}")


def variant_repository(
    src: str | Path,
    dest: str | Path,
    edit: Callable[[str, object], None],
    replace: dict[str, dict[str, Path]] | None = None,
) -> Path:
    """Copy a built repository to `dest` (artefacts linked) with every config.pbtxt passed through `edit`.

    `edit(model_name, config)` changes a parsed ModelConfig in place; `replace` maps a model
    to {file name in its version folder: the file to put there instead} (a bench variant of
    its model.py, or another model.onnx).
    """
    replace = replace or {}
    src, dest = Path(src).resolve(), Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    for model_dir in sorted(p.parent for p in src.glob("*/config.pbtxt")):
        out = dest / model_dir.name
        for f in model_dir.rglob("*"):
            if "__pycache__" in f.parts or f.is_dir():
                continue
            target = out / f.relative_to(model_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            source = replace.get(model_dir.name, {}).get(f.name, f)
            if f.name in LINKED:
                target.symlink_to(Path(source).resolve())
            elif source is not f:
                shutil.copy2(source, target)
            elif f.name != "config.pbtxt":
                shutil.copy2(f, target)
        config = load_config(model_dir / "config.pbtxt")
        edit(model_dir.name, config)
        (out / "config.pbtxt").write_text(dump_config(config))
    return dest


def engine_settings(threads: int | None = None, instances: int | None = None) -> Callable[[str, object], None]:
    """Config edit: the engines' `intra_op_threads` and instance count (None: as they are)."""

    def edit(name: str, config: object) -> None:
        if name not in ENGINES:
            return
        if threads is not None:
            config.parameters["intra_op_threads"].string_value = str(threads)  # type: ignore[attr-defined]
        if instances is not None:
            config.instance_group[0].count = instances  # type: ignore[attr-defined]

    return edit


def no_edit(name: str, config: object) -> None:
    """Config edit: none (a copy as it is, e.g. with other engine files)."""


def no_dynamic_batching(name: str, config: object) -> None:
    """Config edit: drop `dynamic_batching` (each request runs alone, as it arrives)."""
    config.ClearField("dynamic_batching")  # type: ignore[attr-defined]


@contextlib.contextmanager
def triton(repository: str | Path, tag: str, timeout: float = 300.0, response_cache_mb: int | None = None
           ) -> Iterator[TritonServer]:
    """A tritonserver on free ports over `repository`; its log in build/bench/logs/triton-<tag>.log.

    `response_cache_mb`: Triton's response cache size (0: off); None: as `vtfuse serve` runs it.
    """
    settings = TritonSettings(
        repository=Path(repository), http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
        exit_timeout_s=10,
    )
    if response_cache_mb is not None:
        settings = dataclasses.replace(settings, response_cache_mb=response_cache_mb)
    log_path = LOG_DIR / f"triton-{tag}.log"
    log_path.unlink(missing_ok=True)
    server = TritonServer(settings, log_path=log_path)
    server.start()
    try:
        server.wait_ready(timeout=timeout)
        yield server
    finally:
        server.stop()


def _stop_group(proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not stop within %.0f s: killing its group", proc.pid, grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@dataclass(frozen=True)
class Http:
    """A running HTTP server: base URL and its process."""

    url: str
    process: subprocess.Popen[bytes]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


@contextlib.contextmanager
def spawn(cmd: list[str], ready_path: str, port: int, tag: str, timeout: float = 180.0,
          env: dict[str, str] | None = None) -> Iterator[Http]:
    """Run `cmd` in its own process group (`env` added to ours), wait for GET `ready_path` → 200, stop the group."""
    log_path = LOG_DIR / f"{tag}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env() | (env or {}), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(url + ready_path, timeout, proc, log_path)
            yield Http(url, proc)
        finally:
            _stop_group(proc)


def wait_workers(url: str, workers: int, timeout_s: float) -> list[int]:
    """Poll /healthz on fresh connections until `workers` distinct worker pids have answered (all have loaded)."""
    seen: set[int] = set()
    end = time.monotonic() + timeout_s
    while len(seen) < workers and time.monotonic() < end:
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/healthz", timeout=5) as r:
            seen.add(int(json.loads(r.read())["pid"]))
        time.sleep(0.2)
    if len(seen) < workers:
        raise RuntimeError(f"{url}: {len(seen)} of {workers} workers answered within {timeout_s:.0f} s")
    return sorted(seen)


@contextlib.contextmanager
def baseline(checkpoint: str, workers: int | None = None, threads: int = 1, precision: str = "fp32",
             balance: str = "reuseport") -> Iterator[Http]:
    """The naive FastAPI + PyTorch server on a free port (one worker per core by default, each with its own
    SO_REUSEPORT socket: loadtests/baseline/workers.py), once every worker answers; `precision` int8 is
    PyTorch's dynamic quantisation of its Linear layers."""
    port = free_port()
    n = workers or os.cpu_count() or 1
    cmd = [sys.executable, "-m", "loadtests.baseline", "--checkpoint", checkpoint, "--port", str(port),
           "--workers", str(n), "--threads", str(threads), "--precision", precision, "--balance", balance]
    with spawn(cmd, "/healthz", port, f"naive-{Path(checkpoint).name}-{precision}") as h:
        if balance == "reuseport":  # uvicorn's shared socket cannot be asked for a given worker
            wait_workers(h.url, n, 180)
        yield h


def shipped_serve_composition() -> dict[str, Any]:
    """`preprocess`, the Ingress replica count and the default model's server-side `vqa` model of
    deploy/serve_config.yaml, and the HTTP front door (`VTFUSE_FRONT`): what `vtfuse serve` runs."""
    from serving.app.cli import DEFAULT_CONFIG, load_serve_config

    app = load_serve_config(DEFAULT_CONFIG)["applications"][0]
    args = app["args"]
    ingress: dict[str, Any] = next((d for d in app.get("deployments", []) if d.get("name") == "Ingress"), {})
    default = (args.get("models") or {}).get(args.get("default_model", "tiny")) or {}
    from serving.app.front import selected

    return {
        "front": selected(),
        "preprocess": args.get("preprocess", "inline"),
        "ingress_replicas": ingress.get("num_replicas", 1),
        "server_vqa": default.get("vqa"),
    }


@contextlib.contextmanager
def serve_app(
    triton_url: str,
    repository: str | Path,
    model: str,
    tag: str,
    preprocess: str | None = None,
    ingress_replicas: int | None = None,
    server_vqa: str | None = "shipped",
    pool_size: int = 2,
    timeout: float = 240.0,
    env: dict[str, str] | None = None,
    front: str | None = None,
    access_log: bool = True,
    proxy_middleware: bool = True,
) -> Iterator[Http]:
    """The Ray Serve application (loadtests.serve_app) in front of `triton_url`, on a free HTTP port.

    Unset, `preprocess`, `ingress_replicas` and `server_vqa` (Triton's `vqa` for one-question
    calls; None: off) are those of the shipped deploy/serve_config.yaml, and `front` (the HTTP
    front door, serving/app/front.py) the one `vtfuse serve` runs, so the bench measures the
    composition users run.
    """
    from serving.app.front import selected, stop_haproxy

    front = front or selected()
    shipped = shipped_serve_composition()
    preprocess = preprocess or shipped["preprocess"]
    ingress_replicas = ingress_replicas or shipped["ingress_replicas"]
    server_vqa = shipped["server_vqa"] if server_vqa == "shipped" else server_vqa
    port = free_port()
    cmd = [sys.executable, "-m", "loadtests.serve_app", "--triton-url", triton_url, "--repository", str(repository),
           "--model", model, "--http-port", str(port), "--preprocess", preprocess,
           "--ingress-replicas", str(ingress_replicas), "--pool-size", str(pool_size),
           "--server-vqa", server_vqa or "", "--front", front, *([] if access_log else ["--no-access-log"]),
           *([] if proxy_middleware else ["--no-proxy-middleware"])]
    haproxy_dir = Path(tempfile.mkdtemp(prefix="vh-", dir="/tmp")) if front == "haproxy" else None
    if haproxy_dir is not None:
        cmd += ["--haproxy-dir", str(haproxy_dir)]
    try:
        with spawn(cmd, "/readyz", port, f"serve-{tag}", timeout=timeout, env=env) as h:
            yield h
    finally:
        if haproxy_dir is not None:  # HAProxy runs in a session of its own: a killed Serve can leave it behind
            stop_haproxy(haproxy_dir)
