"""The BLIP captioning server people write first: FastAPI + `transformers` `generate()` per request, no vtfuse.

`POST /v1/caption` takes the JSON of vtfuse's `/v1/caption` (`image` base64, `prompt`, the
generation parameters; `model` is accepted and echoed back; `stream` must be false) and answers
in the same shape (`caption`, `token_ids`, `finish_reason`, `usage`, `request_id`), the way the
model card shows it: `processor(images=image, text=prompt)` → `model.generate(**inputs, **params)`
→ `processor.decode(ids, skip_special_tokens=True)`. fp32, eager PyTorch, one request per
`generate()` call, no batching across requests.

One process per core: each uvicorn worker loads its own copy of the model at startup
(`VTFUSE_CAPTION_CHECKPOINT`: a `save_pretrained` folder) with `VTFUSE_CAPTION_THREADS` torch
threads (default 1) and runs one `generate()` at a time (the others wait on a lock), so two
workers use the two cores without fighting over them. The `x-worker-pid` header says which
worker answered (a benchmark checks that its connections reached both).

    python -m loadtests.baseline.caption_app --checkpoint build/blip-caption-base-random --port 8092 [--workers 2]
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import os
import sys
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Response
from pydantic import BaseModel, ConfigDict

STATE: dict[str, Any] = {}
LOCK = threading.Lock()  # one generate() at a time per worker process: a process per core
GENERATION_FIELDS = ("max_new_tokens", "min_new_tokens", "num_beams", "do_sample", "temperature", "top_k", "top_p",
                     "repetition_penalty", "no_repeat_ngram_size", "length_penalty")


def _load() -> None:
    import torch
    from transformers import BlipForConditionalGeneration, BlipProcessor

    torch.set_num_threads(int(os.environ.get("VTFUSE_CAPTION_THREADS", "1")))
    folder = os.environ["VTFUSE_CAPTION_CHECKPOINT"]
    model = BlipForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    STATE["model"] = model
    STATE["processor"] = BlipProcessor.from_pretrained(folder)
    STATE["eos"] = int(model.config.text_config.sep_token_id)
    STATE["name"] = os.environ.get("VTFUSE_CAPTION_NAME", "blip")


@asynccontextmanager
async def _lifespan(_app: FastAPI) -> AsyncIterator[None]:
    _load()  # before the worker accepts connections: /healthz answers once the model is in memory
    yield


app = FastAPI(title="naive BLIP captioning", lifespan=_lifespan)


class CaptionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str
    model: str | None = None
    prompt: str | None = None
    stream: bool = False
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    num_beams: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    length_penalty: float | None = None
    seed: int | None = None


@app.get("/healthz")
def healthz() -> dict[str, object]:
    return {"status": "ok", "pid": os.getpid()}  # which worker answered: a benchmark waits for every one


def generate(image: Any, prompt: str | None, params: dict[str, Any], seed: int | None = None) -> list[int]:
    """`model.generate(**processor(images=image, text=prompt), **params)[0]` as a list of token ids."""
    import torch

    model, processor = STATE["model"], STATE["processor"]
    with LOCK, torch.inference_mode():
        enc = processor(images=image, text=prompt, return_tensors="pt") if prompt else processor(
            images=image, return_tensors="pt")
        if seed is not None:
            torch.manual_seed(seed)
        return [int(t) for t in model.generate(**enc, **params)[0]]


@app.post("/v1/caption")
def caption(req: CaptionIn, response: Response) -> dict[str, object]:
    from PIL import Image, UnidentifiedImageError

    if req.stream:
        raise HTTPException(422, "stream: this server answers whole captions only")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(req.image))).convert("RGB")
    except (binascii.Error, UnidentifiedImageError, OSError) as e:
        raise HTTPException(422, f"image: {e}") from e
    params = {k: getattr(req, k) for k in GENERATION_FIELDS if getattr(req, k) is not None}
    ids = generate(image, req.prompt, params, req.seed)
    prompt_tokens = 1 + (len(STATE["processor"].tokenizer(req.prompt)["input_ids"]) - 2 if req.prompt else 0)
    response.headers["x-worker-pid"] = str(os.getpid())
    return {
        "model": req.model or STATE["name"],
        "caption": STATE["processor"].decode(ids, skip_special_tokens=True),
        "token_ids": ids,
        "finish_reason": "stop" if ids[-1] == STATE["eos"] else "length",
        "usage": {"prompt_tokens": prompt_tokens, "generated_tokens": len(ids) - prompt_tokens},
        "request_id": uuid.uuid4().hex,
    }


def main(argv: list[str] | None = None) -> int:
    from loadtests.baseline.workers import BALANCES, run

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a BlipForConditionalGeneration save_pretrained folder")
    p.add_argument("--name", default="blip", help="model name echoed when a request names none")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8092)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: one per core)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--balance", choices=BALANCES, default="reuseport",
                   help="reuseport: a socket per worker, the kernel spreads connections; shared: uvicorn's workers")
    args = p.parse_args(argv)
    os.environ["VTFUSE_CAPTION_CHECKPOINT"] = str(args.checkpoint)
    os.environ["VTFUSE_CAPTION_THREADS"] = str(args.threads)
    os.environ["VTFUSE_CAPTION_NAME"] = args.name
    return run("loadtests.baseline.caption_app:app", args.host, args.port, args.workers, args.balance)


if __name__ == "__main__":
    sys.exit(main())
