"""Locust load test of the public API: a weighted mix of VQA, match, retrieve and embed calls.

Each user sends its next request as soon as the last returns (a closed loop of `-u` users).
Images come from the shapes renderer at varied sizes (PNG and JPEG), built once per process.

    locust -f loadtests/locustfile.py --headless -u 32 -r 32 -t 60s -H http://127.0.0.1:8080 \\
        --vtfuse-json loadtests/results/locust.json

`--vtfuse-json` writes per-endpoint and total requests, failures, requests/s and p50/p90/p99
(ms) when the run ends. Mix weights: vqa 5, match 2, embed 2, retrieve 1.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from locust import FastHttpUser, constant, events, task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `locust -f` from anywhere finds loadtests
from loadtests.common import make_corpus, many_captions, write_json  # noqa: E402

CORPUS = make_corpus(64, seed=1)
CAPTIONS = many_captions(CORPUS, 64)
_started = time.time()


@events.init_command_line_parser.add_listener
def _args(parser: Any) -> None:
    parser.add_argument("--vtfuse-json", default="", help="write the final stats here as JSON")
    parser.add_argument("--vtfuse-model", default="", help="the requests' `model` field (a served preset)")


def _stats_entry(e: Any, duration: float) -> dict[str, Any]:
    return {
        "requests": e.num_requests,
        "failures": e.num_failures,
        "rps": e.num_requests / duration if duration > 0 else 0.0,
        "p50_ms": e.get_response_time_percentile(0.5) if e.num_requests else None,
        "p90_ms": e.get_response_time_percentile(0.9) if e.num_requests else None,
        "p99_ms": e.get_response_time_percentile(0.99) if e.num_requests else None,
        "mean_ms": e.avg_response_time if e.num_requests else None,
    }


@events.test_start.add_listener
def _start(environment: Any, **_: Any) -> None:
    global _started
    _started = time.time()


@events.quitting.add_listener
def _write(environment: Any, **_: Any) -> None:
    path = environment.parsed_options.vtfuse_json if environment.parsed_options else ""
    if not path:
        return
    stats = environment.stats
    duration = max(time.time() - _started, 1e-9)
    report = {
        "tool": "locust",
        "host": environment.host,
        "users": environment.parsed_options.num_users,
        "duration_s": round(duration, 2),
        "total": _stats_entry(stats.total, duration),
        "endpoints": {name: _stats_entry(e, duration) for (name, _method), e in sorted(stats.entries.items())},
        "errors": {f"{e.method} {e.name}: {e.error}": e.occurrences for e in stats.errors.values()},
    }
    write_json(Path(path), report)


class ApiUser(FastHttpUser):
    """One caller of the public API."""

    wait_time = constant(0)

    def _post(self, path: str, body: dict[str, Any]) -> None:
        model = self.environment.parsed_options.vtfuse_model if self.environment.parsed_options else ""
        if model:
            body["model"] = model
        with self.client.post(path, data=json.dumps(body), headers={"Content-Type": "application/json"},
                              name=path, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200] if r.text else ''}")

    @task(5)
    def vqa(self) -> None:
        s = random.choice(CORPUS)
        others = [random.choice(CORPUS).question for _ in range(random.randint(0, 2))]
        self._post("/v1/vqa", {"image": s.image_b64, "questions": [s.question, *others]})

    @task(2)
    def match(self) -> None:
        s = random.choice(CORPUS)
        self._post("/v1/match", {"image": s.image_b64, "texts": list(s.captions)})

    @task(2)
    def embed(self) -> None:
        s = random.choice(CORPUS)
        body = {"images": [s.image_b64]} if random.random() < 0.5 else {"texts": list(s.captions[:4])}
        self._post("/v1/embed", body)

    @task(1)
    def retrieve(self) -> None:
        s = random.choice(CORPUS)
        self._post("/v1/retrieve", {"image": s.image_b64, "texts": random.sample(CAPTIONS, 16), "top_k": 3})
