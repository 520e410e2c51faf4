"""CPU per request inside the Ingress's HTTP app, by part, in one process: what each front-door lever can win at most.

The app is the one Serve runs (`create_api`: ApiMiddleware → FastAPI route → read body → JSON
→ schema → pipeline → response model → JSON response) called as ASGI directly, no network, no
Ray, with the pipeline answering at once, so what is timed is the web layer alone. Bodies are
one-question /v1/vqa requests from the load corpus (base64 PNG/JPEG in JSON, as `make bench`
sends). Each part is then timed alone: `json.loads` of the body, the strict schema
(`VqaRequest.model_validate`), the response model built and dumped (`VqaResponse(...)` +
`model_dump`), `JSONResponse` rendering, and the same response encoded with `orjson` and built
without validation (`model_construct`) when available. CPU seconds (`time.process_time`), so
other work on the machine moves them little.

    python -m loadtests.ingress_cost [--requests 3000] [--out loadtests/results/ingress_cost.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtests.common import make_corpus, write_json


def _cpu_us(fn: Callable[[], Any], n: int) -> float:
    t = time.process_time()
    for _ in range(n):
        fn()
    return 1e6 * (time.process_time() - t) / n


def measure(n: int = 3000) -> dict[str, Any]:
    from fastapi.responses import JSONResponse

    from serving.app import schemas
    from serving.app.http_api import create_api
    from serving.app.metrics import ApiMetrics
    from serving.app.pipeline import Admission
    from serving.app.schemas import AnswerScore, VqaAnswer, VqaResponse
    from tests.unit.app_fakes import make_args, make_checkpoint, make_pipeline

    corpus = make_corpus(64)
    bodies = [json.dumps({"image": s.image_b64, "questions": [s.question]}).encode() for s in corpus]
    args = make_args(make_checkpoint(Path(tempfile.mkdtemp(prefix="ingress-cost-"))))
    pipeline, _ = make_pipeline(args)

    def answer(q: str) -> VqaResponse:
        return VqaResponse(model="tiny", answers=[VqaAnswer(question=q, answer="red", score=0.99,
                                                            top_k=[AnswerScore(answer="red", score=0.99)])])

    async def run(task: Any, ctx: Any) -> VqaResponse:
        return answer(task.questions[0])

    pipeline.run = run  # type: ignore[method-assign]

    async def collect() -> str:
        return ""

    app = create_api(pipeline, args, ApiMetrics(), collect, Admission(64), echo_request_id=False)

    async def one(body: bytes) -> int:
        sent: list[dict[str, Any]] = []
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if delivered:
                return {"type": "http.disconnect"}
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/vqa", "raw_path": b"/v1/vqa", "root_path": "", "query_string": b"",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8080), "state": {}}
        await app(scope, receive, send)
        return int(sent[0]["status"])

    async def many(k: int) -> float:
        statuses = set()
        t = time.process_time()
        for i in range(k):
            statuses.add(await one(bodies[i % len(bodies)]))
        assert statuses == {200}, statuses
        return 1e6 * (time.process_time() - t) / k

    loop = asyncio.new_event_loop()
    loop.run_until_complete(many(200))  # warm up
    whole = loop.run_until_complete(many(n))
    loop.close()

    obj = json.loads(bodies[0])
    resp = answer("how many circles are there?")
    dumped = resp.model_dump(exclude_none=True)
    parts: dict[str, float] = {
        "json.loads(body)": _cpu_us(lambda: json.loads(bodies[0]), n),
        "VqaRequest.model_validate (strict schema)": _cpu_us(lambda: schemas.VqaRequest.model_validate(obj), n),
        "VqaResponse(...) built + model_dump": _cpu_us(lambda: answer("q").model_dump(exclude_none=True), n),
        "JSONResponse(dict) rendered (json.dumps)": _cpu_us(lambda: JSONResponse(dumped).body, n),
        "VqaResponse.model_construct (no validation) + model_dump": _cpu_us(
            lambda: VqaResponse.model_construct(model="tiny", answers=[VqaAnswer.model_construct(
                question="q", answer="red", score=0.99, top_k=[AnswerScore.model_construct(answer="red", score=0.99)],
                attention=None, tokens=None)]).model_dump(exclude_none=True), n),
    }
    try:
        import orjson

        parts["orjson.dumps(dict)"] = _cpu_us(lambda: orjson.dumps(dumped), n)
    except ImportError:
        parts["orjson.dumps(dict)"] = None  # type: ignore[assignment]
    return {
        "requests": n, "body_bytes_mean": sum(map(len, bodies)) / len(bodies),
        "whole_app_cpu_us_per_request": round(whole, 1),
        "parts_cpu_us": {k: (round(v, 1) if v is not None else None) for k, v in parts.items()},
        "note": "the pipeline answers at once: Triton, Ray and the network are not in these figures",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    res = measure(args.requests)
    if args.out:
        write_json(args.out, res)
    json.dump(res, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
