"""The server people write first: FastAPI + PyTorch eager, one request per forward pass.

Same model and same preprocessing as the served stack (`serving.model.preprocess`), the same
JSON API shape, no batching across requests, no ONNX, no Triton. Each uvicorn
worker loads its own copy of the model; `VTFUSE_BASELINE_CHECKPOINT` picks it (`tiny`,
`small`, `base`, `random:<preset>` or a folder) and `VTFUSE_BASELINE_THREADS` the torch threads per worker
(default 1: one worker per core, so workers do not fight over cores).

`VTFUSE_BASELINE_PRECISION=int8` serves PyTorch's own dynamic int8 quantisation of the model
(`torch.ao.quantization.quantize_dynamic` on every `nn.Linear`: int8 weights, activations
quantised per batch), what a user tries first; the benchmark compares it with the int8 engines,
and the default `fp32` with fp32 engines.
"""

from __future__ import annotations

import base64
import os

import numpy as np
import torch
import torch.nn.functional as F
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from serving.errors import VtfuseError
from serving.model.checkpoint import random_checkpoint, resolve_checkpoint
from serving.model.preprocess import decode_image, tokenize

torch.set_num_threads(int(os.environ.get("VTFUSE_BASELINE_THREADS", "1")))
_SOURCE = os.environ.get("VTFUSE_BASELINE_CHECKPOINT", "tiny")
CKPT = random_checkpoint(_SOURCE[7:]) if _SOURCE.startswith("random:") else resolve_checkpoint(_SOURCE)
MODEL, CFG = CKPT.model.eval(), CKPT.config
PRECISION = os.environ.get("VTFUSE_BASELINE_PRECISION", "fp32")
if PRECISION == "int8":
    MODEL = torch.ao.quantization.quantize_dynamic(MODEL, {torch.nn.Linear}, dtype=torch.qint8)
elif PRECISION != "fp32":
    raise SystemExit(f"VTFUSE_BASELINE_PRECISION={PRECISION!r}: use fp32 or int8")
NAME = os.environ.get("VTFUSE_BASELINE_NAME", CFG.name)

app = FastAPI(title="naive baseline")


class VqaIn(BaseModel):
    image: str
    questions: list[str]
    top_k: int = 1


class TextsIn(BaseModel):
    image: str
    texts: list[str]
    top_k: int = 5


class EmbedIn(BaseModel):
    images: list[str] = []
    texts: list[str] = []


def _pixels(b64: str) -> torch.Tensor:
    try:
        return torch.from_numpy(decode_image(base64.b64decode(b64), CFG.image_size)).unsqueeze(0)
    except VtfuseError as e:
        raise HTTPException(e.http_status, e.message) from e


def _tokens(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        ids, mask = tokenize(CKPT.tokenizer, texts, CFG.max_text_len)
    except VtfuseError as e:
        raise HTTPException(e.http_status, e.message) from e
    return torch.from_numpy(ids), torch.from_numpy(mask)


@torch.inference_mode()
def _fuse(pixels: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward pass for this request: image tower once, every text, fusion."""
    ids, mask = _tokens(texts)
    feats, img_emb = MODEL.encode_image(pixels)
    tfeats, txt_emb = MODEL.encode_text(ids, mask)
    logits, itm, _ = MODEL.fuse(feats.expand(len(texts), -1, -1), tfeats, mask)
    return logits, itm[:, 0], (txt_emb @ img_emb[0])


@app.get("/healthz")
def healthz() -> dict[str, object]:
    return {"status": "ok", "precision": PRECISION, "pid": os.getpid()}  # which worker: a benchmark waits for all


@app.post("/v1/vqa")
def vqa(req: VqaIn) -> dict[str, object]:
    logits, _, _ = _fuse(_pixels(req.image), req.questions)
    probs = F.softmax(logits.double(), dim=-1).numpy()
    answers = []
    for q, p in zip(req.questions, probs):
        top = np.argsort(-p)[: max(1, req.top_k)]
        answers.append(
            {
                "question": q,
                "answer": CKPT.answers[top[0]],
                "score": float(p[top[0]]),
                "top_k": [{"answer": CKPT.answers[i], "score": float(p[i])} for i in top],
            }
        )
    return {"model": NAME, "answers": answers}


@app.post("/v1/match")
def match(req: TextsIn) -> dict[str, object]:
    _, itm, _ = _fuse(_pixels(req.image), req.texts)
    return {"model": NAME, "scores": torch.sigmoid(itm).tolist()}


@app.post("/v1/retrieve")
def retrieve(req: TextsIn) -> dict[str, object]:
    """Every caption through fusion (no shortlist: the obvious first version)."""
    _, itm, _ = _fuse(_pixels(req.image), req.texts)
    scores = torch.sigmoid(itm)
    order = torch.argsort(scores, descending=True)[: req.top_k].tolist()
    return {"model": NAME, "results": [{"index": i, "score": float(scores[i]), "text": req.texts[i]} for i in order]}


@app.post("/v1/embed")
@torch.inference_mode()
def embed(req: EmbedIn) -> dict[str, object]:
    out: dict[str, object] = {"model": NAME}
    if req.images:
        out["image_embeddings"] = [MODEL.encode_image(_pixels(b))[1][0].tolist() for b in req.images]
    if req.texts:
        out["text_embeddings"] = MODEL.encode_text(*_tokens(req.texts))[1].tolist()
    return out
