"""Several one-question `/v1/vqa` calls about one image, one after another: what reusing its features saves.

A user asking about one picture in separate calls (the playground, a chat client) sends the
same image each time. Each sequence here is `calls` one-question requests with the same
image and different questions, sent one at a time (each waits for the previous answer);
its wall time is the figure. Run it against a stack with Triton's response cache on and
one with it off (`VTFUSE_RESPONSE_CACHE_MB=0`): `repeat_image_speedup` is off ÷ on of the
median sequence time. With a Triton metrics URL it also counts how many times
`image_encoder` really ran per sequence (`nv_inference_count` leaves out cached answers).

    python -m loadtests.repeat_image --url http://127.0.0.1:8080 [--metrics-url http://127.0.0.1:8002/metrics]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import httpx

from loadtests.common import Sample, make_corpus
from loadtests.grpc_driver import batch_counts, scrape


def image_encoder_runs(metrics_url: str, settle_s: float = 0.3) -> float:
    """Triton's nv_inference_count of image_encoder (cached answers are not counted), once two reads agree."""

    def read() -> float:
        return batch_counts(scrape(metrics_url)).get("image_encoder", {}).get("nv_inference_count", 0.0)

    last = read()
    for _ in range(20):
        time.sleep(settle_s)
        now = read()
        if now == last:
            return now
        last = now
    return last


def sequences(url: str, images: list[Sample], questions: list[str], calls: int = 8,
              metrics_url: str | None = None, model: str | None = None, timeout_s: float = 60.0) -> dict[str, Any]:
    """One sequence of `calls` one-question /v1/vqa requests per image; wall times and image_encoder runs."""
    rows = []
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s) as client:
        warm = {"image": images[0].image_b64, "questions": [questions[0]]} | ({"model": model} if model else {})
        client.post("/v1/vqa", json=warm).raise_for_status()  # connect and warm up outside the timing
        for i, s in enumerate(images[1:]):
            before = image_encoder_runs(metrics_url) if metrics_url else None
            t0 = time.perf_counter()
            answers = []
            for k in range(calls):
                body = {"image": s.image_b64, "questions": [questions[(i + k) % len(questions)]]}
                r = client.post("/v1/vqa", json=body | ({"model": model} if model else {}))
                r.raise_for_status()
                answers.append(r.json()["answers"][0]["answer"])
            wall = time.perf_counter() - t0
            row: dict[str, Any] = {"side": s.side, "format": s.fmt, "wall_ms": round(1000 * wall, 2),
                                   "answers": answers}
            if metrics_url and before is not None:
                row["image_encoder_runs"] = image_encoder_runs(metrics_url) - before
            rows.append(row)
    walls = [r["wall_ms"] for r in rows]
    out: dict[str, Any] = {"calls_per_sequence": calls, "sequences": rows, "median_wall_ms": statistics.median(walls)}
    if metrics_url:
        out["image_encoder_runs_per_sequence"] = [r["image_encoder_runs"] for r in rows]
    return out


def corpus_for(n_sequences: int, seed: int = 808) -> tuple[list[Sample], list[str]]:
    """`n_sequences` + 1 fresh images (the first only warms up) and a pool of distinct questions."""
    pool = make_corpus(max(n_sequences + 1, 16), seed=seed)
    questions = list(dict.fromkeys(s.question for s in pool))
    return pool[: n_sequences + 1], questions


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--metrics-url", help="Triton's metrics, to count image_encoder runs")
    p.add_argument("--sequences", type=int, default=5)
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--model")
    args = p.parse_args(argv)
    images, questions = corpus_for(args.sequences)
    res = sequences(args.url, images, questions, args.calls, args.metrics_url, args.model)
    json.dump(res, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
