"""`vtfuse serve`: Triton + a local Ray cluster + the Serve app, in the foreground; SIGINT/SIGTERM stops all of it.

Triton runs under a TritonSupervisor (restarted if it dies); the app answers 503 while it is
down, and its gRPC channels reconnect within the capped backoff once Triton is back.

Environment overrides (flags win over them): PRESET (served model name and default),
API_HOST, API_PORT (HTTP, 8080), GRPC_PORT (9000), TRITON_HTTP_PORT (8000),
TRITON_GRPC_PORT (8001), TRITON_METRICS_PORT (8002), RAY_NUM_CPUS (all cores),
RAY_METRICS_PORT (8090), SERVE_CONFIG (deploy/serve_config.yaml).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from serving.paths import REPO_ROOT
from serving.triton.launcher import DEFAULT_REPOSITORY, TritonSettings
from serving.triton.supervisor import TritonSupervisor

log = logging.getLogger(__name__)

DEFAULT_CONFIG = REPO_ROOT / "deploy" / "serve_config.yaml"
APP_NAME = "vtfuse"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def load_serve_config(path: Path) -> dict[str, Any]:
    """The Serve config YAML as a dict (the `vtfuse` application first)."""
    config = yaml.safe_load(path.read_text())
    if not config or not config.get("applications"):
        raise SystemExit(f"{path} has no `applications:`: pass a Ray Serve config (see deploy/serve_config.yaml)")
    return config


def render_serve_config(config: dict[str, Any], ns: argparse.Namespace, triton_grpc: str) -> dict[str, Any]:
    """The config with this run's ports, Triton address, repository and preset filled in."""
    cfg = copy.deepcopy(config)
    cfg["http_options"] = {**cfg.get("http_options", {}), "host": ns.api_host, "port": ns.api_port}
    cfg["grpc_options"] = {**cfg.get("grpc_options", {}), "port": ns.grpc_port}
    cfg["grpc_options"].setdefault(
        "grpc_servicer_functions", ["serving.proto.vtfuse_pb2_grpc.add_VtfuseServicer_to_server"]
    )
    app = next((a for a in cfg["applications"] if a.get("name") == APP_NAME), cfg["applications"][0])
    args = app.setdefault("args", {})
    args["triton_url"] = triton_grpc
    args["repository"] = str(Path(ns.repository).resolve())
    preset = os.environ.get("PRESET")
    if preset:
        models = args.get("models") or {}
        args["models"] = {preset: models.get(preset, {})}
        args["default_model"] = preset
    if args.get("preprocess") == "inline":  # no Preprocess deployment to configure
        app["deployments"] = [d for d in app.get("deployments", []) if d.get("name") != "Preprocess"]
    return cfg


def _wait_running(timeout: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        apps = serve.status().applications
        st = apps.get(APP_NAME)
        if st is not None and st.status == "RUNNING":
            return
        if st is not None and st.status == "DEPLOY_FAILED":
            raise SystemExit(f"the Serve application failed to deploy: {st.message}")
        time.sleep(0.5)
    raise SystemExit(f"the Serve application was not running after {timeout:.0f} s")


def run_serve(ns: argparse.Namespace) -> int:
    """Start Triton, Ray and the app; print the URLs; stay in the foreground until SIGINT/SIGTERM."""
    import ray
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    config = render_serve_config(load_serve_config(Path(ns.config)), ns, f"{ns.triton_host}:{ns.triton_grpc_port}")
    schema = ServeDeploySchema.model_validate(config)
    settings = TritonSettings(
        repository=Path(ns.repository).resolve(),
        http_port=ns.triton_http_port,
        grpc_port=ns.triton_grpc_port,
        metrics_port=ns.triton_metrics_port,
        host=ns.triton_host,
        exit_timeout_s=ns.exit_timeout,
        restrict_apis=ns.restrict_apis,
    )
    # Triton stays our child; the supervisor restarts it if it dies (the API answers 503 meanwhile).
    supervisor = TritonSupervisor(settings, log_path=REPO_ROOT / "build" / "logs" / "tritonserver.log")
    ray_started = False
    try:
        supervisor.start()
        triton = supervisor.server
        if stop.is_set():
            return 0
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        ray.init(
            num_cpus=ns.num_cpus,
            include_dashboard=False,
            namespace="serve",
            _metrics_export_port=ns.ray_metrics_port,
            _system_config={"metrics_report_interval_ms": 2000},
        )
        ray_started = True
        for sig in (signal.SIGINT, signal.SIGTERM):  # ray.init installs its own handlers: ours win
            signal.signal(sig, lambda *_: stop.set())
        client = serve_start(
            http_options=schema.http_options.model_dump(),
            grpc_options=schema.grpc_options.model_dump(),
            proxy_location=schema.proxy_location,
        )
        client.deploy_apps(schema, _blocking=False)
        _wait_running(timeout=300)
        api = f"http://{ns.api_host}:{ns.api_port}"
        print(
            f"vtfuse API  {api}  (docs {api}/docs, metrics {api}/metrics, readiness {api}/readyz)\n"
            f"vtfuse gRPC {ns.api_host}:{ns.grpc_port} (serving/proto/vtfuse.proto)\n"
            f"Triton      HTTP {triton.url_http}  gRPC {triton.url_grpc}  metrics {triton.url_metrics}\n"
            f"Ray metrics http://127.0.0.1:{ns.ray_metrics_port}/metrics\n"
            f"Triton log  {supervisor.log_path}\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        while not stop.wait(1.0):
            pass
        log.info("stopping: draining the API, then Ray, then Triton")
        return 0
    finally:
        stop.set()
        if ray_started:
            try:
                serve.shutdown()
            except Exception:
                log.exception("serve.shutdown failed")
            ray.shutdown()
        supervisor.stop()


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `serve` subcommand."""
    p = sub.add_parser("serve", help="run Triton and the Ray Serve API (HTTP 8080, gRPC 9000) in the foreground")
    p.add_argument("--repository", default=str(DEFAULT_REPOSITORY), help="Triton model repository")
    p.add_argument(
        "--config",
        default=os.environ.get("SERVE_CONFIG", str(DEFAULT_CONFIG)),
        help="Ray Serve config YAML (env SERVE_CONFIG)",
    )
    p.add_argument("--api-host", default=os.environ.get("API_HOST", "127.0.0.1"), help="env API_HOST")
    p.add_argument("--api-port", type=int, default=_env_int("API_PORT", 8080), help="HTTP API port (env API_PORT)")
    p.add_argument("--grpc-port", type=int, default=_env_int("GRPC_PORT", 9000), help="gRPC API port (env GRPC_PORT)")
    p.add_argument("--triton-host", default="127.0.0.1")
    p.add_argument(
        "--triton-http-port", type=int, default=_env_int("TRITON_HTTP_PORT", 8000), help="env TRITON_HTTP_PORT"
    )
    p.add_argument(
        "--triton-grpc-port", type=int, default=_env_int("TRITON_GRPC_PORT", 8001), help="env TRITON_GRPC_PORT"
    )
    p.add_argument(
        "--triton-metrics-port", type=int, default=_env_int("TRITON_METRICS_PORT", 8002), help="env TRITON_METRICS_PORT"
    )
    p.add_argument("--exit-timeout", type=int, default=30, help="seconds Triton drains in-flight requests")
    p.add_argument("--restrict-apis", action="store_true", help="Triton model-control APIs need $TRITON_ADMIN_KEY")
    p.add_argument(
        "--num-cpus",
        type=float,
        default=float(os.environ.get("RAY_NUM_CPUS", os.cpu_count() or 2)),
        help="CPUs the local Ray cluster schedules replicas on (env RAY_NUM_CPUS)",
    )
    p.add_argument(
        "--ray-metrics-port",
        type=int,
        default=_env_int("RAY_METRICS_PORT", 8090),
        help="Ray's Prometheus export port (env RAY_METRICS_PORT)",
    )
    p.set_defaults(func=run_serve)
