"""Executes a task: preprocess, then the router's plan of Triton engine calls, then the response.

One `Pipeline` per ingress replica; it is protocol-neutral (HTTP and gRPC both call it)
and holds no per-request state. Every Triton call carries the request id and the time
left before the request's deadline.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from serving.app import router
from serving.app.catalog import ImportedCatalog
from serving.app.metrics import ApiMetrics
from serving.app.models import ModelRuntime
from serving.app.preprocess import PreprocessFn, PreprocessItem, Tensors
from serving.app.router import (
    CROSS_ATTENTION,
    IMAGE_EMBEDDING,
    IMAGE_FEATURES,
    TEXT_EMBEDDING,
    TEXT_FEATURES,
    VQA_LOGITS,
)
from serving.app.schemas import (
    AnswerScore,
    CaptionResponse,
    EmbedResponse,
    MatchResponse,
    RetrieveResponse,
    RetrieveResult,
    VqaAnswer,
    VqaResponse,
)
from serving.app.settings import Limits
from serving.app.tasks import CaptionTask, EmbedTask, MatchTask, RetrieveTask, Task, VqaTask
from serving.errors import (
    InvalidInput,
    Overloaded,
    SchemaViolation,
    ShuttingDown,
    TaskNotSupported,
    UpstreamTimeout,
    UpstreamUnavailable,
    VtfuseError,
)
from serving.model.preprocess import DEFAULT_MAX_PIXELS, check_image_header
from serving.triton.client import TritonClient, map_triton_error

log = logging.getLogger(__name__)

Response = VqaResponse | MatchResponse | RetrieveResponse | EmbedResponse | CaptionResponse
NATIVE_IMAGE_OUTPUTS = (IMAGE_FEATURES, IMAGE_EMBEDDING)  # every output of the native image_encoder


@dataclass(frozen=True)
class RequestContext:
    """Per-request facts every stage needs."""

    request_id: str
    deadline: float  # time.monotonic() by which the response is due

    def left(self) -> float:
        """Seconds until the deadline."""
        return self.deadline - time.monotonic()


class Admission:
    """Admission control of one ingress replica: at most `limit` requests in flight, HTTP and gRPC together.

    While `draining` (graceful shutdown, see `Ingress.reconfigure`), every new request is
    refused with 503 and the ones in flight finish; `wait_idle` returns when none is left.
    "In flight" is counted from the front door: a request the front door received before
    `drain_since` (its `received_at` stamp) is still admitted, even when a busy replica
    reaches it only after the drain began.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.inflight = 0
        self.draining = False
        self.drain_since: float | None = None  # wall-clock seconds (time.time()) the drain began

    def enter(self, received_at: float | None = None) -> None:
        """Admit a request or refuse it at once.

        Args:
            received_at: wall-clock seconds the front door received the request (None: unknown,
                as for gRPC; then a draining replica refuses it).

        Raises:
            ShuttingDown: the replica is draining and the request came after the drain began (503 /
                UNAVAILABLE, Retry-After 1 s).
            Overloaded: `limit` requests are already in flight (429 / RESOURCE_EXHAUSTED, Retry-After 1 s).
        """
        if self.draining and not self._before_drain(received_at):
            raise ShuttingDown("this server is shutting down: retry, another instance will answer", retry_after=1.0)
        if self.inflight >= self.limit:
            raise Overloaded(
                f"{self.inflight} requests in flight on this replica (limits.max_inflight): retry later",
                retry_after=1.0,
            )
        self.inflight += 1

    def _before_drain(self, received_at: float | None) -> bool:
        return received_at is not None and self.drain_since is not None and received_at < self.drain_since

    def leave(self) -> None:
        """A request admitted by `enter` finished."""
        self.inflight -= 1

    async def wait_idle(self, timeout_s: float, poll_s: float = 0.05, settle_s: float = 0.5) -> bool:
        """Wait until no request has been in flight for `settle_s` (True) or `timeout_s` passed (False).

        The settle time lets a request the front door received before the drain, still on
        its way to this replica, arrive and be admitted before the replica is called idle.
        """
        deadline = time.monotonic() + timeout_s
        idle_since: float | None = None
        while time.monotonic() < deadline:
            now = time.monotonic()
            if self.inflight > 0:
                idle_since = None
            elif idle_since is None:
                idle_since = now
            elif now - idle_since >= settle_s:
                return True
            await asyncio.sleep(poll_s)
        return self.inflight == 0


TASK_OF = {VqaTask: "vqa", MatchTask: "match", RetrieveTask: "retrieve", EmbedTask: "embed", CaptionTask: "caption"}
_TASK_CODE: dict[str, Callable[..., Any]] = {}


def task_code(path: str) -> Callable[..., Any]:
    """A family's own task function from its `module:function` path (imported once, on first use)."""
    if path not in _TASK_CODE:
        module, _, name = path.partition(":")
        _TASK_CODE[path] = getattr(importlib.import_module(module), name)
    return _TASK_CODE[path]


def check_task(task: Task, rt: ModelRuntime) -> None:
    """Refuse a task the model does not have.

    Raises:
        TaskNotSupported: 422 naming the model's tasks.
    """
    name = TASK_OF[type(task)]
    if name not in rt.tasks:
        raise TaskNotSupported(
            f"model {rt.name!r} does not do {name}: its tasks are {', '.join(rt.tasks)}; "
            "pick a model that does with `model` (GET /v1/models lists them)"
        )


def vqa_answers(task: VqaTask, rt: ModelRuntime, logits: np.ndarray) -> list[VqaAnswer]:
    """Each question's best answer and top-k from its VQA logits, scored as the model's family says."""
    probs = rt.family.vqa_probabilities(logits)
    answers = []
    for q, row in zip(task.questions, probs):
        top = router.top_answers(row, list(rt.answers), task.top_k)
        answers.append(
            VqaAnswer(
                question=q, answer=top[0][0], score=top[0][1], top_k=[AnswerScore(answer=a, score=s) for a, s in top]
            )
        )
    return answers


def preprocess_error(e: BaseException) -> VtfuseError | None:
    """The API error of a failed preprocessing call (None: a bug, let it surface as a 500)."""
    if isinstance(e, VtfuseError):
        return e
    if isinstance(e, asyncio.TimeoutError):
        return UpstreamTimeout("preprocessing did not finish before the request deadline")
    if isinstance(e, BackPressureError):
        return Overloaded(f"preprocessing is saturated: retry later ({e.message})", retry_after=1.0)
    if isinstance(e, (DeploymentUnavailableError, RayActorError)):
        return UpstreamUnavailable(f"preprocessing is unavailable: retry shortly ({e})", retry_after=1.0)
    if isinstance(e, RayTaskError):
        cause = e.as_instanceof_cause() if hasattr(e, "as_instanceof_cause") else e
        if isinstance(cause, VtfuseError):
            return cause
    return None


class Pipeline:
    """Routes tasks to Triton through preprocessing; one per ingress replica."""

    def __init__(
        self,
        runtimes: dict[str, ModelRuntime],
        triton: TritonClient,
        preprocess: PreprocessFn,
        metrics: ApiMetrics,
        engine_max_batch: int = 64,
        preprocess_retries: int = 2,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        catalog: ImportedCatalog | None = None,
    ) -> None:
        self.catalog = catalog
        self.preprocess_retries = preprocess_retries
        self.max_pixels = max_pixels
        self.no_server_vqa: set[str] = set()  # models whose `vqa` Triton does not serve
        self.runtimes = runtimes
        self.triton = triton
        self.preprocess_fn = preprocess
        self.metrics = metrics
        self.engine_max_batch = engine_max_batch

    # -- building blocks ---------------------------------------------------------------

    async def preprocess(self, item: PreprocessItem, ctx: RequestContext) -> Tensors:
        """Decode and tokenize through the preprocessing deployment (or in-process), within the deadline.

        Preprocessing is idempotent: a call that a dying Preprocess replica dropped is sent
        again (Serve routes it to a live replica) up to `preprocess_retries` times.
        """
        t = time.perf_counter()
        attempt = 0
        while True:
            try:
                res = await asyncio.wait_for(self.preprocess_fn(item), timeout=max(0.001, ctx.left()))
                break
            except Exception as e:
                err = preprocess_error(e)
                if isinstance(e, RayActorError) and attempt < self.preprocess_retries and ctx.left() > 0.05:
                    attempt += 1
                    log.warning("a Preprocess replica dropped the call (%s): retrying", type(e).__name__)
                    await asyncio.sleep(0.05 * attempt)
                    continue
                if err is None:
                    raise
                raise err from None
        self.metrics.stage("preprocess", time.perf_counter() - t)
        return res.unwrap()

    async def infer(
        self,
        rt: ModelRuntime,
        role: str,
        inputs: Mapping[str, np.ndarray],
        outputs: tuple[str, ...],
        ctx: RequestContext,
    ) -> dict[str, np.ndarray]:
        """One logical engine call, split into requests of at most `engine_max_batch` rows (run concurrently).

        An imported engine whose max_batch_size is smaller (BLIP's image encoder, ViLT: 32) gets at most that.
        """
        engine = rt.engine(role)
        n = next(iter(inputs.values())).shape[0]
        wanted = outputs
        if role == "image_encoder":
            # Triton's response cache keys image_encoder's answers by the pixels alone, not by the outputs
            # asked for: always ask for all of them, so a cached answer has whatever the next caller needs.
            outputs = NATIVE_IMAGE_OUTPUTS if rt.record is None else await self._all_outputs(engine)
        parts = router.chunks(n, min(self.engine_max_batch, rt.max_batch(role) or self.engine_max_batch))

        async def one(sl: slice) -> dict[str, np.ndarray]:
            feed = {k: v[sl] for k, v in inputs.items()}
            t = time.perf_counter()
            out = await self.triton.infer(
                engine, feed, list(outputs), deadline=ctx.deadline, request_id=ctx.request_id, version=rt.version
            )
            self.metrics.triton_call(
                role,
                time.perf_counter() - t,
                sum(int(a.nbytes) for a in feed.values()),
                sum(int(a.nbytes) for a in out.values()),
            )
            return out

        results = await asyncio.gather(*(one(sl) for sl in parts))
        if len(results) == 1:
            return {o: results[0][o] for o in wanted}
        return {o: np.concatenate([r[o] for r in results]) for o in wanted}

    async def _all_outputs(self, engine: str) -> tuple[str, ...]:
        try:
            return await self.triton.model_outputs(engine)
        except Exception as e:  # unreachable, not served, ...: the error the call itself would get
            raise map_triton_error(e, engine) from None

    async def learn(self, name: str | None, listing: bool = False) -> None:
        """Before resolving `name` (or listing models): ask Triton's catalog about models this replica lacks."""
        if self.catalog is not None and (listing or (name and name not in self.runtimes)):
            await asyncio.to_thread(self.catalog.refresh, self.runtimes)

    def runtime(self, task: Task) -> ModelRuntime:
        """The served model a task names (already resolved by the ingress)."""
        return self.runtimes[task.model]

    def deadline(self, task: Task, started: float, limits: Limits) -> float:
        """When a task's response is due: generation (decoded token by token) gets `generation_timeout_s`."""
        rt = self.runtimes.get(task.model)
        own = rt is not None and rt.family.runs_own(TASK_OF[type(task)]) is not None
        return started + (limits.generation_timeout_s if own else limits.request_timeout_s)

    # -- tasks -------------------------------------------------------------------------

    async def run(self, task: Task, ctx: RequestContext) -> Response:
        """Execute any task.

        Raises:
            TaskNotSupported: the model lacks the task (422, the message lists its tasks).
        """
        rt = self.runtime(task)
        check_task(task, rt)
        code = rt.family.runs_own(TASK_OF[type(task)])
        if code is not None:  # the family's own task code (generation)
            return await task_code(code)(self, task, rt, ctx)
        if isinstance(task, VqaTask):
            return await self.vqa(task, ctx)
        if isinstance(task, MatchTask):
            return await self.match(task, ctx)
        if isinstance(task, RetrieveTask):
            return await self.retrieve(task, ctx)
        if isinstance(task, EmbedTask):
            return await self.embed(task, ctx)
        raise TaskNotSupported(f"model {rt.name!r} does not do caption: its tasks are {', '.join(rt.tasks)}")

    async def stream(self, task: CaptionTask, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
        """A streamed caption's events (`serving.app.generation.open_caption_stream`).

        Raises:
            TaskNotSupported: the model does not caption (422, its tasks listed).
        """
        from serving.app.generation import open_caption_stream

        rt = self.runtime(task)
        check_task(task, rt)
        return await open_caption_stream(self, task, rt, ctx)

    def server_side(self, task: VqaTask, rt: ModelRuntime) -> bool:
        """Whether a VQA task goes to Triton's `vqa` model whole (see `vqa_in_triton`)."""
        return (
            rt.record is None
            and rt.spec.vqa is not None
            and not rt.spec.version
            and rt.name not in self.no_server_vqa
            and len(task.questions) == 1
            and task.top_k == 1
            and not task.return_attention
        )

    async def vqa_in_triton(self, task: VqaTask, rt: ModelRuntime, ctx: RequestContext) -> VqaAnswer | None:
        """One question about one image as one call to Triton's `vqa` (BLS over the same engines).

        The encoded image goes to Triton as is and is decoded there, batched with every other
        caller's: no pixels or features cross between Ray and Triton, one gRPC call instead of
        three (measured in loadtests/README.md). The ingress checks the pixel limit from the
        header; a request Triton refuses (a corrupt image, a question over the token limit)
        returns None and takes the ingress path, whose decoding names the exact 4xx.
        """
        assert rt.spec.vqa is not None
        check_image_header(task.image, self.max_pixels)
        inputs = {
            "IMAGE": np.array([[task.image]], dtype=object),
            "QUESTION": np.array([[task.questions[0].encode()]], dtype=object),
        }
        t = time.perf_counter()
        try:
            out = await self.triton.infer(
                rt.spec.vqa, inputs, ["ANSWER", "SCORE"], deadline=ctx.deadline, request_id=ctx.request_id
            )
        except InvalidInput:
            return None
        except UpstreamUnavailable as e:
            if "does not serve" not in e.message:
                raise
            log.warning("Triton does not serve %s: model %s runs VQA from the ingress", rt.spec.vqa, rt.name)
            self.no_server_vqa.add(rt.name)
            return None
        raw = out["ANSWER"].reshape(-1)[0]
        answer = raw.decode() if isinstance(raw, bytes) else str(raw)
        sent = len(task.image) + len(task.questions[0])
        self.metrics.triton_call("vqa", time.perf_counter() - t, sent, len(answer) + 4)
        score = float(out["SCORE"].reshape(-1)[0])
        return VqaAnswer(
            question=task.questions[0], answer=answer, score=score, top_k=[AnswerScore(answer=answer, score=score)]
        )

    async def vqa(self, task: VqaTask, ctx: RequestContext) -> VqaResponse:
        """Image encoded once, questions once, fusion on one row per question.

        One question with top_k 1 and no attention goes to Triton's `vqa` whole where the
        model names one (`vqa_in_triton`).
        """
        rt = self.runtime(task)
        if rt.family.single_stream:
            return await self._vqa_single_stream(task, rt, ctx)
        if self.server_side(task, rt):
            answer = await self.vqa_in_triton(task, rt, ctx)
            if answer is not None:
                return VqaResponse(model=task.model, answers=[answer])
        plan = router.plan_vqa(len(task.questions), task.return_attention)
        pre = await self.preprocess(PreprocessItem(task.model, [task.image], task.questions, ctx.request_id), ctx)
        (img_call, txt_call), (fus_call,) = plan
        img, txt = await asyncio.gather(
            self.infer(rt, "image_encoder", {"PIXELS": pre.pixels}, img_call.outputs, ctx),
            self.infer(rt, "text_encoder", {"INPUT_IDS": pre.ids, "ATTENTION_MASK": pre.mask}, txt_call.outputs, ctx),
        )
        n = fus_call.rows
        fused = await self.infer(
            rt,
            "fusion",
            {
                "IMAGE_FEATURES": np.repeat(img[IMAGE_FEATURES], n, axis=0),
                "TEXT_FEATURES": txt[TEXT_FEATURES],
                "ATTENTION_MASK": pre.mask,
            },
            fus_call.outputs,
            ctx,
        )
        answers = vqa_answers(task, rt, fused[VQA_LOGITS])
        if task.return_attention:
            for i, a in enumerate(answers):
                a.attention = router.attention_grid(fused[CROSS_ATTENTION][i], rt.grid).round(5).tolist()
                a.tokens = router.token_list(rt.tokenizer, pre.ids[i], pre.mask[i])
        return VqaResponse(model=task.model, answers=answers)

    async def _texts_through_fusion(
        self,
        rt: ModelRuntime,
        image_features: np.ndarray,
        ids: np.ndarray,
        mask: np.ndarray,
        text_features: np.ndarray | None,
        ctx: RequestContext,
    ) -> np.ndarray:
        """ITM probabilities of texts (ids, mask) against image features, one fusion row per text.

        `image_features` has one row (repeated here) or one per text. The fusion takes the
        text features (native) or the token ids (BLIP re-embeds them), as the family says.
        """
        n = ids.shape[0]
        if image_features.shape[0] == 1 and n > 1 and rt.has("itm"):  # the features cross the wire once
            return await self._itm(rt, {"IMAGE_FEATURES": image_features, "INPUT_IDS": ids, "ATTENTION_MASK": mask},
                                   ctx)
        feats = image_features if image_features.shape[0] == n else np.repeat(image_features, n, axis=0)
        feed = {"IMAGE_FEATURES": feats}
        if rt.family.fusion_text_input == "ids":
            feed.update({"INPUT_IDS": ids, "ATTENTION_MASK": mask})
        else:
            assert text_features is not None
            feed.update({"TEXT_FEATURES": text_features, "ATTENTION_MASK": mask})
        fused = await self.infer(rt, "fusion", feed, (rt.family.itm_output,), ctx)
        return rt.family.itm_probability(fused)

    async def _itm(self, rt: ModelRuntime, inputs: dict[str, np.ndarray], ctx: RequestContext) -> np.ndarray:
        """ITM probabilities of N texts against one image through the model's `itm` BLS model (one Triton call)."""
        engine = rt.engine("itm")
        t = time.perf_counter()
        out = await self.triton.infer(engine, inputs, ["ITM_LOGITS"], deadline=ctx.deadline, request_id=ctx.request_id)
        self.metrics.triton_call("itm", time.perf_counter() - t, sum(int(a.nbytes) for a in inputs.values()),
                                 int(out["ITM_LOGITS"].nbytes))
        return rt.family.itm_probability(out)

    async def match(self, task: MatchTask, ctx: RequestContext) -> MatchResponse:
        """ITM probability of each text: image once, texts once (native), fusion per text.

        An imported BLIP with its `itm` model takes the pixels and the token ids in one call: the image's
        features stay inside Triton (no 1.8 MB of BLIP-base features per text on the wire).
        """
        rt = self.runtime(task)
        needs_features = rt.family.fusion_text_input == "features"
        pre = await self.preprocess(PreprocessItem(task.model, [task.image], task.texts, ctx.request_id), ctx)
        if rt.has("itm"):
            scores = await self._itm(rt, {"PIXELS": pre.pixels, "INPUT_IDS": pre.ids, "ATTENTION_MASK": pre.mask}, ctx)
            return MatchResponse(model=task.model, scores=[float(s) for s in scores])
        calls = [self.infer(rt, "image_encoder", {"PIXELS": pre.pixels}, (IMAGE_FEATURES,), ctx)]
        if needs_features:
            feed = {"INPUT_IDS": pre.ids, "ATTENTION_MASK": pre.mask}
            calls.append(self.infer(rt, "text_encoder", feed, (TEXT_FEATURES,), ctx))
        outs = await asyncio.gather(*calls)
        text_features = outs[1][TEXT_FEATURES] if needs_features else None
        scores = await self._texts_through_fusion(rt, outs[0][IMAGE_FEATURES], pre.ids, pre.mask, text_features, ctx)
        return MatchResponse(model=task.model, scores=[float(s) for s in scores])

    async def retrieve(self, task: RetrieveTask, ctx: RequestContext) -> RetrieveResponse:
        """Embedding shortlist of max(16, 4·top_k), then ITM re-rank of the shortlist only."""
        if task.image_form:
            return await self._retrieve_texts(task, ctx)
        return await self._retrieve_images(task, ctx)

    async def _retrieve_texts(self, task: RetrieveTask, ctx: RequestContext) -> RetrieveResponse:
        rt = self.runtime(task)
        texts = list(task.texts or [])
        plan = router.plan_retrieve_texts(len(texts), task.top_k, rt.family.fusion_text_input == "features",
                                          task.shortlist)
        k = router.shortlist_size(len(texts), task.top_k, task.shortlist)
        pre = await self.preprocess(PreprocessItem(task.model, [task.image or b""], texts, ctx.request_id), ctx)
        img_call, txt_call = plan[0]
        img, txt = await asyncio.gather(
            self.infer(rt, "image_encoder", {"PIXELS": pre.pixels}, img_call.outputs, ctx),
            self.infer(rt, "text_encoder", {"INPUT_IDS": pre.ids, "ATTENTION_MASK": pre.mask}, txt_call.outputs, ctx),
        )
        cand = router.shortlist(img[IMAGE_EMBEDDING][0], txt[TEXT_EMBEDDING], k)
        ids, mask = pre.ids[cand], pre.mask[cand]
        feats = None
        if TEXT_FEATURES in txt:
            feats = txt[TEXT_FEATURES][cand]
        elif len(plan) == 3:  # native: features for the shortlist only
            (again,) = plan[1]
            feats = (
                await self.infer(rt, "text_encoder", {"INPUT_IDS": ids, "ATTENTION_MASK": mask}, again.outputs, ctx)
            )[TEXT_FEATURES]
        probs = await self._texts_through_fusion(rt, img[IMAGE_FEATURES], ids, mask, feats, ctx)
        ranked = router.rank(cand, probs, task.top_k)
        return RetrieveResponse(
            model=task.model, results=[RetrieveResult(index=i, score=s, text=texts[i]) for i, s in ranked]
        )

    async def _retrieve_images(self, task: RetrieveTask, ctx: RequestContext) -> RetrieveResponse:
        rt = self.runtime(task)
        images = list(task.images or [])
        plan = router.plan_retrieve_images(len(images), task.top_k, rt.family.fusion_text_input == "features",
                                           task.shortlist)
        k = router.shortlist_size(len(images), task.top_k, task.shortlist)
        pre = await self.preprocess(PreprocessItem(task.model, images, [task.text or ""], ctx.request_id), ctx)
        img_call, txt_call = plan[0]
        img, txt = await asyncio.gather(
            self.infer(rt, "image_encoder", {"PIXELS": pre.pixels}, img_call.outputs, ctx),
            self.infer(rt, "text_encoder", {"INPUT_IDS": pre.ids, "ATTENTION_MASK": pre.mask}, txt_call.outputs, ctx),
        )
        cand = router.shortlist(txt[TEXT_EMBEDDING][0], img[IMAGE_EMBEDDING], k)
        feats = img[IMAGE_FEATURES][cand]  # the shortlist's features, as fetched with the embeddings
        text_features = np.repeat(txt[TEXT_FEATURES], k, axis=0) if TEXT_FEATURES in txt else None
        probs = await self._texts_through_fusion(
            rt, feats, np.repeat(pre.ids, k, axis=0), np.repeat(pre.mask, k, axis=0), text_features, ctx
        )
        ranked = router.rank(cand, probs, task.top_k)
        return RetrieveResponse(
            model=task.model, results=[RetrieveResult(index=i, score=s, text=None) for i, s in ranked]
        )

    async def _vqa_single_stream(self, task: VqaTask, rt: ModelRuntime, ctx: RequestContext) -> VqaResponse:
        """VQA on a single-stream model (ViLT): one engine over image and question together, one row per question.

        The image's patches enter the same transformer as each question's tokens, so nothing
        computed for one question can be reused for the next: N questions cost N full passes.
        """
        if task.return_attention:
            raise SchemaViolation(
                f"model {rt.name!r} is single-stream: it has no text-to-image attention grid; drop return_attention"
            )
        pre = await self.preprocess(PreprocessItem(task.model, [task.image], task.questions, ctx.request_id), ctx)
        n = len(task.questions)
        out = await self.infer(
            rt,
            "single_stream",
            {"PIXELS": np.repeat(pre.pixels, n, axis=0), "INPUT_IDS": pre.ids, "ATTENTION_MASK": pre.mask},
            (VQA_LOGITS,),
            ctx,
        )
        return VqaResponse(model=task.model, answers=vqa_answers(task, rt, out[VQA_LOGITS]))

    async def embed(self, task: EmbedTask, ctx: RequestContext) -> EmbedResponse:
        """Images only → image_encoder; texts only → text_encoder; both → both, concurrently."""
        rt = self.runtime(task)
        (stage,) = router.plan_embed(len(task.images), len(task.texts))
        pre = await self.preprocess(PreprocessItem(task.model, task.images, task.texts, ctx.request_id), ctx)
        calls = []
        for call in stage:
            if call.engine == "image_encoder":
                calls.append(self.infer(rt, "image_encoder", {"PIXELS": pre.pixels}, call.outputs, ctx))
            else:
                calls.append(
                    self.infer(
                        rt, "text_encoder", {"INPUT_IDS": pre.ids, "ATTENTION_MASK": pre.mask}, call.outputs, ctx
                    )
                )
        results: dict[str, np.ndarray] = {}
        for r in await asyncio.gather(*calls):
            results.update(r)
        return EmbedResponse(
            model=task.model,
            image_embeddings=results[IMAGE_EMBEDDING].astype(float).round(6).tolist()
            if IMAGE_EMBEDDING in results
            else [],
            text_embeddings=results[TEXT_EMBEDDING].astype(float).round(6).tolist()
            if TEXT_EMBEDDING in results
            else [],
        )

    async def ready(self, model: str, timeout_s: float = 2.0) -> dict[str, bool]:
        """Readiness of every Triton engine `model` routes to."""
        rt = self.runtimes[model]
        models = [(e, rt.version) for e in rt.engines()]
        if rt.record is None and rt.spec.vqa is not None and model not in self.no_server_vqa:
            models.append((rt.spec.vqa, ""))
        return await self.triton.models_ready(models, timeout_s)
