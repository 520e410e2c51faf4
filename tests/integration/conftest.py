"""Session fixture `serve_app`: the real Ray Serve app (HTTP + gRPC) on free ports against the `triton` fixture."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from loadtests.servers import wait_http
from serving.app.front import front_environment, stop_haproxy
from serving.app.logs import serve_logging_config
from serving.app.ray_background import background_environment
from serving.app.settings import AppArgs, DeploymentDefaults, Limits, ModelSpec
from serving.model.checkpoint import REPO_ROOT
from serving.procs import free_port
from serving.tracing import serve_tracing_config
from serving.triton.launcher import TritonServer
from tests.otlp import OtlpReceiver

# Small enough to test the 413s quickly; everything else at the shipped defaults.
TEST_LIMITS = Limits(max_body_bytes=4 * 1024 * 1024, max_questions=32, max_texts=64, max_images=32)


@dataclass(frozen=True)
class ServeApp:
    """Where the running application listens."""

    http_url: str
    grpc_target: str
    metrics_port: int
    triton: TritonServer
    args: AppArgs


@pytest.fixture(scope="session")
def serve_app(triton: TritonServer, otlp_receiver: OtlpReceiver) -> Iterator[ServeApp]:
    """Ray (a local cluster of its own) + Serve with the vtfuse app: 2 ingress replicas, 1 Preprocess replica.

    Two ingress replicas make the cross-replica metrics test meaningful; the Preprocess
    deployment is on so @serve.batch runs for real (the inline composition is tested by
    side apps). `tiny` sends one-question VQA calls to Triton's `vqa`, as the shipped config
    does; `tiny@1` routes every call to version 1 of the same engines from the ingress. The cluster is always
    shut down, whatever happens during start-up or the tests.

    Logs are JSON (Serve's `logging_config`); traces go to `otlp_receiver` with sampling ratio 0:
    only requests that carry a sampled `traceparent` are traced.
    """
    import ray
    from ray import serve

    from serving.app.builder import APP_NAME, build_app, serve_options

    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    args = AppArgs(
        triton_url=triton.url_grpc,
        repository=str(triton.settings.repository),  # tiny plus the imported blip-test and vilt-test
        preprocess="deployment",  # the composition with the extra hop: @serve.batch and request ids across it
        # As shipped, `tiny` sends one-question VQA to Triton's `vqa`; `tiny@1` runs the engines from the ingress.
        models={"tiny": ModelSpec(vqa="vqa", generate="caption"), "tiny@1": ModelSpec(version="1")},
        limits=TEST_LIMITS,
        deployments=DeploymentDefaults(ingress_replicas=2, preprocess_replicas=1),
    )
    # Replica processes import `serving` from this checkout; Ray's HTTP proxy runs our middleware, as under
    # `vtfuse serve` (no in-flight cap here: the tests' own bursts stay small).
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "serving.app.proxy:middlewares")
    # The front door `vtfuse serve` runs (serving/app/front.py: HAProxy unless VTFUSE_FRONT=ray), in the environment
    # Ray starts with (its processes inherit the raylet's), and out of this process's again once Ray runs: stacks that
    # tests start must not inherit this one's HAProxy ports.
    front_env = front_environment() | background_environment()
    saved_env = {k: os.environ.get(k) for k in front_env}
    os.environ.update(front_env)
    # Ray's processes inherit the OTLP exporter's settings (serving/tracing.py).
    os.environ.update(
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp_receiver.endpoint, OTEL_SERVICE_NAME="vtfuse-api-test",
        OTEL_TRACES_SAMPLER_ARG="0", OTEL_BSP_SCHEDULE_DELAY="200",
    )
    ray.init(
        address="local",  # a cluster of its own, never one that Ray's current-cluster file names
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        namespace="vtfuse-tests",
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    for key, value in saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        serve.start(**serve_options("127.0.0.1", http_port, grpc_port), tracing_config=serve_tracing_config())
        serve.run(build_app(args), name=APP_NAME, route_prefix="/", logging_config=serve_logging_config("JSON"))
        app = ServeApp(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", metrics_port, triton, args)
        wait_http(app.http_url + "/readyz", timeout=120)
        yield app
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC" in front_env:
                stop_haproxy(Path(front_env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent)


@contextmanager
def side_app(serve_app: ServeApp, args: AppArgs, name: str, prefix: str, client: httpx.Client) -> Iterator[None]:
    """Deploy the vtfuse app with `args` as a second application under `prefix` on the session's Serve.

    Enters once `client` reaches it, and deletes it on leaving, failure included: an application
    left behind makes Serve's gRPC proxy refuse every call without `application` metadata.
    HAProxy takes a new route with its next configuration reload, shortly after `serve.run`
    returns; a connection kept alive from before the reload gets one more answer from the old
    HAProxy (old routes) and is closed after it, so the routes are asked through `client` until
    every such connection of its pool has gone.
    """
    from ray import serve

    from serving.app.builder import build_app

    serve.run(build_app(args), name=name, route_prefix=prefix)
    try:
        deadline = time.monotonic() + 30
        while prefix not in client.get(serve_app.http_url + "/-/routes", timeout=5).json():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{prefix} is not among the front door's routes 30 s after serve.run")
            time.sleep(0.05)
        yield
    finally:
        serve.delete(name)


@pytest.fixture(scope="session")
def blip(hf_checkpoints):
    """The random-weight BLIP test checkpoint as transformers loads it, with its processor: the reference."""
    from transformers import AutoProcessor, BlipForImageTextRetrieval

    folder = str(hf_checkpoints["blip"])
    return BlipForImageTextRetrieval.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="session")
def vilt(hf_checkpoints):
    """The random-weight ViLT test checkpoint as transformers loads it, with its processor: the reference."""
    from transformers import AutoProcessor, ViltForQuestionAnswering

    folder = str(hf_checkpoints["vilt"])
    return ViltForQuestionAnswering.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
