"""The BLIP retrieval server people write first: FastAPI + `transformers` `BlipForImageTextRetrieval`, no vtfuse.

`POST /v1/retrieve` takes the JSON of vtfuse's `/v1/retrieve` (`image` base64, `texts`, `top_k`;
`model` is accepted and echoed back) and scores every caption with the ITM head, the way the
model card shows it: `processor(images=[image] * len(texts), text=texts, padding=True)` →
`model(..., use_itm_head=True)`, softmax index 1, sort. The image tower therefore runs once per
caption, and there is no shortlist. fp32, eager PyTorch, one forward pass per request.

Each uvicorn worker loads its own copy of the model at startup (`VTFUSE_BLIP_CHECKPOINT`: a
`save_pretrained` folder) with `VTFUSE_BLIP_THREADS` torch threads (default 1: one worker per
core, so workers do not fight over cores).

    python -m loadtests.baseline.blip_app --checkpoint build/blip-base-random --port 8091 [--workers 2]
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

STATE: dict[str, Any] = {}


def _load() -> None:
    import torch
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    threads = int(os.environ.get("VTFUSE_BLIP_THREADS", "1"))
    torch.set_num_threads(threads)
    folder = os.environ["VTFUSE_BLIP_CHECKPOINT"]
    STATE["model"] = BlipForImageTextRetrieval.from_pretrained(folder, dtype=torch.float32).eval()
    STATE["processor"] = BlipProcessor.from_pretrained(folder)
    STATE["name"] = os.environ.get("VTFUSE_BLIP_NAME", "blip")


@asynccontextmanager
async def _lifespan(_app: FastAPI) -> AsyncIterator[None]:
    _load()  # before the worker accepts connections: /healthz answers once the model is in memory
    yield


app = FastAPI(title="naive BLIP retrieval", lifespan=_lifespan)


class RetrieveIn(BaseModel):
    image: str
    texts: list[str]
    top_k: int = 5
    model: str | None = None


@app.get("/healthz")
def healthz() -> dict[str, object]:
    return {"status": "ok", "pid": os.getpid()}  # which worker answered: a benchmark waits for every one


def itm_probabilities(image: Any, texts: list[str]) -> list[float]:
    """ITM probability of every text against `image` (a PIL image), one (image, text) pair per row."""
    import torch

    model, processor = STATE["model"], STATE["processor"]
    with torch.inference_mode():
        enc = processor(images=[image] * len(texts), text=texts, padding=True, return_tensors="pt")
        itm = model(**enc, use_itm_head=True).itm_score  # (N, 2)
        return torch.softmax(itm, dim=-1)[:, 1].tolist()


@app.post("/v1/retrieve")
def retrieve(req: RetrieveIn) -> dict[str, object]:
    from PIL import Image, UnidentifiedImageError

    if not req.texts:
        raise HTTPException(422, "texts is empty")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(req.image))).convert("RGB")
    except (binascii.Error, UnidentifiedImageError, OSError) as e:
        raise HTTPException(422, f"image: {e}") from e
    scores = itm_probabilities(image, req.texts)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[: max(1, req.top_k)]
    return {
        "model": req.model or STATE["name"],
        "results": [{"index": i, "score": float(scores[i]), "text": req.texts[i]} for i in order],
    }


def main(argv: list[str] | None = None) -> int:
    from loadtests.baseline.workers import BALANCES, run

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a BlipForImageTextRetrieval save_pretrained folder")
    p.add_argument("--name", default="blip", help="model name echoed when a request names none")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8091)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: one per core)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--balance", choices=BALANCES, default="reuseport",
                   help="reuseport: a socket per worker, the kernel spreads connections; shared: uvicorn's workers")
    args = p.parse_args(argv)
    os.environ["VTFUSE_BLIP_CHECKPOINT"] = str(args.checkpoint)
    os.environ["VTFUSE_BLIP_THREADS"] = str(args.threads)
    os.environ["VTFUSE_BLIP_NAME"] = args.name
    return run("loadtests.baseline.blip_app:app", args.host, args.port, args.workers, args.balance)


if __name__ == "__main__":
    sys.exit(main())
