"""Asyncio HTTP load driver for the public JSON API (Ray Serve, or the naive baseline, which speaks the same).

Bodies are built once per corpus sample (base64 images in JSON), so the timed path
is the HTTP exchange alone. Kinds: `vqa` (one image, one question: one item), `retrieve64`
(one image × 64 captions, `top_k` 5), `match` (one image × 8 captions), `embed` (one image).

    python -m loadtests.http_driver --url http://127.0.0.1:8080 --kind vqa --concurrency 32 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp

from loadtests.common import RunResult, Sample, make_corpus, many_captions, write_json
from loadtests.loops import closed_loop, open_loop

KINDS = ("vqa", "retrieve64", "match", "embed")


class HttpStatusError(Exception):
    """A non-2xx answer."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status


def classify(exc: BaseException) -> str:
    """`http_429`-style kinds for HTTP errors, else the exception class."""
    if isinstance(exc, HttpStatusError):
        return f"http_{exc.status}"
    return type(exc).__name__


def bodies(corpus: list[Sample], kind: str, model: str | None = None) -> tuple[str, list[bytes], int]:
    """(path, one JSON body per sample, items per request) for a request kind."""
    extra = {"model": model} if model else {}
    if kind == "vqa":
        path, items = "/v1/vqa", 1
        objs = [{"image": s.image_b64, "questions": [s.question], **extra} for s in corpus]
    elif kind == "retrieve64":
        path, items = "/v1/retrieve", 64
        caps = many_captions(corpus, 64)
        objs = [{"image": s.image_b64, "texts": caps, "top_k": 5, **extra} for s in corpus]
    elif kind == "match":
        path, items = "/v1/match", 8
        objs = [{"image": s.image_b64, "texts": list(s.captions), **extra} for s in corpus]
    elif kind == "embed":
        path, items = "/v1/embed", 1
        objs = [{"images": [s.image_b64], **extra} for s in corpus]
    else:
        raise ValueError(f"unknown kind {kind!r}: choose one of {', '.join(KINDS)}")
    return path, [json.dumps(o).encode() for o in objs], items


class HttpTarget:
    """Prepared bodies for one kind of request against one base URL."""

    def __init__(self, url: str, corpus: list[Sample], kind: str = "vqa", model: str | None = None,
                 timeout_s: float = 60.0, connections: int = 64) -> None:
        self.url = url.rstrip("/")
        self.path, self.bodies, self.items = bodies(corpus, kind, model)
        # /v1/vqa answers are checked against the scene's truth: a fast wrong server is not a fast server.
        self.truth = [s.answer for s in corpus] if kind == "vqa" else None
        self.checked = self.right = 0
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.connections = connections
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HttpTarget:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.connections), timeout=self.timeout
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    async def call(self, i: int) -> int:
        """POST body `i` (cycling); raises HttpStatusError on a non-2xx answer."""
        assert self.session is not None, "use `async with HttpTarget(...)`"
        body = self.bodies[i % len(self.bodies)]
        async with self.session.post(
            self.url + self.path, data=body, headers={"Content-Type": "application/json"}
        ) as r:
            data = await r.read()
            if r.status >= 300:
                raise HttpStatusError(r.status, data)
        if self.truth is not None:
            self.checked += 1
            self.right += json.loads(data)["answers"][0]["answer"] == self.truth[i % len(self.truth)]
        return self.items


async def drive(
    url: str,
    corpus: list[Sample],
    *,
    kind: str = "vqa",
    concurrency: int = 32,
    rate: float = 0.0,
    duration_s: float = 20.0,
    warmup_s: float = 3.0,
    model: str | None = None,
    name: str = "http",
) -> RunResult:
    """One run against the JSON API: closed loop at `concurrency`, or open loop when `rate` > 0."""
    async with HttpTarget(url, corpus, kind, model, connections=max(concurrency, 64)) as t:
        await t.call(0)  # connect and fail fast before timing
        cpu0 = time.process_time()
        if rate > 0:
            res = await open_loop(t.call, rate, duration_s, warmup_s, name=name, classify=classify)
        else:
            res = await closed_loop(t.call, concurrency, duration_s, warmup_s, name=name, classify=classify)
    res.extra.update({"kind": kind, "path": t.path, "url": url, "items_per_request": t.items,
                      "client_cpu_s": round(time.process_time() - cpu0, 2),  # the load generator's own CPU
                      "driver": "aiohttp (python, one process)"})
    if t.truth is not None:  # over the whole run, warm-up included
        res.extra["answers"] = {"checked": t.checked, "right": t.right}
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--kind", choices=KINDS, default="vqa")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rate", type=float, default=0.0, help="open loop: Poisson arrivals per second")
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--model", help="the request's `model` field (a served preset)")
    p.add_argument("--name", default="http")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    res = asyncio.run(
        drive(args.url, make_corpus(args.samples), kind=args.kind, concurrency=args.concurrency, rate=args.rate,
              duration_s=args.duration, warmup_s=args.warmup, model=args.model, name=args.name)
    )
    d = res.to_dict()
    if args.out:
        write_json(args.out, d)
    json.dump({k: v for k, v in d.items() if k != "latencies_ms"}, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    return 0 if res.completed else 1


if __name__ == "__main__":
    sys.exit(main())
