"""The generative families' task code: captions (whole or streamed) and generated VQA answers, over Triton streams.

Families name these functions in their `task_code` (serving/families/__init__.py); the pipeline
calls them instead of its built-in tasks. Each request becomes one request to the model's
decoupled Triton generate model (serving/triton/python_models/generate.py) over a gRPC stream,
carrying the image as the processor resizes it, the prompt's or questions' token ids and the
generation parameters. Everything a request can get wrong (a parameter, a prompt too long, a
beam search asked to stream) is checked here first, so the 422 names the field before any
engine runs. Leaving a stream early (the HTTP client or gRPC caller went away, the deadline
passed) cancels the Triton stream, and the model frees the request's decoder rows within a step.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from serving.app.preprocess import PreprocessItem
from serving.app.schemas import AnswerScore, CaptionResponse, CaptionUsage, VqaAnswer, VqaResponse
from serving.app.tasks import CaptionTask, VqaTask
from serving.errors import SchemaViolation, UpstreamError
from serving.generation.params import resolve
from serving.generation.spec import GenerationSpec

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from serving.app.models import ModelRuntime
    from serving.app.pipeline import Pipeline, RequestContext


def _spec(rt: ModelRuntime) -> GenerationSpec:
    spec = rt.generation
    if spec is None:  # a family naming this code always has one; a native model without its decoder lacks the task
        raise SchemaViolation(f"model {rt.name!r} does not generate text: its tasks are {', '.join(rt.tasks)}")
    return spec


def prompt_ids(task: CaptionTask, rt: ModelRuntime, spec: GenerationSpec) -> list[int] | None:
    """The prompt's token ids with the tokenizer's special tokens, as the processor gives them (422 when too long)."""
    if task.prompt is None:
        return None
    if not task.prompt.strip():
        raise SchemaViolation("prompt is empty: send words, or leave prompt out")
    ids = rt.tokenizer.encode(task.prompt).ids
    if len(ids) > spec.max_prompt_tokens:
        raise SchemaViolation(
            f"prompt has {len(ids)} tokens with the special tokens, over this model's limit of "
            f"{spec.max_prompt_tokens}: shorten it"
        )
    return list(ids)


@dataclass
class CaptionCall:
    """A checked caption request, ready to send: the Triton inputs and what the response needs."""

    rt: ModelRuntime
    inputs: dict[str, np.ndarray]
    prompt_length: int


async def prepare_caption(pipeline: Pipeline, task: CaptionTask, rt: ModelRuntime, ctx: RequestContext) -> CaptionCall:
    """Check the parameters and prompt (422 naming the field), then decode and resize the image."""
    spec = _spec(rt)
    ids = prompt_ids(task, rt, spec)
    decoder_prompt = spec.decoder_prompt(ids)
    resolve(task.params, spec.defaults, len(decoder_prompt), stream=task.stream)  # raises the 422s
    pre = await pipeline.preprocess(PreprocessItem(task.model, [task.image], [], ctx.request_id), ctx)
    options = {**task.params.to_dict(), "stream": task.stream}
    inputs: dict[str, np.ndarray] = {
        "PIXELS": pre.pixels[0],
        "PARAMETERS": np.array([json.dumps(options).encode()], dtype=np.object_),
    }
    if ids is not None:
        inputs["PROMPT_IDS"] = np.array([ids], dtype=np.int64)
        inputs["PROMPT_MASK"] = np.ones((1, len(ids)), dtype=np.int64)
    return CaptionCall(rt, inputs, len(decoder_prompt))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def caption_response(task: CaptionTask, out: dict[str, np.ndarray], ctx: RequestContext) -> CaptionResponse:
    """The final response of the generate model → the API's caption."""
    ids = [int(t) for t in out["TOKEN_IDS"][0] if t >= 0]
    prompt = int(out["PROMPT_TOKENS"][0])
    return CaptionResponse(
        model=task.model,
        caption=_text(out["TEXT"][0]),
        token_ids=ids,
        finish_reason=_text(out["FINISH_REASON"][0]),  # type: ignore[arg-type]
        usage=CaptionUsage(prompt_tokens=prompt, generated_tokens=len(ids) - prompt),
        request_id=ctx.request_id,
    )


async def caption(pipeline: Pipeline, task: CaptionTask, rt: ModelRuntime, ctx: RequestContext) -> CaptionResponse:
    """A whole caption (`stream` false): one Triton stream, its final response."""
    call = await prepare_caption(pipeline, task, rt, ctx)
    final = None
    t = time.perf_counter()
    async for out in pipeline.triton.stream(rt.engine("generate"), call.inputs, deadline=ctx.deadline,
                                            request_id=ctx.request_id):
        final = out
    if final is None:
        raise UpstreamError(f"{rt.engine('generate')} ended without a result")
    pipeline.metrics.triton_call("generate", time.perf_counter() - t, _nbytes(call.inputs), _nbytes(final))
    return caption_response(task, final, ctx)


async def open_caption_stream(
    pipeline: Pipeline, task: CaptionTask, rt: ModelRuntime, ctx: RequestContext
) -> AsyncIterator[dict[str, Any]]:
    """A streamed caption's events: one per token (`index`, `token_id`, `delta`), then the whole result.

    The first Triton response is awaited before the first event, so a request refused at once
    (a full queue: 429) fails here as an ordinary error, before any event was sent. The last
    event's `delta` holds any text the per-token deltas held back (a word still being formed), so
    the deltas always concatenate to `caption`.
    """
    call = await prepare_caption(pipeline, task, rt, ctx)
    responses = pipeline.triton.stream(rt.engine("generate"), call.inputs, deadline=ctx.deadline,
                                       request_id=ctx.request_id)
    return _events(task, responses, ctx, await responses.__anext__())


async def _events(
    task: CaptionTask, responses: AsyncIterator[dict[str, np.ndarray]], ctx: RequestContext, first: dict[str, Any]
) -> AsyncIterator[dict[str, Any]]:
    text, index, out = "", 0, first
    try:
        while True:
            reason = _text(out["FINISH_REASON"][0])
            if reason:  # the final response: the whole result
                result = caption_response(task, out, ctx)
                if not result.caption.startswith(text):  # the model's deltas are a prefix of its text by design
                    log.error("request_id=%s: streamed deltas %r are not a prefix of the caption %r", ctx.request_id,
                              text, result.caption)
                rest = result.caption[len(text):] if result.caption.startswith(text) else ""
                yield {"delta": rest, **result.model_dump()}
                return
            token = int(out["TOKEN_IDS"][0, 0])
            delta = _text(out["TEXT"][0])
            text += delta
            yield {"index": index, "token_id": token, "delta": delta}
            index += 1
            out = await responses.__anext__()
    finally:
        await responses.aclose()  # type: ignore[attr-defined]  # cancels the Triton stream if it is still open


async def vqa(pipeline: Pipeline, task: VqaTask, rt: ModelRuntime, ctx: RequestContext) -> VqaResponse:
    """Generated answers: the image once, the questions' states once, each answer decoded as `generate()` alone."""
    _spec(rt)
    if task.return_attention:
        raise SchemaViolation(
            f"model {rt.name!r} generates its answers: it has no attention grid; drop return_attention"
        )
    pre = await pipeline.preprocess(PreprocessItem(task.model, [task.image], task.questions, ctx.request_id), ctx)
    inputs = {"PIXELS": pre.pixels[0], "PROMPT_IDS": pre.ids, "PROMPT_MASK": pre.mask}
    final = None
    t = time.perf_counter()
    async for out in pipeline.triton.stream(rt.engine("generate"), inputs, deadline=ctx.deadline,
                                            request_id=ctx.request_id):
        final = out
    if final is None:
        raise UpstreamError(f"{rt.engine('generate')} ended without a result")
    pipeline.metrics.triton_call("generate", time.perf_counter() - t, _nbytes(inputs), _nbytes(final))
    answers = []
    for q, question in enumerate(task.questions):
        answer, score = _text(final["TEXT"][q]), float(final["SCORE"][q])
        answers.append(VqaAnswer(question=question, answer=answer, score=score,
                                 top_k=[AnswerScore(answer=answer, score=score)]))
    return VqaResponse(model=task.model, answers=answers)


def _nbytes(arrays: dict[str, np.ndarray]) -> int:
    return sum(int(np.asarray(a).nbytes) for a in arrays.values())
