"""Measure what a Serve hop costs here: no-op apps of 1 and 2 deployments, and the API with and without Preprocess.

Closed loop at a fixed concurrency against each composition in turn, in one Ray cluster,
on the same machine and the same Triton; prints a Markdown table and writes JSON. Also
reads the Triton tensor bytes per request from /metrics. Usage:

    PYTHONPATH=. .venv/bin/python -m loadtests.hopbench --seconds 15 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from serving.paths import REPO_ROOT
from serving.procs import free_port

log = logging.getLogger(__name__)


def _noop_apps() -> dict[str, Any]:
    from fastapi import FastAPI
    from ray import serve

    api1, api2 = FastAPI(), FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
    @serve.ingress(api1)
    class NoopOne:
        @api1.post("/v1/vqa")
        async def vqa(self) -> dict:
            return {"ok": True}

    @serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
    class Leaf:
        async def __call__(self, x: int) -> int:
            return x

    @serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
    @serve.ingress(api2)
    class NoopTwo:
        def __init__(self, leaf: Any) -> None:
            self.leaf = leaf

        @api2.post("/v1/vqa")
        async def vqa(self) -> dict:
            return {"ok": await self.leaf.remote(1)}

    return {
        "noop, 1 deployment": NoopOne.bind(),  # type: ignore[attr-defined]
        "noop, 2 deployments (1 hop)": NoopTwo.bind(Leaf.bind()),  # type: ignore[attr-defined]
    }


async def closed_loop(url: str, bodies: list[dict], concurrency: int, seconds: float) -> dict[str, float]:
    """`concurrency` workers posting back to back for `seconds`; latency percentiles in ms."""
    lat: list[float] = []
    errors = 0
    stop = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as c:

        async def worker(i: int) -> None:
            nonlocal errors
            k = i
            while time.monotonic() < stop:
                t = time.perf_counter()
                r = await c.post(url, json=bodies[k % len(bodies)])
                k += concurrency
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t)
                else:
                    errors += 1

        t0 = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        wall = time.monotonic() - t0
    lat.sort()
    return {
        "req_per_s": len(lat) / wall,
        "p50_ms": 1000 * statistics.median(lat) if lat else float("nan"),
        "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))] if lat else float("nan"),
        "ok": len(lat),
        "errors": errors,
    }


def _sum(metrics_text: str, name: str) -> float:
    """Sum of every sample of one metric."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics_text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def _settled(c: httpx.Client, name: str, quiet_s: float = 3.0) -> float:
    """The metric's value once Ray's periodic export has stopped changing it (load from before has landed)."""
    value = _sum(c.get("/metrics").text, name)
    while True:
        time.sleep(quiet_s)
        again = _sum(c.get("/metrics").text, name)
        if again == value:
            return value
        value = again


def bytes_per_request(base: str, body: dict, n: int = 5) -> float:
    """Tensor bytes exchanged with Triton per request of this shape (sent + received), from /metrics."""
    name = "vtfuse_triton_tensor_bytes_total"
    with httpx.Client(base_url=base, timeout=60) as c:
        before = _settled(c, name)
        for _ in range(n):
            assert c.post("/v1/" + body["route"], json=body["json"]).status_code == 200
        after = _settled(c, name)
    return (after - before) / n


def mean_batch_size(base: str) -> float | None:
    """Requests per @serve.batch call so far (None when the app has no Preprocess deployment)."""
    with httpx.Client(base_url=base, timeout=60) as c:
        text = c.get("/metrics").text
    batches = _sum(text, "vtfuse_preprocess_batches_total")
    return _sum(text, "vtfuse_preprocess_batched_requests_total") / batches if batches else None



def main(argv: list[str] | None = None) -> int:
    """Run every composition; print the table; write JSON."""
    import ray
    from ray import serve

    from serving.app.builder import build_app, serve_options
    from serving.app.settings import AppArgs
    from serving.shapes import world
    from serving.triton.launcher import TritonServer, TritonSettings

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--triton-url", default=None, help="use a running Triton (gRPC host:port) instead of starting one")
    p.add_argument("--out", default=str(REPO_ROOT / "build" / "hopbench.json"))
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    rng = random.Random(0)
    scenes = [world.random_scene(rng) for _ in range(32)]
    imgs = [base64.b64encode(world.encode(world.render(s, 64), "PNG")).decode() for s in scenes]
    bodies = [{"image": im, "questions": [world.sample_question(s, rng).question]} for im, s in zip(imgs, scenes)]

    triton = None
    if ns.triton_url is None:
        triton = TritonServer(
            TritonSettings(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()),
            log_path=REPO_ROOT / "build" / "logs" / "hopbench-triton.log",
        )
        triton.start()
        triton.wait_ready()
        ns.triton_url = triton.url_grpc
    http_port, grpc_port = free_port(), free_port()
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if x)
    ray.init(
        address="local",  # a cluster of its own, as loadtests/serve_app.py starts
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=free_port(),
        _system_config={"metrics_report_interval_ms": 1000},
    )
    results: dict[str, Any] = {"concurrency": ns.concurrency, "seconds": ns.seconds, "cpus": os.cpu_count()}
    try:
        serve.start(**serve_options("127.0.0.1", http_port, grpc_port))
        base = f"http://127.0.0.1:{http_port}"
        apps: dict[str, Any] = _noop_apps()
        for mode in ("inline", "deployment"):
            label = "API, preprocess in ingress" if mode == "inline" else "API, Preprocess deployment (1 hop)"
            apps[label] = build_app(AppArgs(triton_url=ns.triton_url, preprocess=mode))
        for name, app in apps.items():
            serve.run(app, name="bench", route_prefix="/")
            asyncio.run(closed_loop(base + "/v1/vqa", bodies, ns.concurrency, 3.0))  # warm-up
            res: dict[str, Any] = asyncio.run(closed_loop(base + "/v1/vqa", bodies, ns.concurrency, ns.seconds))
            if name.startswith("API"):
                res["mean_preprocess_batch"] = mean_batch_size(base)
                res["triton_bytes_per_request"] = {
                    "vqa_1_question": bytes_per_request(base, {"route": "vqa", "json": bodies[0]}),
                    "vqa_8_questions": bytes_per_request(
                        base,
                        {"route": "vqa", "json": {"image": imgs[0], "questions": ["how many circles are there?"] * 8}},
                    ),
                    "retrieve_40_texts_top1": bytes_per_request(
                        base,
                        {
                            "route": "retrieve",
                            "json": {
                                "image": imgs[0],
                                "top_k": 1,
                                "texts": [world.caption(world.scene_items(s)) for s in (scenes * 2)[:40]],
                            },
                        },
                    ),
                }
            results[name] = res
            log.info("%s: %s", name, res)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
        if triton is not None:
            triton.stop()
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n| composition (concurrency {ns.concurrency}, {ns.seconds:.0f} s) | req/s | p50 ms | p99 ms | errors |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        if isinstance(r, dict):
            print(f"| {name} | {r['req_per_s']:.0f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} |")
    for name, r in results.items():
        if isinstance(r, dict) and "triton_bytes_per_request" in r:
            print(f"{name}: Triton tensor bytes per request {r['triton_bytes_per_request']}, "
                  f"mean preprocess batch {r['mean_preprocess_batch']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
