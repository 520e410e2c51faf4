"""Test utilities: free ports, fresh shapes-world renders, Triton metrics parsing."""

from __future__ import annotations

import contextlib
import random
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from serving.procs import free_port
from serving.shapes import world

T = TypeVar("T")



def fresh_samples(n: int, seed: int) -> list[tuple[bytes, world.QA, world.Scene]]:
    """`n` (encoded image, question, scene) triples from renders the model never saw."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = world.random_scene(rng)
        side = rng.choice([64, 100, 160, 256])
        img = world.render(scene, side, supersample=rng.choice([1, 2]))
        data = world.encode(img, "JPEG", 90) if rng.random() < 0.5 else world.encode(img, "PNG")
        out.append((data, world.sample_question(scene, rng), scene))
    return out


def scrape(url: str) -> str:
    """GET a Prometheus text endpoint."""
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        m = re.match(r"^(\w+)(?:\{(.*)\})?\s+([-+0-9.eEinfNa]+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def settled(
    read: Callable[[], T], period: float = 0.3, timeout: float = 10.0, until: Callable[[T], bool] | None = None
) -> T:
    """`read()` once two readings `period` apart agree (and `until(reading)` holds, if given), or at `timeout`.

    Triton counts a request in its metrics just after the response is on its way, so a
    count read right after the last answer can miss the last batch; on a busy machine two
    readings can agree while a count is still to come, which `until` waits out.
    """
    last = read()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(period)
        now = read()
        if now == last and (until is None or until(now)):
            return now
        last = now
    return last


@contextlib.contextmanager
def running_triton(repository: Path, log_path: Path, **extra: object) -> Iterator[object]:
    """A real tritonserver over `repository` on free ports, ready; always stopped (its process group)."""
    from serving.triton.launcher import TritonServer, TritonSettings

    settings = TritonSettings(repository=repository, http_port=free_port(), grpc_port=free_port(),
                              metrics_port=free_port(), exit_timeout_s=10, **extra)  # type: ignore[arg-type]
    server = TritonServer(settings, log_path=log_path)
    server.start()
    try:
        server.wait_ready(timeout=240)
        yield server
    finally:
        server.stop()
