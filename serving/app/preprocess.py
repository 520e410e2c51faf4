"""Preprocessing on Ray Serve: decode + resize images, tokenize texts, batched with @serve.batch.

`Preprocessor.run_batch` is the pure part (numpy in and out, serving.model.preprocess
underneath): texts of all requests in a batch go through the tokenizer in one call, and
a bad image or text fails only its own request. `PreprocessDeployment` wraps it with
`@serve.batch` as its own deployment, so decoding can scale apart from the ingress;
`InlinePreprocess` runs it in the ingress process instead (one hop less).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from ray import serve

from serving.app.catalog import ImportedCatalog
from serving.app.metrics import ApiMetrics
from serving.app.models import ModelRuntime, load_runtimes, runtime_from_record
from serving.app.settings import AppArgs
from serving.errors import SchemaViolation, UnknownModel, VtfuseError

log = logging.getLogger(__name__)


@dataclass
class PreprocessItem:
    """One API request's raw inputs."""

    model: str
    images: list[bytes] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    request_id: str = "-"


@dataclass(frozen=True)
class Tensors:
    """Engine-ready tensors of one request."""

    pixels: np.ndarray  # (n_images, S, S, 3) uint8
    ids: np.ndarray  # (n_texts, L) int64
    mask: np.ndarray  # (n_texts, L) int64


@dataclass
class Preprocessed:
    """Engine-ready tensors for one request, or the error that request gets."""

    pixels: np.ndarray | None = None  # (n_images, S, S, 3) uint8
    ids: np.ndarray | None = None  # (n_texts, L) int64
    mask: np.ndarray | None = None  # (n_texts, L) int64
    error: VtfuseError | None = None
    decode_s: float = 0.0
    tokenize_s: float = 0.0

    def unwrap(self) -> Tensors:
        """The request's tensors, or raise its error."""
        if self.error is not None:
            raise self.error
        if self.pixels is None or self.ids is None or self.mask is None:
            raise VtfuseError("preprocessing returned no tensors")
        return Tensors(self.pixels, self.ids, self.mask)


class Preprocessor:
    """Decode/tokenize for every served model; no Ray needed (unit-testable)."""

    def __init__(
        self,
        runtimes: dict[str, ModelRuntime],
        max_pixels: int,
        metrics: ApiMetrics | None = None,
        catalog: ImportedCatalog | None = None,
    ) -> None:
        self.catalog = catalog  # a replica apart from the ingress learns imported models itself
        self.runtimes = runtimes
        self.max_pixels = max_pixels
        self.metrics = metrics

    def _decode(self, item: PreprocessItem, rt: ModelRuntime) -> np.ndarray:
        if not item.images:
            s = rt.image_size
            return np.zeros((0, s, s, 3), dtype=np.uint8)
        return np.stack([rt.decode(b, self.max_pixels) for b in item.images])

    def _tokenize_one(self, item: PreprocessItem, rt: ModelRuntime) -> tuple[np.ndarray, np.ndarray]:
        return rt.tokenize(item.texts)

    def run_batch(self, items: list[PreprocessItem]) -> list[Preprocessed]:
        """Preprocess a batch of requests; each gets its tensors or its own error, never the batch's."""
        out = [Preprocessed() for _ in items]
        if self.metrics is not None:
            self.metrics.batch(len(items))
        if self.catalog is not None and any(i.model not in self.runtimes for i in items):
            self.catalog.refresh(self.runtimes)
        runtimes: list[ModelRuntime | None] = []
        for item, res in zip(items, out):
            rt = self.runtimes.get(item.model)
            if rt is None:
                res.error = UnknownModel(f"model {item.model!r} is not served: use one of {sorted(self.runtimes)}")
            runtimes.append(rt)
        # Images: one decode each (Pillow releases the GIL while decoding).
        t0 = time.perf_counter()
        for item, res, rt in zip(items, out, runtimes):
            if rt is None or res.error is not None:
                continue
            t = time.perf_counter()
            try:
                res.pixels = self._decode(item, rt)
            except VtfuseError as e:
                res.error = e
            res.decode_s = time.perf_counter() - t
        decode_s = time.perf_counter() - t0
        # Texts: one tokenizer call per model over every request of the batch.
        t0 = time.perf_counter()
        for name in {i.model for i in items}:
            idx = [k for k, it in enumerate(items) if it.model == name and out[k].error is None]
            rt = self.runtimes.get(name)
            if not idx or rt is None:
                continue
            self._tokenize_group([items[k] for k in idx], [out[k] for k in idx], rt)
        tokenize_s = time.perf_counter() - t0
        for res in out:
            res.tokenize_s = tokenize_s / max(1, len(items))
        if self.metrics is not None:
            self.metrics.stage("decode", decode_s)
            self.metrics.stage("tokenize", tokenize_s)
        bad = [(it.request_id, r.error.code) for it, r in zip(items, out) if r.error is not None]
        if bad:
            log.info("preprocess batch of %d: refused %s", len(items), bad)
        return out

    def _tokenize_group(self, items: list[PreprocessItem], results: list[Preprocessed], rt: ModelRuntime) -> None:
        texts = [t for it in items for t in it.texts]
        try:
            ids, mask = rt.tokenize(texts)
        except SchemaViolation:  # some request has a bad text: tokenize each alone to blame only it
            for it, res in zip(items, results):
                try:
                    res.ids, res.mask = self._tokenize_one(it, rt)
                except VtfuseError as e:
                    res.error = e
            return
        start = 0
        for it, res in zip(items, results):
            n = len(it.texts)
            res.ids, res.mask = ids[start : start + n], mask[start : start + n]
            start += n


def imported_catalog(args: AppArgs) -> ImportedCatalog:
    """The catalog of imported models as Triton serves them, over the app's Triton settings."""
    return ImportedCatalog(args.triton_settings(), runtime_from_record)


class PreprocessFn(Protocol):
    """What the ingress awaits for preprocessing: a Serve handle or an in-process preprocessor."""

    async def __call__(self, item: PreprocessItem) -> Preprocessed: ...


class InlinePreprocess(PreprocessFn):
    """Preprocess in the ingress process, in a worker thread so the event loop keeps serving."""

    def __init__(self, pre: Preprocessor) -> None:
        self.pre = pre

    async def __call__(self, item: PreprocessItem) -> Preprocessed:
        return (await asyncio.to_thread(self.pre.run_batch, [item]))[0]


class HandlePreprocess(PreprocessFn):
    """Preprocess in the `Preprocess` deployment through a Serve handle."""

    def __init__(self, handle: serve.handle.DeploymentHandle) -> None:
        self.handle = handle

    async def __call__(self, item: PreprocessItem) -> Preprocessed:
        return await self.handle.remote(item)


@serve.deployment(name="Preprocess", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25})
class PreprocessDeployment:
    """Batched decode + tokenize as its own deployment (replicas and CPUs set in the Serve config)."""

    def __init__(self, args: AppArgs) -> None:
        from serving.app.logs import configure_logging

        configure_logging(args.log_level)
        self.metrics = ApiMetrics()
        catalog = imported_catalog(args) if args.triton_catalog else None
        self.pre = Preprocessor(load_runtimes(args), args.limits.max_pixels, self.metrics, catalog)
        self.batch.set_max_batch_size(args.preprocess_max_batch_size)  # type: ignore[attr-defined]
        self.batch.set_batch_wait_timeout_s(args.preprocess_batch_wait_s)  # type: ignore[attr-defined]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def batch(self, items: list[PreprocessItem]) -> list[Preprocessed]:
        """One @serve.batch call: the CPU work runs in a thread so the replica keeps filling the next batch."""
        return await asyncio.to_thread(self.pre.run_batch, items)

    async def __call__(self, item: PreprocessItem) -> Preprocessed:
        return await self.batch(item)
