"""Asyncio gRPC load driver for Triton direct: closed loop at a fixed concurrency or open loop at a Poisson rate.

Targets:

- `vqa`: one encoded image (PNG/JPEG from the shapes renderer, varied sizes) + one question per
  request to the `vqa` model; decoding and tokenizing happen inside Triton.
- `engines`: what an API layer does: the client decodes and tokenizes (done once per corpus
  sample, outside the timed path), sends uint8 pixels to `image_encoder` and token ids to
  `text_encoder` concurrently, then both features to `fusion`: three round trips.
- `ensemble`: the same tensors in one round trip to `vqa_tensors` (the `torch` target's Triton
  ensemble of the three engines; the features stay inside the server, on the GPU when it has one).

Usage:

    python -m loadtests.grpc_driver --url 127.0.0.1:8001 --concurrency 32 --duration 20 --out run.json
    python -m loadtests.grpc_driver --url 127.0.0.1:8001 --rate 200 --duration 20 --metrics-url http://127.0.0.1:8002/metrics

The JSON has throughput, p50/p90/p99 latency, error counts and, with `--metrics-url`, the
engines' batch counts (`nv_inference_count`, `nv_inference_exec_count`) over the run.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import re
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from loadtests.common import RunResult, Sample, make_corpus, write_json
from loadtests.loops import closed_loop, open_loop

ENGINE_MODELS = ("image_encoder", "text_encoder", "fusion")
MODELS = ("vqa", *ENGINE_MODELS, "preprocess")
TARGETS = ("vqa", "engines", "ensemble")
# Each pool entry its own TCP connection (gRPC shares subchannels across equal channels otherwise).
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 256 << 20),
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.use_local_subchannel_pool", 1),
]


def classify(exc: BaseException) -> str:
    """`grpc_UNAVAILABLE`-style kinds for Triton errors, else the exception class."""
    if isinstance(exc, InferenceServerException):
        return "grpc_" + str(exc.status() or "unknown").rsplit(".", 1)[-1]
    return type(exc).__name__


def _bytes_input(name: str, value: bytes) -> InferInput:
    t = InferInput(name, [1, 1], "BYTES")
    t.set_data_from_numpy(np.array([[value]], dtype=object))
    return t


def _tensor_input(name: str, array: np.ndarray) -> InferInput:
    dtype = {"uint8": "UINT8", "int64": "INT64", "float32": "FP32"}[str(array.dtype)]
    t = InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


class TritonTarget:
    """Prepared requests for one target over a pool of gRPC channels (round-robin)."""

    def __init__(
        self,
        url: str,
        corpus: list[Sample],
        target: str = "vqa",
        pool_size: int = 1,
        repository: Path | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
        self.target = target
        self.timeout_s = timeout_s
        self.clients = [grpcaio.InferenceServerClient(url, channel_args=CHANNEL_ARGS) for _ in range(pool_size)]
        self._rr = itertools.cycle(self.clients)
        if target == "vqa":
            self.prepared: list[Any] = [
                [_bytes_input("IMAGE", s.image), _bytes_input("QUESTION", s.question.encode())] for s in corpus
            ]
            self.outputs = [InferRequestedOutput("ANSWER"), InferRequestedOutput("SCORE")]
        else:
            self.prepared = engine_inputs(corpus, repository)

    async def call(self, i: int) -> int:
        """Send request `i` (cycling over the corpus); returns the items it carried (1)."""
        client = next(self._rr)
        p = self.prepared[i % len(self.prepared)]
        if self.target == "vqa":
            await client.infer("vqa", p, outputs=self.outputs, client_timeout=self.timeout_s)
            return 1
        pixels, ids, mask = p
        if self.target == "ensemble":
            await client.infer(
                "vqa_tensors",
                [_tensor_input("PIXELS", pixels), _tensor_input("INPUT_IDS", ids),
                 _tensor_input("ATTENTION_MASK", mask)],
                outputs=[InferRequestedOutput("VQA_LOGITS")],
                client_timeout=self.timeout_s,
            )
            return 1
        img, txt = await asyncio.gather(
            client.infer("image_encoder", [_tensor_input("PIXELS", pixels)],
                         outputs=[InferRequestedOutput("IMAGE_FEATURES")], client_timeout=self.timeout_s),
            client.infer("text_encoder", [_tensor_input("INPUT_IDS", ids), _tensor_input("ATTENTION_MASK", mask)],
                         outputs=[InferRequestedOutput("TEXT_FEATURES")], client_timeout=self.timeout_s),
        )
        await client.infer(
            "fusion",
            [
                _tensor_input("IMAGE_FEATURES", img.as_numpy("IMAGE_FEATURES")),
                _tensor_input("TEXT_FEATURES", txt.as_numpy("TEXT_FEATURES")),
                _tensor_input("ATTENTION_MASK", mask),
            ],
            outputs=[InferRequestedOutput("VQA_LOGITS")],
            client_timeout=self.timeout_s,
        )
        return 1

    async def close(self) -> None:
        """Close every channel."""
        for c in self.clients:
            await c.close()


def engine_inputs(corpus: list[Sample], repository: Path | None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Client-side preprocessing with the checkpoint installed in `repository` (as the API layer does)."""
    from serving.model.config import FusionConfig
    from serving.model.preprocess import decode_image, load_tokenizer, tokenize

    if repository is None:
        raise ValueError("the engines target needs --repository (for the preset's image size and tokenizer)")
    ckpt = Path(repository) / "fusion" / "1" / "checkpoint"
    cfg = FusionConfig.from_json(ckpt / "config.json")
    tok = load_tokenizer(ckpt / "tokenizer.json")
    out = []
    for s in corpus:
        ids, mask = tokenize(tok, [s.question], cfg.max_text_len)
        out.append((decode_image(s.image, cfg.image_size)[None], ids, mask))
    return out


def scrape(url: str) -> str:
    """GET a Prometheus text endpoint."""
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


_LINE = re.compile(
    r'^(nv_inference_count|nv_inference_exec_count|nv_inference_request_success|nv_cache_num_hits_per_model)'
    r'\{([^}]*)\}\s+(\S+)$'
)


def batch_counts(text: str) -> dict[str, dict[str, float]]:
    """{model: {metric: value}} for Triton's per-model request, item, execution and response-cache hit counters."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        model = labels.get("model", "?")
        out.setdefault(model, {}).setdefault(m.group(1), 0.0)
        out[model][m.group(1)] += float(m.group(3))
    return out


def batch_delta(before: str, after: str) -> dict[str, Any]:
    """Items, executions and average batch per model between two scrapes, and over the three engines."""
    b, a = batch_counts(before), batch_counts(after)
    per_model: dict[str, dict[str, Any]] = {}
    for model in sorted(a):
        d = {k: a[model].get(k, 0.0) - b.get(model, {}).get(k, 0.0) for k in a[model]}
        items, execs = d.get("nv_inference_count", 0.0), d.get("nv_inference_exec_count", 0.0)
        avg = items / execs if execs else None
        per_model[model] = {"inference_count": items, "exec_count": execs, "avg_batch": avg,
                            "cache_hits": d.get("nv_cache_num_hits_per_model", 0.0)}  # answered without running
    engines = [per_model[m] for m in ENGINE_MODELS if m in per_model]
    items = float(sum(m["inference_count"] for m in engines))
    execs = float(sum(m["exec_count"] for m in engines))
    return {"models": per_model, "engines_avg_batch": items / execs if execs else None}


async def drive(
    url: str,
    corpus: list[Sample],
    *,
    target: str = "vqa",
    concurrency: int = 32,
    rate: float = 0.0,
    duration_s: float = 20.0,
    warmup_s: float = 3.0,
    pool_size: int = 1,
    repository: Path | None = None,
    metrics_url: str | None = None,
    name: str = "triton-grpc",
) -> RunResult:
    """One run against Triton: closed loop at `concurrency`, or open loop when `rate` > 0."""
    t = TritonTarget(url, corpus, target, pool_size, repository)
    try:
        await asyncio.gather(*(t.call(i) for i in range(min(4, len(corpus)))))  # connect before timing
        before = scrape(metrics_url) if metrics_url else ""
        cpu0 = time.process_time()
        if rate > 0:
            res = await open_loop(t.call, rate, duration_s, warmup_s, name=name, classify=classify)
        else:
            res = await closed_loop(t.call, concurrency, duration_s, warmup_s, name=name, classify=classify)
        res.extra["client_cpu_s"] = round(time.process_time() - cpu0, 2)  # the load generator's own CPU
        if metrics_url:
            res.extra["triton_batches"] = batch_delta(before, scrape(metrics_url))
    finally:
        await t.close()
    res.extra.update({"target": target, "pool_size": pool_size, "url": url})
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC host:port")
    p.add_argument("--target", choices=TARGETS, default="vqa")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop workers")
    p.add_argument("--rate", type=float, default=0.0, help="open loop: Poisson arrivals per second (overrides closed)")
    p.add_argument("--duration", type=float, default=20.0, help="measurement window, seconds")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before the window opens")
    p.add_argument("--pool-size", type=int, default=1, help="gRPC channels, used round-robin")
    p.add_argument("--samples", type=int, default=64, help="distinct rendered requests")
    p.add_argument("--repository", type=Path, help="model repository (engines target: preset and tokenizer)")
    p.add_argument("--metrics-url", help="Triton metrics URL, for the engines' average batch")
    p.add_argument("--name", default="triton-grpc")
    p.add_argument("--out", type=Path, help="write the JSON here (default: stdout only)")
    args = p.parse_args(argv)
    corpus = make_corpus(args.samples)
    res = asyncio.run(
        drive(
            args.url, corpus, target=args.target, concurrency=args.concurrency, rate=args.rate,
            duration_s=args.duration, warmup_s=args.warmup, pool_size=args.pool_size, repository=args.repository,
            metrics_url=args.metrics_url, name=args.name,
        )
    )
    d = res.to_dict()
    if args.out:
        write_json(args.out, d)
    brief = {k: v for k, v in d.items() if k != "latencies_ms"}
    import json

    json.dump(brief, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    return 0 if res.completed else 1


if __name__ == "__main__":
    sys.exit(main())
