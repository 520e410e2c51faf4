"""Session fixture `serve_app`: the real Ray Serve app (HTTP + gRPC) on free ports against the `triton` fixture."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from loadtests.servers import wait_http
from serving.app.logs import serve_logging_config
from serving.app.settings import AppArgs, DeploymentDefaults, Limits, ModelSpec
from serving.model.checkpoint import REPO_ROOT
from serving.tracing import serve_tracing_config
from serving.triton.launcher import TritonServer
from tests.helpers import free_port
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
        models={"tiny": ModelSpec(vqa="vqa"), "tiny@1": ModelSpec(version="1")},
        limits=TEST_LIMITS,
        deployments=DeploymentDefaults(ingress_replicas=2, preprocess_replicas=1),
    )
    # Replica processes import `serving` from this checkout; Ray's HTTP proxy runs our middleware, as under
    # `vtfuse serve` (no in-flight cap here: the tests' own bursts stay small).
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "serving.app.proxy:middlewares")
    # Ray's processes inherit the OTLP exporter's settings (serving/tracing.py).
    os.environ.update(
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp_receiver.endpoint, OTEL_SERVICE_NAME="vtfuse-api-test",
        OTEL_TRACES_SAMPLER_ARG="0", OTEL_BSP_SCHEDULE_DELAY="200",
    )
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        namespace="vtfuse-tests",
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
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
