"""`vtfuse serve`: Triton + a local Ray cluster + the Serve app, in the foreground; SIGINT/SIGTERM stops all of it.

Every port it would listen on is checked first: one another process holds is refused at once
(exit 2), naming the port and the holder's pid and name.

Triton runs under a TritonSupervisor (restarted if it dies); the app answers 503 while it is
down, and its gRPC channels reconnect within the capped backoff once Triton is back.
Ray runs as `ray start --head --block` (serving.app.raycluster). Ray and Triton each run in a
session of their own, so a signal to our process group (Ctrl-C, `kill -- -PGID`) reaches
this process only. Ray's HTTP proxy runs serving.app.proxy's middleware (fast admission,
retries of calls a dead replica dropped, JSON errors only).

SIGINT/SIGTERM drains first: the Ingress replicas refuse new requests (503, /readyz 503)
while the ones in flight finish (at most --drain-timeout s); then Serve, Ray and Triton
(which drains its own queue within --exit-timeout) stop. A second signal, 2 s or more after
the first, skips the drain (a group signal and make's forwarded copy of it count as one).
Killed outright (SIGKILL), it leaves nothing either: the kernel sends SIGTERM to `ray start`
and to tritonserver when it dies (PR_SET_PDEATHSIG), and each stops what it started.

Environment overrides (flags win over them): PRESET (served model name and default),
API_HOST, API_PORT (HTTP, 8080), GRPC_PORT (9000), TRITON_HTTP_PORT (8000),
TRITON_GRPC_PORT (8001), TRITON_METRICS_PORT (8002), RAY_NUM_CPUS (all cores),
RAY_METRICS_PORT (8090), SERVE_CONFIG (deploy/serve_config.yaml), TRITON_LOG,
RESTRICT_APIS=1 (with TRITON_ADMIN_KEY), TRITON_GRPC_TLS_CERT / _KEY / _CA (TLS to Triton),
DRAIN_TIMEOUT (30), LOG_ENCODING (TEXT or JSON), OTEL_EXPORTER_OTLP_ENDPOINT (traces; OTEL_SERVICE_NAME,
OTEL_TRACES_SAMPLER_ARG).

With `--ray-address ADDRESS` (or RAY_ADDRESS) none of the local cluster above is started: the app
and a Triton per node go onto that existing Ray cluster, and only they are removed on stop
(serving.app.onray; REPLICAS_PER_NODE, WORKER_API_PORT, WORKER_GRPC_PORT).
"""

from __future__ import annotations

import argparse
import atexit
import copy
import ctypes
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from serving.app.health import HEALTH_SERVICER_FUNCTION
from serving.app.health import available as health_available
from serving.app.logs import serve_logging_config
from serving.app.raycluster import RayHead
from serving.paths import REPO_ROOT
from serving.procs import ParentSignalWatch, PortInUse, SignalRelay, check_ports_free, reserve_ports
from serving.tracing import TRITON_SERVICE_NAME, otlp_endpoint, sampling_ratio, serve_tracing_config, triton_trace_args
from serving.triton.launcher import DEFAULT_REPOSITORY, TritonSettings
from serving.triton.supervisor import TritonSupervisor

log = logging.getLogger(__name__)

DEFAULT_CONFIG = REPO_ROOT / "deploy" / "serve_config.yaml"
APP_NAME = "vtfuse"
STOP_STACKS_AFTER_S = 25.0  # a stop ends ~11 s after the signal; one still running at drain + this is stuck
REPEAT_SIGNAL_S = 2.0  # a signal this soon after the first is a copy of it (group signal + make's forward)
# After the drain, what each stop step may take (the stack is gone within ~25 s of the drain's end).
# serve.shutdown needs the bound: it was seen not to return within 30 s (its proxies' and replicas'
# own drain periods), on a busy machine pushing the stop past a minute. Our drain has already
# emptied the API by then, and stopping Ray ends the replicas either way.
SERVE_SHUTDOWN_S = 10.0
RAY_DISCONNECT_S = 3.0
RAY_STOP_S = 8.0  # SIGTERM to `ray start`, then SIGKILL to what is left of its session


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
    servicers = cfg["grpc_options"]["grpc_servicer_functions"]
    if HEALTH_SERVICER_FUNCTION not in servicers and health_available():  # grpc.health.v1 on :9000
        cfg["grpc_options"]["grpc_servicer_functions"].append(HEALTH_SERVICER_FUNCTION)
    app = next((a for a in cfg["applications"] if a.get("name") == APP_NAME), cfg["applications"][0])
    args = app.setdefault("args", {})
    args["triton_url"] = triton_grpc
    args["repository"] = str(Path(ns.repository).resolve())
    preset = os.environ.get("PRESET")
    if preset:
        models = args.get("models") or {}
        args["models"] = {preset: models.get(preset, {})}
        args["default_model"] = preset
    # Serve's logging_config (TEXT or JSON, the logger name on each line); the YAML's own keys win.
    app["logging_config"] = {
        **serve_logging_config(getattr(ns, "log_encoding", None) or "TEXT", str(args.get("log_level", "INFO"))),
        **(app.get("logging_config") or {}),
        **({"encoding": ns.log_encoding.upper()} if getattr(ns, "log_encoding", None) else {}),
    }
    if getattr(ns, "log_encoding", None):  # Serve's proxies and controller log the same way
        cfg["logging_config"] = {**(cfg.get("logging_config") or {}), "encoding": ns.log_encoding.upper()}
    tracing = serve_tracing_config()  # OTLP export when OTEL_EXPORTER_OTLP_ENDPOINT is set
    if tracing is not None and not cfg.get("tracing_config"):
        cfg["tracing_config"] = tracing
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


def _app_status() -> tuple[str, str]:
    from ray import serve

    st = serve.status().applications.get(APP_NAME)
    return (str(st.status), st.message) if st is not None else ("MISSING", "")


def _set_ingress_user_config(
    client: Any, config: dict[str, Any], user_config: dict[str, Any], timeout: float, abort: threading.Event
) -> bool:
    """Redeploy `config` with the Ingress `user_config` set; True once every replica applied it (RUNNING again).

    Only `user_config` changes, so Serve reconfigures the live replicas in place (no restart).
    """
    from ray.serve.schema import ServeDeploySchema

    cfg = copy.deepcopy(config)
    app = next((a for a in cfg["applications"] if a.get("name") == APP_NAME), cfg["applications"][0])
    deps = app.setdefault("deployments", [])
    ingress = next((d for d in deps if d.get("name") == "Ingress"), None)
    if ingress is None:
        ingress = {"name": "Ingress"}
        deps.append(ingress)
    ingress["user_config"] = user_config
    client.deploy_apps(ServeDeploySchema.model_validate(cfg), _blocking=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not abort.is_set():
        status, _ = _app_status()
        if status.endswith("RUNNING"):
            return True
        if status.endswith("DEPLOY_FAILED") or status == "MISSING":
            return False
        time.sleep(0.1)
    return False


def drain(client: Any, config: dict[str, Any], timeout_s: float, abort: threading.Event) -> bool:
    """Refuse new requests on every Ingress replica, then wait until none is in flight (at most `timeout_s`)."""
    t0 = time.monotonic()
    # Requests the front door received before now are in flight even if no replica has them yet:
    # the replicas admit those (their `x-vtfuse-received-at` stamp) and refuse the rest.
    state = {"draining": True, "drain_since": time.time()}
    ok = _set_ingress_user_config(client, config, state, min(timeout_s, 30.0), abort)
    log.info("drain: new requests refused on every replica (%s) after %.1f s", ok, time.monotonic() - t0)
    left = max(1.0, timeout_s - (time.monotonic() - t0))
    # The replicas wait at most `left` s; a few more for the controller to see them RUNNING again.
    idle = _set_ingress_user_config(client, config, {**state, "drain_wait_s": left}, left + 5.0, abort)
    log.info("drain: %s after %.1f s", "in-flight requests done" if idle else "gave up waiting", time.monotonic() - t0)
    return idle


def proxy_environment(config: dict[str, Any]) -> dict[str, str]:
    """Environment for Ray's HTTP proxy: our middleware, and an in-flight cap = Ingress replicas × max_inflight."""
    from serving.app.proxy import CALLBACK
    from serving.app.settings import Limits

    env = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": CALLBACK}
    if "VTFUSE_PROXY_MAX_INFLIGHT" not in os.environ:
        app = next((a for a in config["applications"] if a.get("name") == APP_NAME), config["applications"][0])
        ingress: dict[str, Any] = next((d for d in app.get("deployments", []) if d.get("name") == "Ingress"), {})
        replicas = int(ingress.get("num_replicas") or 1)
        per_replica = int(
            os.environ.get("VTFUSE_LIMITS_MAX_INFLIGHT")
            or (app.get("args") or {}).get("limits", {}).get("max_inflight")
            or Limits().max_inflight
        )
        env["VTFUSE_PROXY_MAX_INFLIGHT"] = str(replicas * per_replica)
    from serving.app.front import front_environment

    env.update(front_environment())  # HAProxy in front of the replicas unless VTFUSE_FRONT=ray (serving/app/front.py)
    from serving.app.ray_background import background_environment

    env.update(background_environment())  # Serve's controller loop every 0.5 s (serving/app/ray_background.py)
    return env


def stop_with_parent() -> None:
    """Linux: get SIGTERM when the parent process dies.

    A `make` killed outright would otherwise orphan this process; with this, the
    drain-and-stop path runs instead. (`ParentSignalWatch` covers a SIGINT sent to make
    alone, which make does not pass on to its recipe.)
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        log.warning("could not ask to be stopped with the parent process")
        return
    if os.getppid() == 1:  # the parent is already gone
        os.kill(os.getpid(), signal.SIGTERM)


def triton_settings(ns: argparse.Namespace, **overrides: Any) -> TritonSettings:
    """tritonserver's settings from `vtfuse serve`'s flags: the local one, or each node's on a Ray cluster."""
    tls = bool(ns.triton_tls_cert)
    fields: dict[str, Any] = dict(
        repository=Path(ns.repository).resolve(),
        http_port=ns.triton_http_port,
        grpc_port=ns.triton_grpc_port,
        metrics_port=ns.triton_metrics_port,
        exit_timeout_s=ns.exit_timeout,
        restrict_apis=ns.restrict_apis,
        grpc_tls_cert=Path(ns.triton_tls_cert).resolve() if tls else None,
        grpc_tls_key=Path(ns.triton_tls_key).resolve() if tls and ns.triton_tls_key else None,
        # Triton's OpenTelemetry trace mode, exporting to the same OTLP/HTTP endpoint as the API.
        extra_args=triton_trace_args(endpoint, sampling_ratio(), TRITON_SERVICE_NAME) if (endpoint := otlp_endpoint())
        else (),
    )
    return TritonSettings(**(fields | overrides))


class StopSignals:
    """What SIGINT/SIGTERM (or the parent's, ParentSignalWatch) ask of `vtfuse serve`.

    `stop` at the first signal; `force` (skip the drain) at a second one REPEAT_SIGNAL_S or more later,
    not a copy of the first. Called on the relay's or the parent watch's thread, never in a signal
    handler (SignalRelay says why).
    """

    def __init__(self, stacks_after_s: float) -> None:
        self.stop, self.force = threading.Event(), threading.Event()
        self.stacks_after_s = stacks_after_s
        self._first: float | None = None
        self._lock = threading.Lock()

    def __call__(self, signum: int) -> None:
        with self._lock:
            now = time.monotonic()
            if self._first is None:
                self._first = now
                # A stop that hangs leaves every thread's stack in the log, before anyone kills it.
                faulthandler.dump_traceback_later(self.stacks_after_s)
            elif now - self._first >= REPEAT_SIGNAL_S:
                self.force.set()
            self.stop.set()


def run_serve(ns: argparse.Namespace) -> int:
    """Start Triton, Ray and the app; print the URLs; stay in the foreground until SIGINT/SIGTERM."""
    if getattr(ns, "ray_address", None):  # an existing cluster: nothing of the local stack below
        from serving.app.onray import run_on_cluster

        return run_on_cluster(ns)
    # Token authentication between our cluster and this driver (Ray's token, ~/.ray/auth_token); Ray reads
    # the mode when its core module loads, hence before the import.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    signals = StopSignals(stacks_after_s=ns.drain_timeout + STOP_STACKS_AFTER_S)
    stop, force = signals.stop, signals.force
    relay = SignalRelay(signals)
    relay.install()
    watch = ParentSignalWatch(signals)
    if ns.stop_with_parent:
        stop_with_parent()
        watch.start()
    try:
        check_ports_free(_ports(ns))
    except PortInUse as e:
        print(f"vtfuse serve: not started: {e}", file=sys.stderr, flush=True)
        return 2
    reserve_ports(_ports(ns).values())  # Ray's and HAProxy's own ports, picked below, must not take these
    if ns.otlp_endpoint:  # Ray's processes and the SDK exporter read the standard variables
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = ns.otlp_endpoint
    if otlp_endpoint():
        os.environ.setdefault("OTEL_SERVICE_NAME", "vtfuse-api")
    config = render_serve_config(load_serve_config(Path(ns.config)), ns, f"{ns.triton_host}:{ns.triton_grpc_port}")
    tls = bool(ns.triton_tls_cert)
    if tls:
        app_args = next(a for a in config["applications"] if a.get("name") == APP_NAME)["args"]
        app_args["triton_tls"] = True
        app_args["triton_tls_root_cert"] = str(Path(ns.triton_tls_ca or ns.triton_tls_cert).resolve())
    schema = ServeDeploySchema.model_validate(config)
    settings = triton_settings(ns, host=ns.triton_host)
    # Triton stays our child; the supervisor restarts it if it dies (the API answers 503 meanwhile).
    supervisor = TritonSupervisor(settings, log_path=Path(ns.triton_log))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    os.environ.update(proxy_environment(config))  # Ray's processes inherit it
    head = RayHead(ns.num_cpus, ns.ray_metrics_port, {"metrics_report_interval_ms": 2000}, log_path=Path(ns.ray_log))
    state = {"ray": False, "done": False}

    def shutdown() -> None:
        """Serve, Ray, then Triton; on every way out (atexit included), once."""
        if state["done"]:
            return
        state["done"] = True
        stop.set()
        watch.cancel()
        t0 = time.monotonic()
        if state["ray"]:
            _bounded(serve.shutdown, SERVE_SHUTDOWN_S, "serve.shutdown")
            _bounded(ray.shutdown, RAY_DISCONNECT_S, "ray.shutdown")
        t1 = time.monotonic()
        triton_stop = threading.Thread(target=supervisor.stop, name="triton-stop")  # nothing in flight any more
        triton_stop.start()
        head.stop(timeout=RAY_STOP_S)
        t2 = time.monotonic()
        triton_stop.join()
        faulthandler.cancel_dump_traceback_later()
        log.info(
            "stopped: Serve %.1f s, then Ray %.1f s and Triton %.1f s", t1 - t0, t2 - t1, time.monotonic() - t1
        )

    atexit.register(shutdown)
    try:
        head.start()  # Ray starts while Triton loads its models
        supervisor.start()
        triton = supervisor.server
        if stop.is_set():
            return 0
        head.wait_started(timeout=180)
        if stop.is_set():
            return 0
        ray.init(address=head.address, namespace="serve")
        state["ray"] = True
        relay.install()  # ray.init installs its own handlers: ours win
        client = serve_start(
            http_options=schema.http_options.model_dump(),
            grpc_options=schema.grpc_options.model_dump(),
            proxy_location=schema.proxy_location,
            global_logging_config=schema.logging_config,
            global_tracing_config=schema.tracing_config,
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
        code = 0
        while not stop.wait(1.0):
            if supervisor.failure:
                log.error("stopping: %s", supervisor.failure)
                code = 1
            elif not head.alive():
                log.error("stopping: the Ray cluster is gone (ray start exited; log %s)", head.log_path)
                code = 1
            if code:
                break
        if not force.is_set() and not code:
            log.info("stopping: draining the API (at most %.0f s; a second signal skips it)", ns.drain_timeout)
            drain(client, config, ns.drain_timeout, force)
        log.info("stopping: Serve, then Ray and Triton")
        return code
    except PortInUse as e:
        print(f"vtfuse serve: not started: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        shutdown()
        atexit.unregister(shutdown)


def _ports(ns: argparse.Namespace) -> dict[str, int]:
    """Every port `vtfuse serve` listens on, labelled with the setting that moves it."""
    return {
        "API HTTP, API_PORT": ns.api_port,
        "API gRPC, GRPC_PORT": ns.grpc_port,
        "Triton HTTP, TRITON_HTTP_PORT": ns.triton_http_port,
        "Triton gRPC, TRITON_GRPC_PORT": ns.triton_grpc_port,
        "Triton metrics, TRITON_METRICS_PORT": ns.triton_metrics_port,
        "Ray metrics, RAY_METRICS_PORT": ns.ray_metrics_port,
    }


def _bounded(fn: Any, timeout: float, what: str) -> None:
    """Run `fn()` in a thread for at most `timeout` s (a Ray call must not hold the stop up); log failures."""

    def run() -> None:
        try:
            fn()
        except Exception:
            log.exception("%s failed", what)

    t = threading.Thread(target=run, name=what, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        log.error("%s did not return within %.0f s: going on", what, timeout)


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
    p.add_argument(
        "--triton-log",
        default=os.environ.get("TRITON_LOG", str(REPO_ROOT / "build" / "logs" / "tritonserver.log")),
        help="Triton's log file (env TRITON_LOG)",
    )
    p.add_argument("--exit-timeout", type=int, default=30, help="seconds Triton drains in-flight requests")
    p.add_argument(
        "--restrict-apis",
        action="store_true",
        default=os.environ.get("RESTRICT_APIS", "") not in ("", "0", "false"),
        help="production: Triton's model-control, repository, config, shared-memory, statistics, trace and logging "
        "APIs need the header vtfuse-admin: $TRITON_ADMIN_KEY (unset: a random key, i.e. off); env RESTRICT_APIS=1",
    )
    p.add_argument(
        "--triton-tls-cert",
        default=os.environ.get("TRITON_GRPC_TLS_CERT"),
        help="PEM certificate: Triton's gRPC endpoint speaks TLS and the API verifies it (env TRITON_GRPC_TLS_CERT)",
    )
    p.add_argument("--triton-tls-key", default=os.environ.get("TRITON_GRPC_TLS_KEY"), help="its PEM key")
    p.add_argument(
        "--triton-tls-ca",
        default=os.environ.get("TRITON_GRPC_TLS_CA"),
        help="CA the API trusts for Triton's certificate (default: the certificate itself, for a self-signed one)",
    )
    p.add_argument(
        "--stop-with-parent",
        action="store_true",
        help="drain and stop when the parent process dies (`make serve` passes it: make does not forward SIGTERM)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=float(os.environ.get("DRAIN_TIMEOUT", 30)),
        help="on SIGTERM, seconds in-flight requests get to finish before Serve stops (env DRAIN_TIMEOUT)",
    )
    p.add_argument(
        "--num-cpus",
        type=int,  # `ray start` takes whole CPUs (replicas ask for fractions of them)
        default=os.environ.get("RAY_NUM_CPUS", str(os.cpu_count() or 2)),  # a string: argparse checks it as typed
        help="whole CPUs the local Ray cluster schedules replicas on (env RAY_NUM_CPUS)",
    )
    p.add_argument(
        "--log-encoding",
        choices=["TEXT", "JSON", "text", "json"],
        default=os.environ.get("LOG_ENCODING") or None,
        help="replica log lines as TEXT (default) or JSON, each with its request_id (env LOG_ENCODING)",
    )
    p.add_argument(
        "--otlp-endpoint",
        default=None,
        help="OTLP/HTTP collector (http://host:4318): traces from the API and Triton; default: "
        "$OTEL_EXPORTER_OTLP_ENDPOINT; unset: tracing off",
    )
    p.add_argument(
        "--ray-metrics-port",
        type=int,
        default=_env_int("RAY_METRICS_PORT", 8090),
        help="Ray's Prometheus export port (env RAY_METRICS_PORT)",
    )
    p.add_argument(
        "--ray-log",
        default=os.environ.get("RAY_LOG", str(REPO_ROOT / "build" / "logs" / "ray.log")),
        help="output of `ray start`, appended (env RAY_LOG); Ray's own logs: /tmp/ray/session_latest/logs",
    )
    p.add_argument(
        "--ray-address",
        default=os.environ.get("RAY_ADDRESS") or None,
        help="deploy onto this existing Ray cluster (GCS host:port, or auto) and start no Ray of its own: a Triton "
        "on each node offering the resource vtfuse_triton, the API on every node hosting replicas; on stop only "
        "those are removed (env RAY_ADDRESS)",
    )
    p.add_argument(
        "--replicas-per-node",
        type=int,
        default=_env_int("REPLICAS_PER_NODE", 1),
        help="with --ray-address: Ingress replicas per node running a Triton (env REPLICAS_PER_NODE)",
    )
    p.add_argument(
        "--worker-api-port",
        type=int,
        default=_env_int("WORKER_API_PORT", 0) or None,
        help="with --ray-address: HTTP port of the front door on nodes other than the head, for nodes sharing one "
        "machine (default: API_PORT on every node; env WORKER_API_PORT)",
    )
    p.add_argument(
        "--worker-grpc-port",
        type=int,
        default=_env_int("WORKER_GRPC_PORT", 0) or None,
        help="with --ray-address: gRPC port on nodes other than the head (default: GRPC_PORT; env WORKER_GRPC_PORT)",
    )
    p.set_defaults(func=run_serve)
