"""The ingress deployment: the FastAPI HTTP API and the gRPC methods of one replica, over one Pipeline."""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.app import grpc_api
from serving.app.auth import presented_key
from serving.app.http_api import create_api
from serving.app.logs import configure_logging
from serving.app.metrics import ApiMetrics, MetricsCollector
from serving.app.models import load_runtimes
from serving.app.pipeline import Admission, Pipeline
from serving.app.preprocess import HandlePreprocess, InlinePreprocess, Preprocessor
from serving.app.settings import AppArgs
from serving.proto import vtfuse_pb2 as pb
from serving.triton.client import TritonClient, TritonClientSettings

log = logging.getLogger(__name__)


def _serve_request_id() -> str | None:
    """The request id Serve's proxy assigned (the client's X-Request-ID / `request_id` metadata, or a fresh one)."""
    try:
        return serve.context._get_serve_request_context().request_id or None
    except Exception:  # outside a replica
        return None


@serve.deployment(
    name="Ingress",
    max_ongoing_requests=128,
    max_queued_requests=256,
    ray_actor_options={"num_cpus": 0.25},
    graceful_shutdown_timeout_s=20,
)
@serve.ingress()
class Ingress:
    """HTTP (FastAPI) and gRPC front of the API: validates, routes, calls Triton."""

    def __init__(self, args: AppArgs, preprocess: DeploymentHandle | None = None) -> None:
        configure_logging(args.log_level)
        self.args = args
        self.metrics = ApiMetrics()
        self.admission = Admission(args.limits.max_inflight)
        runtimes = load_runtimes(args)
        self.triton = TritonClient(
            TritonClientSettings(
                url=args.triton_url,
                pool_size=args.triton_pool_size,
                max_reconnect_backoff_ms=args.triton_max_reconnect_backoff_ms,
            )
        )
        pre = (
            HandlePreprocess(preprocess)
            if preprocess is not None
            else InlinePreprocess(Preprocessor(runtimes, args.limits.max_pixels, self.metrics))
        )
        self.pipeline = Pipeline(runtimes, self.triton, pre, self.metrics, args.engine_max_batch)
        self.collector = MetricsCollector(args.metrics_urls)
        log.info(
            "ingress up: triton %s, models %s (default %s), preprocess %s",
            args.triton_url,
            sorted(runtimes),
            args.default_model,
            args.preprocess,
        )

    def __serve_build_asgi_app__(self) -> Any:
        # Serve's proxy already echoes X-Request-ID on every response: do not add a second one.
        return create_api(
            self.pipeline, self.args, self.metrics, self.collector.collect, self.admission, echo_request_id=False
        )

    async def _grpc(self, method: str, request: Any, grpc_context: Any) -> Any:
        metadata = dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}
        return await grpc_api.handle(
            method,
            request,
            grpc_context,
            self.pipeline,
            self.args,
            self.metrics,
            _serve_request_id(),
            self.admission,
            presented_key(metadata),
        )

    async def Vqa(self, request: pb.VqaRequest, grpc_context: Any = None) -> pb.VqaResponse:  # noqa: N802 - gRPC name
        """gRPC Vtfuse/Vqa."""
        return await self._grpc("Vqa", request, grpc_context)

    async def Match(self, request: pb.MatchRequest, grpc_context: Any = None) -> pb.MatchResponse:  # noqa: N802
        """gRPC Vtfuse/Match."""
        return await self._grpc("Match", request, grpc_context)

    async def Retrieve(self, request: pb.RetrieveRequest, grpc_context: Any = None) -> pb.RetrieveResponse:  # noqa: N802
        """gRPC Vtfuse/Retrieve."""
        return await self._grpc("Retrieve", request, grpc_context)

    async def Embed(self, request: pb.EmbedRequest, grpc_context: Any = None) -> pb.EmbedResponse:  # noqa: N802
        """gRPC Vtfuse/Embed."""
        return await self._grpc("Embed", request, grpc_context)

    async def __del__(self) -> None:
        await self.triton.close()
