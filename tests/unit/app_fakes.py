"""Fakes for the app's unit tests: a checkpoint folder, a Triton that answers with the right shapes, a pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from serving.app.metrics import ApiMetrics
from serving.app.models import load_runtimes
from serving.app.pipeline import Pipeline
from serving.app.preprocess import InlinePreprocess, Preprocessor
from serving.app.settings import AppArgs, Limits, ModelSpec
from serving.model.model import FusionConfig
from serving.model.tokenizer import build_tokenizer
from serving.shapes.world import ANSWERS


def make_checkpoint(folder: Path, preset: str = "tiny") -> Path:
    """config.json + tokenizer.json + answers.json of a preset, as `export install` writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(FusionConfig.preset(preset).to_json())
    build_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "answers.json").write_text(json.dumps(list(ANSWERS)))
    return folder


def make_args(folder: Path, **kw) -> AppArgs:
    """AppArgs serving `tiny` from `folder` (a checkpoint made by make_checkpoint)."""
    limits = kw.pop("limits", Limits())
    return AppArgs(models={"tiny": ModelSpec(checkpoint=str(folder))}, limits=limits, **kw)


class FakeTriton:
    """Answers every engine with deterministic arrays of the engine's output shapes; records each call."""

    def __init__(self, cfg: FusionConfig, ready: bool = True) -> None:
        self.cfg = cfg
        self.ready = ready
        self.calls: list[tuple[str, int, tuple[str, ...], str]] = []
        self.error: Exception | None = None

    def _shape(self, name: str) -> tuple[int, ...]:
        c = self.cfg
        return {
            "IMAGE_FEATURES": (c.num_patches, c.dim),
            "IMAGE_EMBEDDING": (c.embed_dim,),
            "TEXT_FEATURES": (c.max_text_len, c.dim),
            "TEXT_EMBEDDING": (c.embed_dim,),
            "VQA_LOGITS": (c.num_answers,),
            "ITM_LOGIT": (1,),
            "CROSS_ATTENTION": (c.fusion_layers, c.max_text_len, c.num_patches),
        }[name]

    async def infer(self, model, inputs, outputs, *, deadline, request_id="", version=""):
        if self.error is not None:
            raise self.error
        n = next(iter(inputs.values())).shape[0]
        self.calls.append((model, n, tuple(outputs), request_id))
        out = {}
        for o in outputs:
            if o == "IMAGE_EMBEDDING":  # one-hot on the mean pixel so different images differ
                px = inputs["PIXELS"].reshape(n, -1).mean(axis=1)
                emb = np.zeros((n, self.cfg.embed_dim), np.float32)
                emb[np.arange(n), (px.astype(int) % self.cfg.embed_dim)] = 1
                out[o] = emb
            elif o == "ITM_LOGIT":  # higher for more tokens: a visible, deterministic order
                out[o] = inputs["ATTENTION_MASK"].sum(axis=1, keepdims=True).astype(np.float32) - 5
            else:
                out[o] = np.full((n, *self._shape(o)), 0.5, np.float32)
        return out

    async def models_ready(self, models, timeout_s=2.0):
        return {n: self.ready for n, _ in models}

    async def model_outputs(self, model, version=""):
        return ("IMAGE_FEATURES", "IMAGE_EMBEDDING") if "image_encoder" in model else ()

    async def close(self):
        return None


def make_pipeline(args: AppArgs, triton: FakeTriton | None = None) -> tuple[Pipeline, FakeTriton]:
    """A Pipeline with inline preprocessing over a fake Triton."""
    runtimes = load_runtimes(args)
    fake = triton
    if fake is None:
        cfg = runtimes[args.default_model].config
        assert cfg is not None, "FakeTriton answers with a native model's shapes: pass a Triton for an imported one"
        fake = FakeTriton(cfg)
    metrics = ApiMetrics()
    pre = InlinePreprocess(Preprocessor(runtimes, args.limits.max_pixels, metrics))
    return Pipeline(runtimes, fake, pre, metrics, args.engine_max_batch), fake  # type: ignore[arg-type]
