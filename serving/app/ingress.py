"""The ingress deployment: the FastAPI HTTP API and the gRPC methods of one replica, over one Pipeline."""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.app import grpc_api, health
from serving.app.auth import presented_key
from serving.app.http_api import create_api
from serving.app.logs import configure_logging
from serving.app.metrics import ApiMetrics, MetricsCollector
from serving.app.models import load_runtimes
from serving.app.pipeline import Admission, Pipeline
from serving.app.preprocess import HandlePreprocess, InlinePreprocess, Preprocessor, imported_catalog
from serving.app.ratelimit import RateLimiter
from serving.app.settings import AppArgs
from serving.proto import vtfuse_pb2 as pb
from serving.tracing import grpc_server_span
from serving.triton.client import TritonClient

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
        self.limiter = RateLimiter(args.limits.rate_limit_rps, args.limits.rate_limit_burst)
        runtimes = load_runtimes(args)
        self.triton = TritonClient(args.triton_settings())
        catalog = imported_catalog(args) if args.triton_catalog else None
        pre = (
            HandlePreprocess(preprocess)
            if preprocess is not None
            else InlinePreprocess(Preprocessor(runtimes, args.limits.max_pixels, self.metrics))
        )
        self.pipeline = Pipeline(
            runtimes,
            self.triton,
            pre,
            self.metrics,
            args.engine_max_batch,
            max_pixels=args.limits.max_pixels,
            catalog=catalog,  # inline preprocessing shares `runtimes`: what the pipeline learns, it sees
        )
        self.collector = MetricsCollector(args.metrics_urls)
        log.info(
            "ingress up: triton %s%s, models %s (default %s), preprocess %s, auth %s, rate limit %s",
            args.triton_url,
            " (TLS)" if args.triton_tls else "",
            sorted(runtimes),
            args.default_model,
            args.preprocess,
            f"on ({len(args.api_keys)} keys)" if args.api_keys else "off",
            f"{args.limits.rate_limit_rps:g}/s" if self.limiter.enabled else "off",
        )

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve `user_config`: `{"draining": true}` refuses new requests (503, readiness 503), in-flight go on.

        With `"drain_wait_s": s` it also returns only when nothing is in flight (or `s` passed),
        so a config update that sets both completes when every replica is idle: how
        `vtfuse serve` drains before it shuts Serve down. `"drain_since": t` (wall-clock seconds)
        keeps admitting requests the front door received before `t` (Admission.enter).
        """
        draining = bool((config or {}).get("draining", False))
        if draining != self.admission.draining:
            log.warning("draining %s (%d requests in flight)", "on" if draining else "off", self.admission.inflight)
        self.admission.draining = draining
        since = (config or {}).get("drain_since")  # requests the front door had before this still get in
        self.admission.drain_since = float(since) if draining and since is not None else None
        wait = float((config or {}).get("drain_wait_s", 0) or 0)
        if draining and wait > 0:
            idle = await self.admission.wait_idle(wait)
            log.warning("drained: %s", "idle" if idle else f"{self.admission.inflight} still in flight after {wait} s")

    def __serve_build_asgi_app__(self) -> Any:
        # Serve's proxy already echoes X-Request-ID on every response: do not add a second one.
        return create_api(
            self.pipeline,
            self.args,
            self.metrics,
            self.collector.collect,
            self.admission,
            echo_request_id=False,
            rate_limiter=self.limiter,
        )

    async def _grpc(self, method: str, request: Any, grpc_context: Any) -> Any:
        metadata = dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}
        with grpc_server_span(method, metadata):  # joins the caller's `traceparent` (nothing when tracing is off)
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
                self.limiter,
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

    async def Caption(self, request: pb.CaptionRequest, grpc_context: Any = None) -> pb.CaptionResponse:  # noqa: N802
        """gRPC Vtfuse/Caption."""
        return await self._grpc("Caption", request, grpc_context)

    async def CaptionStream(self, request: pb.CaptionRequest, grpc_context: Any = None) -> Any:  # noqa: N802
        """gRPC Vtfuse/CaptionStream: one CaptionEvent per token, the last one holding the whole result."""
        metadata = dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}
        with grpc_server_span("CaptionStream", metadata):
            async for event in grpc_api.handle_stream(
                request, grpc_context, self.pipeline, self.args, self.metrics, _serve_request_id(), self.admission,
                presented_key(metadata), self.limiter,
            ):
                yield event

    async def ListModels(  # noqa: N802 - gRPC name
        self, request: pb.ListModelsRequest, grpc_context: Any = None
    ) -> pb.ListModelsResponse:
        """gRPC Vtfuse/ListModels."""
        return await self._grpc("ListModels", request, grpc_context)

    async def Check(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802 - gRPC name
        """gRPC grpc.health.v1.Health/Check: SERVING when ready (as /readyz), NOT_SERVING when not or draining."""

        async def ready() -> bool:
            return all((await self.pipeline.ready(self.args.default_model)).values())

        return await health.check(request.service, self.admission.draining, ready, grpc_context)

    async def Watch(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802 - gRPC name
        """gRPC grpc.health.v1.Health/Watch: the current status (as Check), then the stream ends.

        A stream kept open would hold one of this replica's request slots for as long as the
        client watches; a watcher calls again for the next status.
        """
        yield await self.Check(request, grpc_context)

    async def __del__(self) -> None:
        await self.triton.close()
