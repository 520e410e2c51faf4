"""Closed- and open-loop request drivers on asyncio, independent of the protocol.

A *call* is `async (i) -> items` that sends request number `i` and returns how many items it
carried; it raises on failure and `classify` names the failure. Closed loop: `concurrency`
workers, each sending its next request as soon as the last one returns. Open loop: Poisson
arrivals at `rate` per second, each request timed from its scheduled arrival (so a slow
server's queueing shows in the latency instead of being hidden by a stalled sender).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

from loadtests.common import RunResult, Window, summarize

Call = Callable[[int], Awaitable[int]]


def default_classify(exc: BaseException) -> str:
    """An exception's class name as the error kind."""
    return type(exc).__name__


async def closed_loop(
    call: Call,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 2.0,
    name: str = "run",
    classify: Callable[[BaseException], str] = default_classify,
    drain_s: float = 30.0,
) -> RunResult:
    """`concurrency` workers back to back for warm-up + `duration_s`; stats over the window after warm-up."""
    window = Window(warmup_s, duration_s)
    counter = iter(range(1 << 62))
    items_seen: list[int] = []

    async def worker() -> None:
        while window.open():
            i = next(counter)
            t0 = time.perf_counter()
            try:
                items = await call(i)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 — every failure is counted, none stops the run
                window.record(t0, time.perf_counter(), classify(e))
                continue
            if window.record(t0, time.perf_counter()):
                items_seen.append(items)

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    _, pending = await asyncio.wait(tasks, timeout=warmup_s + duration_s + drain_s)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    per_request = round(sum(items_seen) / len(items_seen)) if items_seen else 1
    return summarize(
        name, "closed", window.latencies, window.errors, window.length, concurrency=concurrency,
        items_per_request=per_request,
    )


async def open_loop(
    call: Call,
    rate: float,
    duration_s: float,
    warmup_s: float = 2.0,
    name: str = "run",
    classify: Callable[[BaseException], str] = default_classify,
    max_inflight: int = 1024,
    seed: int = 0,
    drain_s: float = 30.0,
) -> RunResult:
    """Poisson arrivals at `rate`/s; arrivals beyond `max_inflight` outstanding count as `client_overflow`."""
    window = Window(warmup_s, duration_s)
    rng = random.Random(seed)
    inflight: set[asyncio.Task[None]] = set()
    items_seen: list[int] = []

    async def one(i: int, t_sched: float) -> None:
        try:
            items = await call(i)
        except Exception as e:  # noqa: BLE001
            window.record(t_sched, time.perf_counter(), classify(e), by_send=True)
            return
        if window.record(t_sched, time.perf_counter(), by_send=True):
            items_seen.append(items)

    t_next = time.perf_counter()
    i = 0
    while t_next < window.end:
        t_next += rng.expovariate(rate)
        delay = t_next - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(inflight) >= max_inflight:
            window.record(t_next, t_next, "client_overflow", by_send=True)
            continue
        task = asyncio.create_task(one(i, t_next))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
        i += 1
    if inflight:
        _, pending = await asyncio.wait(set(inflight), timeout=drain_s)
        for t in pending:
            t.cancel()
    per_request = round(sum(items_seen) / len(items_seen)) if items_seen else 1
    return summarize(
        name, "open", window.latencies, window.errors, window.length, rate=rate, items_per_request=per_request
    )
