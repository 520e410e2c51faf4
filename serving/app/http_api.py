"""The FastAPI app of the HTTP API: routes, JSON + multipart parsing, admission, request ids and the error contract.

Every error leaves as `{"error": {"code", "message"}}` with the status serving.errors
assigns (FastAPI's `{"detail": ...}` never does). Bodies are read with a size cap before
parsing; a body that is not multipart is parsed as JSON whatever its Content-Type says.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.app import schemas
from serving.app.auth import check_api_key, presented_key
from serving.app.haproxy_wrapper import RECEIVED_AT_HEADER
from serving.app.logs import clean_request_id, request_id_var
from serving.app.metrics import CONTENT_TYPE, ApiMetrics
from serving.app.models import describe
from serving.app.pipeline import Admission, Pipeline, RequestContext
from serving.app.ratelimit import RateLimiter, caller_id
from serving.app.settings import AppArgs, Limits
from serving.app.tasks import CaptionTask, check_limits, from_http, resolve_model
from serving.errors import (
    InvalidInput,
    InvalidJson,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    SchemaViolation,
    ShuttingDown,
    Unauthorized,
    UpstreamUnavailable,
    VtfuseError,
    error_body,
    error_headers,
)

log = logging.getLogger(__name__)

TASK_ROUTES = tuple(schemas.REQUEST_MODELS)
KNOWN_ROUTES = frozenset(
    (*TASK_ROUTES, "/", "/v1/models", "/v1/cluster", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json",
     "/redoc")
)
# The playground page (GET / and /static/*): plain files shipped as package data, nothing external.
STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'",
}
_STATUS_ERRORS: dict[int, type[VtfuseError]] = {
    400: InvalidInput,
    401: Unauthorized,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
    422: SchemaViolation,
    429: Overloaded,
    503: UpstreamUnavailable,
}
# Multipart field names: repeated ones become lists, file parts become base64 strings.
_LIST_FIELDS = {
    "/v1/vqa": {"questions": "questions", "question": "questions"},
    "/v1/match": {"texts": "texts", "text": "texts"},
    "/v1/retrieve": {"texts": "texts", "images": "images"},
    "/v1/embed": {"texts": "texts", "text": "texts", "images": "images", "image": "images"},
    "/v1/caption": {},
}
# Multipart values arrive as text: these fields are turned into the JSON types their schema takes.
_INT_FIELDS = {"top_k", "shortlist", "max_new_tokens", "min_new_tokens", "num_beams", "no_repeat_ngram_size", "seed"}
_FLOAT_FIELDS = {"temperature", "top_p", "repetition_penalty", "length_penalty"}
_BOOL_FIELDS = {"return_attention", "stream", "do_sample", "early_stopping"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def models_response(pipeline: Pipeline, default: str) -> schemas.ModelsResponse:
    """Every served model with its family, tasks, engines, precision, source and parity."""
    infos = [schemas.ModelInfo(**describe(rt)) for _, rt in sorted(pipeline.runtimes.items())]
    return schemas.ModelsResponse(default=default, models=infos)


def error_response(err: VtfuseError) -> JSONResponse:
    """The JSON error response of one error, with Retry-After when it has one."""
    return JSONResponse(error_body(err), status_code=err.http_status, headers=error_headers(err))


def summarize_validation(errors: list[dict[str, Any]], limit: int = 3) -> str:
    """Pydantic errors → one readable line naming each field and what is wrong."""
    parts = []
    for e in errors[:limit]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body",)) or "body"
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        if e.get("type") == "extra_forbidden":
            msg = "unknown field: remove it"
        parts.append(f"{loc}: {msg}")
    more = f" (+{len(errors) - limit} more)" if len(errors) > limit else ""
    return "; ".join(parts) + more


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing it as soon as it grows past `limit` bytes (413)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body is {declared} bytes, over the limit of {limit} (limits.max_body_bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body is over the limit of {limit} bytes (limits.max_body_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    """Bytes → JSON value (400 when malformed)."""
    if not raw.strip():
        raise InvalidJson("the body is empty: send a JSON object (or multipart/form-data)")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise InvalidJson(f"the body is not valid JSON ({e}): send a JSON object") from None


async def parse_multipart(headers: Headers, raw: bytes, route: str, limits: Limits) -> dict[str, Any]:
    """A multipart body → the same dict a JSON client would send (files as base64) for one schema to validate."""
    import base64

    async def stream():  # the already size-checked body
        yield raw

    parser = MultiPartParser(
        headers,
        stream(),
        max_files=limits.max_images + 1,
        max_fields=max(limits.max_texts, limits.max_questions) + 8,
        max_part_size=limits.max_body_bytes,
    )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        if "too many" in e.message.lower():
            raise PayloadTooLarge(f"multipart body: {e.message}") from None
        raise InvalidInput(f"malformed multipart body: {e.message}") from None
    lists = _LIST_FIELDS[route]
    out: dict[str, Any] = {}
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                value = base64.b64encode(await value.read()).decode("ascii")
            if key in lists:
                out.setdefault(lists[key], []).append(value)
            elif key in out:
                raise SchemaViolation(f"multipart field {key!r} appears more than once: send it once")
            else:
                out[key] = _form_value(key, value)
    finally:
        await form.close()
    return out


def _form_value(key: str, value: Any) -> Any:
    """A multipart text value as the JSON type its field takes (left as text when it is not one: then a 422)."""
    if not isinstance(value, str):
        return value
    v = value.strip()
    if key in _INT_FIELDS and v.lstrip("-").isdigit():
        return int(v)
    if key in _FLOAT_FIELDS:
        try:
            return float(v)
        except ValueError:
            return value
    if key in _BOOL_FIELDS:
        low = v.lower()
        return True if low in ("1", "true", "yes", "on") else False if low in ("0", "false", "no", "off") else value
    return value


def sse(event: dict[str, Any]) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def event_stream(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """text/event-stream of a generation's events; an error after the first event becomes an `error` event."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield sse(event)
        except VtfuseError as err:
            yield sse(error_body(err))

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)


def validate_body(route: str, obj: Any) -> schemas._Request:
    """The schema of `route` over a parsed body (422 on any violation)."""
    try:
        return schemas.REQUEST_MODELS[route].model_validate(obj)
    except ValidationError as e:
        raise SchemaViolation(summarize_validation([dict(x) for x in e.errors()])) from None


def route_path(scope: Scope) -> str:
    """The request's path below the app's route prefix (Serve mounts the app under one)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


class TaskRoutes:
    """POST to a task route goes straight to its handler; everything else to the FastAPI app.

    The task handlers read the raw body and return a ready Response, so FastAPI's routing,
    endpoint wrapping and exception middlewares add nothing to them but CPU: ~10 % of an Ingress
    replica's Python time per one-question call at c=32 (py-spy, loadtests/README.md). The
    FastAPI routes stay declared for /docs and the OpenAPI schema, and still answer any other
    method or path (405, 404, the trailing-slash redirect) as before.
    """

    def __init__(self, app: ASGIApp, run_task: Callable[[Request, str], Awaitable[Response]]) -> None:
        self.app = app
        self.run_task = run_task

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = route_path(scope) if scope["type"] == "http" and scope.get("method") == "POST" else ""
        if route not in TASK_ROUTES:
            await self.app(scope, receive, send)
            return
        try:
            response = await self.run_task(Request(scope, receive), route)
        except VtfuseError as err:
            response = error_response(err)
        await response(scope, receive, send)  # anything else: ApiMiddleware's JSON 500


def received_at(headers: Headers) -> float | None:
    """When the front door (HAProxy or Ray's proxy) received the request, wall-clock seconds; None if unstamped."""
    value = headers.get(RECEIVED_AT_HEADER, "")
    return int(value) / 1000.0 if value.isdigit() else None


class ApiMiddleware:
    """Outermost ASGI layer: request id, admission control, per-route metrics, last-resort 500 JSON."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: ApiMetrics,
        admission: Admission,
        echo_request_id: bool = True,
        api_keys: list[str] | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.admission = admission
        self.echo_request_id = echo_request_id
        self.api_keys = list(api_keys or [])
        self.rate_limiter = rate_limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = Headers(scope=scope)
        given = headers.get("x-request-id")
        rid = clean_request_id(given)
        token = request_id_var.set(rid)
        scope.setdefault("state", {})["request_id"] = rid
        path = route_path(scope)
        route = path if path in KNOWN_ROUTES else "/static" if path.startswith("/static/") else "other"
        started, status = False, 500
        add_id = self.echo_request_id or given is None

        async def send_wrapper(message: Message) -> None:
            nonlocal started, status
            if message["type"] == "http.response.start":
                started, status = True, int(message["status"])
                if add_id and not any(k.lower() == b"x-request-id" for k, _ in message.get("headers", [])):
                    message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        admitted = False
        try:
            # The model list (as gRPC ListModels) and the cluster's layout are behind the key like the tasks.
            if route in ("/v1/models", "/v1/cluster"):
                try:
                    check_api_key(self.api_keys, presented_key(headers))
                except Unauthorized as err:
                    resp = error_response(err)
                    resp.headers["WWW-Authenticate"] = "Bearer"
                    await resp(scope, receive, send_wrapper)
                    return
            if route in TASK_ROUTES:
                try:  # auth, then the caller's rate, then this replica's capacity: no body read yet
                    key = presented_key(headers)
                    check_api_key(self.api_keys, key)
                    if self.rate_limiter is not None and self.rate_limiter.enabled:
                        client = scope.get("client")
                        caller = caller_id(key if self.api_keys else None, client[0] if client else None)
                        self.rate_limiter.check(caller)
                    self.admission.enter(received_at(headers))
                    admitted = True
                except VtfuseError as err:
                    resp = error_response(err)
                    if isinstance(err, Unauthorized):
                        resp.headers["WWW-Authenticate"] = "Bearer"
                    if isinstance(err, ShuttingDown):  # send the client to another instance
                        resp.headers["Connection"] = "close"
                    await resp(scope, receive, send_wrapper)
                    return
            await self.app(scope, receive, send_wrapper)
        except Exception:
            log.exception("unhandled error on %s", path)
            if not started:
                await error_response(VtfuseError(f"internal error (request id {rid}): please report it"))(
                    scope, receive, send_wrapper
                )
        finally:
            if admitted:
                self.admission.leave()
            request_id_var.reset(token)
            self.metrics.request(route, "http", status, time.perf_counter() - t0)


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """OpenAPI with both request encodings (JSON and multipart) of the task routes documented."""

    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        comps = spec.setdefault("components", {}).setdefault("schemas", {})
        for route, model in schemas.REQUEST_MODELS.items():
            sch = model.model_json_schema(ref_template="#/components/schemas/{model}")
            comps.update(sch.pop("$defs", {}))
            comps[model.__name__] = sch
            op = spec["paths"][route]["post"]
            op["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "description": "Same fields; images as file parts, "
                            "repeated fields (question, texts, images) repeated.",
                        }
                    },
                },
            }
        app.openapi_schema = spec
        return spec

    return build


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorResponse, "description": desc}
    for code, desc in {
        400: "Malformed JSON, multipart or base64",
        401: "API key missing or wrong (only when keys are configured)",
        413: "Body, image pixels or item count over the limits",
        415: "An image that is not a readable PNG, JPEG or WebP",
        422: "Schema violation: empty list, unknown field, wrong type, text over the token limit, unknown model",
        429: "Overloaded (Retry-After)",
        503: "Triton unavailable (Retry-After)",
        504: "Deadline expired upstream",
    }.items()
}


def create_api(
    pipeline: Pipeline,
    args: AppArgs,
    metrics: ApiMetrics,
    collect_metrics: Callable[[], Awaitable[str]],
    admission: Admission | None = None,
    echo_request_id: bool = True,
    rate_limiter: RateLimiter | None = None,
    cluster_status: Callable[[], Awaitable[Any]] | None = None,
) -> ASGIApp:
    """The HTTP API as an ASGI app (FastAPI wrapped in `ApiMiddleware`).

    `admission` and `rate_limiter` are shared with the replica's gRPC methods when given;
    `cluster_status` answers `GET /v1/cluster` (default: serving.app.clusterinfo, read from Ray).
    """
    limits = args.limits
    admission = admission or Admission(limits.max_inflight)
    app = FastAPI(
        title="vtfuse",
        version="1.0",
        description="Visual question answering, image-text matching, retrieval and embeddings over a "
        "cross-attention fusion model served by Triton.",
    )

    @app.exception_handler(VtfuseError)
    async def _vtfuse(_: Request, exc: VtfuseError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(SchemaViolation(summarize_validation([dict(e) for e in exc.errors()])))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        cls = _STATUS_ERRORS.get(exc.status_code, VtfuseError)
        if exc.status_code == 404:
            msg = f"no route {request.url.path}: see /docs for the API"
        elif exc.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path}: see /docs"
        else:
            msg = str(exc.detail)
        resp = error_response(cls(msg))
        resp.status_code = exc.status_code
        if exc.headers:
            resp.headers.update(exc.headers)
        return resp

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        rid = getattr(request.state, "request_id", "-")
        return error_response(VtfuseError(f"internal error (request id {rid}): please report it"))

    async def run_task(request: Request, route: str) -> Response:
        t0 = time.monotonic()
        rid = request.state.request_id
        raw = await read_body(request, limits.max_body_bytes)
        ctype = request.headers.get("content-type", "").lower()
        if ctype.startswith("multipart/form-data"):
            obj = await parse_multipart(request.headers, raw, route, limits)
        else:
            obj = parse_json(raw)
        body = validate_body(route, obj)
        await pipeline.learn(body.model)
        model = resolve_model(body.model, list(pipeline.runtimes), args.default_model)
        task = from_http(body, model)
        check_limits(task, limits)
        log.info("%s model=%s", route, model)
        ctx = RequestContext(rid, pipeline.deadline(task, t0, limits))
        if isinstance(task, CaptionTask) and task.stream:
            return event_stream(await pipeline.stream(task, ctx))
        result = await pipeline.run(task, ctx)
        return JSONResponse(result.model_dump(exclude_none=True))

    @app.post(
        "/v1/vqa",
        response_model=schemas.VqaResponse,
        responses=ERROR_RESPONSES,
        summary="Answer questions about one image",
    )
    async def vqa(request: Request) -> Response:
        return await run_task(request, "/v1/vqa")

    @app.post(
        "/v1/match",
        response_model=schemas.MatchResponse,
        responses=ERROR_RESPONSES,
        summary="Score how well each text describes one image",
    )
    async def match(request: Request) -> Response:
        return await run_task(request, "/v1/match")

    @app.post(
        "/v1/retrieve",
        response_model=schemas.RetrieveResponse,
        responses=ERROR_RESPONSES,
        summary="Rank texts for an image, or images for a text",
    )
    async def retrieve(request: Request) -> Response:
        return await run_task(request, "/v1/retrieve")

    @app.post(
        "/v1/embed",
        response_model=schemas.EmbedResponse,
        responses=ERROR_RESPONSES,
        summary="Image and/or text embeddings",
    )
    async def embed(request: Request) -> Response:
        return await run_task(request, "/v1/embed")

    @app.post(
        "/v1/caption",
        response_model=schemas.CaptionResponse,
        responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}, "description": "The caption, or "
                   "with `stream` one `data:` event per token and a last one with the whole result"}},
        summary="Caption one image (generated token by token; streamed with `stream`)",
    )
    async def caption(request: Request) -> Response:
        return await run_task(request, "/v1/caption")

    @app.get("/v1/models", response_model=schemas.ModelsResponse, summary="Served models, their tasks and engines")
    async def list_models() -> schemas.ModelsResponse:
        await pipeline.learn(None, listing=True)
        return models_response(pipeline, args.default_model)

    async def ray_cluster_status() -> Any:
        from serving.app.clusterinfo import cluster_status as read

        async def ready() -> bool:
            return all((await pipeline.ready(args.default_model)).values())

        return await read(args.triton_url, ready)

    from serving.app.clusterinfo import ClusterResponse

    @app.get(
        "/v1/cluster",
        response_model=ClusterResponse,
        summary="The Ray cluster's nodes, the API's replicas and front doors, and the Tritons, with their health",
    )
    async def cluster() -> Any:
        return await (cluster_status or ray_cluster_status)()

    @app.get("/healthz", response_model=schemas.Health, summary="Liveness")
    async def healthz() -> schemas.Health:
        return schemas.Health(status="live")

    @app.get(
        "/readyz",
        response_model=schemas.Health,
        responses={503: ERROR_RESPONSES[503]},
        summary="Ready when every Triton model the default model routes to is ready",
    )
    async def readyz() -> Response:
        if admission.draining:
            return error_response(ShuttingDown("this server is shutting down (draining)", retry_after=1.0))
        models = await pipeline.ready(args.default_model)
        if all(models.values()):
            return JSONResponse(schemas.Health(status="ready", models=models).model_dump())
        waiting = ", ".join(m for m, ok in models.items() if not ok)
        return error_response(UpstreamUnavailable(f"Triton models not ready: {waiting}", retry_after=1.0))

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics of every replica")
    async def metrics_endpoint() -> Response:
        try:
            text = await asyncio.wait_for(collect_metrics(), timeout=10)
        except asyncio.TimeoutError:
            raise UpstreamUnavailable("metrics endpoints did not answer in 10 s", retry_after=5.0) from None
        return Response(text, media_type=CONTENT_TYPE)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def playground() -> Response:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            raise NotFound(f"the playground page is not installed ({page} is missing): see /docs for the API")
        return FileResponse(page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")

    app.openapi = _openapi(app)  # type: ignore[method-assign]
    limiter = rate_limiter or RateLimiter(limits.rate_limit_rps, limits.rate_limit_burst)
    routes = TaskRoutes(app, run_task)
    return ApiMiddleware(routes, metrics, admission, echo_request_id, args.api_key_values(), limiter)
