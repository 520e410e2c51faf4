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


def image_encoder_runs(metrics_url: str, settle_s: float = 0.3, encoder: str = "image_encoder") -> float:
    """Triton's nv_inference_count of the image encoder (cached answers are not counted), once two reads agree."""

    def read() -> float:
        return batch_counts(scrape(metrics_url)).get(encoder, {}).get("nv_inference_count", 0.0)

    last = read()
    for _ in range(20):
        time.sleep(settle_s)
        now = read()
        if now == last:
            return now
        last = now
    return last


def _call(kind: str, image: Sample, text: str) -> tuple[str, dict[str, Any]]:
    """(path, body) of one call: a one-question /v1/vqa, or a one-text /v1/match (image–text matching)."""
    if kind == "vqa":
        return "/v1/vqa", {"image": image.image_b64, "questions": [text]}
    if kind == "match":
        return "/v1/match", {"image": image.image_b64, "texts": [text]}
    raise ValueError(f"kind {kind!r}: use vqa or match")


def _answer(kind: str, reply: dict[str, Any]) -> Any:
    """What a user reads back: the answer, or the match score (rounded: the cache's and a fresh run's agree)."""
    if kind == "vqa":
        return reply["answers"][0]["answer"]
    return round(float(reply["scores"][0]), 4)


def sequences(url: str, images: list[Sample], texts: list[str], calls: int = 8,
              metrics_url: str | None = None, model: str | None = None, timeout_s: float = 60.0,
              kind: str = "vqa", encoder: str = "image_encoder") -> dict[str, Any]:
    """One sequence of `calls` one-text requests (`kind` vqa: a question each; match: a caption each) per image;
    wall times, what came back and how many times the image encoder (Triton model `encoder`) ran."""
    rows = []
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s) as client:
        path, warm = _call(kind, images[0], texts[0])
        client.post(path, json=warm | ({"model": model} if model else {})).raise_for_status()  # outside the timing
        for i, s in enumerate(images[1:]):
            before = image_encoder_runs(metrics_url, encoder=encoder) if metrics_url else None
            t0 = time.perf_counter()
            answers = []
            for k in range(calls):
                path, body = _call(kind, s, texts[(i + k) % len(texts)])
                r = client.post(path, json=body | ({"model": model} if model else {}))
                r.raise_for_status()
                answers.append(_answer(kind, r.json()))
            wall = time.perf_counter() - t0
            row: dict[str, Any] = {"side": s.side, "format": s.fmt, "wall_ms": round(1000 * wall, 2),
                                   "answers": answers}
            if metrics_url and before is not None:
                row["image_encoder_runs"] = image_encoder_runs(metrics_url, encoder=encoder) - before
            rows.append(row)
    walls = [r["wall_ms"] for r in rows]
    out: dict[str, Any] = {"kind": kind, "calls_per_sequence": calls, "sequences": rows,
                           "median_wall_ms": statistics.median(walls)}
    if metrics_url:
        out["image_encoder_runs_per_sequence"] = [r["image_encoder_runs"] for r in rows]
    return out


def corpus_for(n_sequences: int, seed: int = 808, side: int | None = None) -> tuple[list[Sample], list[str]]:
    """`n_sequences` + 1 fresh images (the first only warms up; all `side` px where given) and a pool of distinct
    questions."""
    pool = make_corpus(max(n_sequences + 1, 16), seed=seed, **({"sides": (side,)} if side else {}))
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
