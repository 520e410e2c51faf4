"""The gRPC API (serving/proto/vtfuse.proto) on Ray Serve's gRPC proxy: protos ↔ tasks, errors → status codes.

Same limits and the same error classes as HTTP; an error sets the call's status code
(INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE, DEADLINE_EXCEEDED, ...) and details
on the Serve gRPC context and returns an empty message, which the proxy turns into
that status for the client.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from serving.app.auth import check_api_key
from serving.app.logs import clean_request_id, request_id_var
from serving.app.metrics import ApiMetrics
from serving.app.models import describe
from serving.app.pipeline import Admission, Pipeline, RequestContext
from serving.app.ratelimit import RateLimiter, caller_id
from serving.app.schemas import (
    CaptionResponse,
    EmbedResponse,
    MatchResponse,
    RetrieveResponse,
    VqaResponse,
    retrieve_form,
)
from serving.app.settings import AppArgs
from serving.app.tasks import (
    CaptionTask,
    EmbedTask,
    MatchTask,
    RetrieveTask,
    Task,
    VqaTask,
    check_limits,
    resolve_model,
)
from serving.errors import PayloadTooLarge, SchemaViolation, VtfuseError
from serving.generation.params import GenerationParams
from serving.proto import vtfuse_pb2 as pb

log = logging.getLogger(__name__)

ROUTES = {
    "Vqa": "/v1/vqa",
    "Match": "/v1/match",
    "Retrieve": "/v1/retrieve",
    "Embed": "/v1/embed",
    "ListModels": "/v1/models",
    "Caption": "/v1/caption",
    "CaptionStream": "/v1/caption",
}
EMPTY = {
    "Vqa": pb.VqaResponse,
    "Match": pb.MatchResponse,
    "Retrieve": pb.RetrieveResponse,
    "Embed": pb.EmbedResponse,
    "ListModels": pb.ListModelsResponse,
    "Caption": pb.CaptionResponse,
}
_EARLY_STOPPING = {"true": True, "false": False, "never": "never"}


def list_models(pipeline: Pipeline, default: str) -> pb.ListModelsResponse:
    """gRPC ListModels: the same entries as HTTP GET /v1/models."""
    models = []
    for _, rt in sorted(pipeline.runtimes.items()):
        d = describe(rt)
        models.append(
            pb.ModelInfo(
                name=d["name"],
                family=d["family"],
                architecture=d["architecture"],
                tasks=d["tasks"],
                engines=d["engines"],
                precision=d["precision"],
                source=d["source"],
                parity_json=json.dumps(d["parity"], default=str),
            )
        )
    return pb.ListModelsResponse(default_model=default, models=models)


def grpc_code(err: VtfuseError) -> grpc.StatusCode:
    """The gRPC status code of an error class (serving.errors names it)."""
    return getattr(grpc.StatusCode, err.grpc_status, grpc.StatusCode.INTERNAL)


def to_task(method: str, req: Any, model: str) -> Task:
    """A request proto → task (proto3 has no null: empty fields are absent ones)."""
    if method == "Vqa":
        return VqaTask(model, bytes(req.image), list(req.questions), req.top_k or 1, bool(req.return_attention))
    if method == "Match":
        return MatchTask(model, bytes(req.image), list(req.texts))
    if method == "Retrieve":
        try:
            image_form = retrieve_form(bool(req.image), len(req.texts) > 0, bool(req.text), len(req.images) > 0)
        except ValueError as e:
            raise SchemaViolation(str(e)) from None
        shortlist: int | str | None = "all" if req.shortlist < 0 else (req.shortlist or None)
        if image_form:
            return RetrieveTask(model, req.top_k or 1, image=bytes(req.image), texts=list(req.texts),
                                shortlist=shortlist)
        return RetrieveTask(model, req.top_k or 1, text=req.text, images=[bytes(b) for b in req.images],
                            shortlist=shortlist)
    if method == "Embed":
        return EmbedTask(model, [bytes(b) for b in req.images], list(req.texts))
    if method in ("Caption", "CaptionStream"):
        prompt = req.prompt if req.HasField("prompt") else None
        return CaptionTask(model, bytes(req.image), prompt, generation_params(req.parameters),
                           stream=method == "CaptionStream")
    raise ValueError(f"unknown method {method}")


def generation_params(p: pb.GenerationParameters) -> GenerationParams:
    """The parameters a CaptionRequest sets (proto3 `optional`: unset means the checkpoint's default)."""
    values = {name: getattr(p, name) for name in GenerationParams.names() if p.HasField(name)}
    if "early_stopping" in values:
        value = values["early_stopping"]
        if value.lower() not in _EARLY_STOPPING:
            raise SchemaViolation(f"early_stopping is {value!r}: use \"true\", \"false\" or \"never\"")
        values["early_stopping"] = _EARLY_STOPPING[value.lower()]
    return GenerationParams(**values)


def caption_proto(r: CaptionResponse) -> pb.CaptionResponse:
    """The API's caption as its proto."""
    return pb.CaptionResponse(
        model=r.model, caption=r.caption, token_ids=r.token_ids, finish_reason=r.finish_reason,
        usage=pb.CaptionUsage(prompt_tokens=r.usage.prompt_tokens, generated_tokens=r.usage.generated_tokens),
        request_id=r.request_id,
    )


def to_proto(result: Any) -> Any:
    """A pipeline response model → its response proto."""
    if isinstance(result, VqaResponse):
        answers = []
        for a in result.answers:
            att = None
            if a.attention is not None:
                rows = len(a.attention)
                att = pb.AttentionGrid(
                    rows=rows, cols=len(a.attention[0]) if rows else 0, values=[v for row in a.attention for v in row]
                )
            answers.append(
                pb.VqaAnswer(
                    question=a.question,
                    answer=a.answer,
                    score=a.score,
                    top_k=[pb.AnswerScore(answer=t.answer, score=t.score) for t in a.top_k],
                    attention=att,
                    tokens=a.tokens or [],
                )
            )
        return pb.VqaResponse(model=result.model, answers=answers)
    if isinstance(result, MatchResponse):
        return pb.MatchResponse(model=result.model, scores=result.scores)
    if isinstance(result, RetrieveResponse):
        return pb.RetrieveResponse(
            model=result.model,
            results=[pb.RetrieveResult(index=r.index, score=r.score, text=r.text or "") for r in result.results],
        )
    if isinstance(result, CaptionResponse):
        return caption_proto(result)
    if isinstance(result, EmbedResponse):
        return pb.EmbedResponse(
            model=result.model,
            image_embeddings=[pb.Embedding(values=v) for v in result.image_embeddings],
            text_embeddings=[pb.Embedding(values=v) for v in result.text_embeddings],
        )
    raise TypeError(f"no proto for {type(result).__name__}")


async def handle(
    method: str,
    req: Any,
    grpc_context: Any,
    pipeline: Pipeline,
    args: AppArgs,
    metrics: ApiMetrics,
    request_id: str | None,
    admission: Admission | None = None,
    api_key: str | None = None,
    rate_limiter: RateLimiter | None = None,
) -> Any:
    """Serve one gRPC call; never raises for a request error (it becomes the call's status)."""
    t0 = time.monotonic()
    rid = clean_request_id(request_id)
    token = request_id_var.set(rid)
    status = "OK"
    admitted = False
    try:
        if method == "ListModels":  # a listing: behind the key like the tasks, but no work to admit
            check_api_key(args.api_key_values(), api_key)
            await pipeline.learn(None, listing=True)
            return list_models(pipeline, args.default_model)
        admitted = admit(req, args, admission, api_key, rate_limiter)
        task = await task_of(method, req, pipeline, args)
        result = await pipeline.run(task, RequestContext(rid, pipeline.deadline(task, t0, args.limits)))
        return to_proto(result)
    except VtfuseError as e:
        status = refuse(method, e, grpc_context, rid)
        return EMPTY[method]()
    finally:
        if admitted:
            admission.leave()  # type: ignore[union-attr]
        request_id_var.reset(token)
        metrics.request(ROUTES.get(method, method), "grpc", status, time.monotonic() - t0)


def admit(req: Any, args: AppArgs, admission: Admission | None, api_key: str | None,
          rate_limiter: RateLimiter | None) -> bool:
    """The gates of every task call: key (401), message size (413), the caller's rate and capacity (429).

    Returns True once admitted: the caller must then `admission.leave()`.
    """
    keys = args.api_key_values()
    check_api_key(keys, api_key)
    if req.ByteSize() > args.limits.max_body_bytes:
        raise PayloadTooLarge(
            f"message is {req.ByteSize()} bytes, over the limit of {args.limits.max_body_bytes} (limits.max_body_bytes)"
        )
    if rate_limiter is not None and rate_limiter.enabled and keys:  # gRPC callers are told apart by key
        rate_limiter.check(caller_id(api_key, None))
    if admission is None:
        return False
    admission.enter()
    return True


async def task_of(method: str, req: Any, pipeline: Pipeline, args: AppArgs) -> Task:
    """The request's model (learnt from Triton if need be), its task and the task's limits checked."""
    await pipeline.learn(req.model or None)
    model = resolve_model(req.model or None, list(pipeline.runtimes), args.default_model)
    task = to_task(method, req, model)
    check_limits(task, args.limits)
    log.info("grpc %s model=%s", method, model)
    return task


def refuse(method: str, e: VtfuseError, grpc_context: Any, rid: str) -> str:
    """Set an error's status code, details and trailing metadata on the call; returns the code's name."""
    code = grpc_code(e)
    log.info("grpc %s refused: %s %s", method, e.code, e.message)
    if grpc_context is not None:
        grpc_context.set_code(code)
        grpc_context.set_details(f"{e.code}: {e.message}")
        meta = [("request_id", rid), ("error-code", e.code)]
        if e.retry_after is not None:
            meta.append(("retry-after", str(max(1, int(round(e.retry_after))))))
        grpc_context.set_trailing_metadata(meta)
    return code.name


async def handle_stream(
    req: Any,
    grpc_context: Any,
    pipeline: Pipeline,
    args: AppArgs,
    metrics: ApiMetrics,
    request_id: str | None,
    admission: Admission | None = None,
    api_key: str | None = None,
    rate_limiter: RateLimiter | None = None,
) -> AsyncIterator[pb.CaptionEvent]:
    """Serve one CaptionStream call: a CaptionEvent per token, the last holding the result.

    An error ends the stream with its status code, as for the unary calls.
    """
    method = "CaptionStream"
    t0 = time.monotonic()
    rid = clean_request_id(request_id)
    token = request_id_var.set(rid)
    status = "OK"
    admitted = False
    try:
        admitted = admit(req, args, admission, api_key, rate_limiter)
        task = await task_of(method, req, pipeline, args)
        assert isinstance(task, CaptionTask)
        events = await pipeline.stream(task, RequestContext(rid, pipeline.deadline(task, t0, args.limits)))
        async for event in events:
            if "caption" in event:
                result = CaptionResponse(**{k: v for k, v in event.items() if k != "delta"})
                yield pb.CaptionEvent(index=event.get("index", 0), delta=event["delta"], result=caption_proto(result))
            else:
                yield pb.CaptionEvent(index=event["index"], token_id=event["token_id"], delta=event["delta"])
    except VtfuseError as e:
        status = refuse(method, e, grpc_context, rid)
    finally:
        if admitted:
            admission.leave()  # type: ignore[union-attr]
        request_id_var.reset(token)
        metrics.request(ROUTES[method], "grpc", status, time.monotonic() - t0)
