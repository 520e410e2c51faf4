"""The API's Prometheus metrics: recorded with Ray Serve's metrics API, served aggregated over every replica.

Each replica records into `ray.serve.metrics` (tagged with its deployment and replica);
Ray exports them on every node's metrics export port with a `ray_` prefix. GET /metrics
on any ingress replica fetches those endpoints (all alive nodes, or `metrics_urls`),
keeps our `vtfuse_*` families, drops Ray's bookkeeping labels and strips the prefix.
One series per replica remains (sum by the labels you need), so counters stay monotonic
when a replica restarts, which a per-process registry or a pre-summed value would not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

import httpx
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from ray.serve.metrics import Counter, Histogram

log = logging.getLogger(__name__)

PREFIX = "vtfuse_"
RAY_PREFIX = "ray_"
LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
# Ray exports a histogram's _sum from bucket midpoints, not the observed values: half-integer
# bounds make the midpoint of each small batch size that size exactly.
BATCH_BUCKETS = [*(i + 0.5 for i in range(17)), 24.5, 32.5, 48.5, 64.5]
# Ray's bookkeeping labels: per-process or per-session, they would only split series.
DROPPED_LABELS = frozenset({"Component", "SessionName", "Version", "WorkerId", "JobId", "NodeAddress"})
DROPPED_LABEL_PREFIXES = ("otel_scope_",)
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what `filter_prometheus` writes


def _keys(*names: str) -> Any:
    """Tag keys as Ray wants them (its annotation says tuple[str]; any length works)."""
    return names


class ApiMetrics:
    """Every metric the API records; safe to create outside Ray (recording is then a no-op)."""

    def __init__(self) -> None:
        self.requests = Counter(
            "vtfuse_requests",
            description="API requests by route, protocol and response status.",
            tag_keys=_keys("route", "protocol", "status"),
        )
        self.request_seconds = Histogram(
            "vtfuse_request_duration_seconds",
            description="Whole-request latency at the ingress, by route and protocol.",
            boundaries=LATENCY_BUCKETS,
            tag_keys=_keys("route", "protocol"),
        )
        self.stage_seconds = Histogram(
            "vtfuse_stage_duration_seconds",
            description="Latency of one stage of a request: decode, tokenize, preprocess (the hop), triton.",
            boundaries=LATENCY_BUCKETS,
            tag_keys=_keys("stage"),
        )
        self.triton_seconds = Histogram(
            "vtfuse_triton_request_duration_seconds",
            description="Latency of one Triton inference request, by engine.",
            boundaries=LATENCY_BUCKETS,
            tag_keys=_keys("engine"),
        )
        self.triton_bytes = Counter(
            "vtfuse_triton_tensor_bytes",
            description="Tensor bytes exchanged with Triton, by engine and direction (sent/received).",
            tag_keys=_keys("engine", "direction"),
        )
        self.batch_size = Histogram(
            "vtfuse_preprocess_batch_size",
            description="Requests per preprocessing batch (@serve.batch).",
            boundaries=BATCH_BUCKETS,
            tag_keys=None,
        )
        self.batches = Counter(
            "vtfuse_preprocess_batches", description="Preprocessing batches run (@serve.batch calls).", tag_keys=None
        )
        self.batched_requests = Counter(
            "vtfuse_preprocess_batched_requests",
            description="Requests preprocessed in batches; / vtfuse_preprocess_batches_total = mean batch size.",
            tag_keys=None,
        )

    def stage(self, stage: str, seconds: float) -> None:
        """Record one stage's duration."""
        self.stage_seconds.observe(seconds, tags={"stage": stage})

    def batch(self, size: int) -> None:
        """Record one preprocessing batch of `size` requests."""
        self.batch_size.observe(size)
        self.batches.inc(1)
        self.batched_requests.inc(size)

    def request(self, route: str, protocol: str, status: int | str, seconds: float) -> None:
        """Record one finished request."""
        self.requests.inc(1, tags={"route": route, "protocol": protocol, "status": str(status)})
        self.request_seconds.observe(seconds, tags={"route": route, "protocol": protocol})

    def triton_call(self, engine: str, seconds: float, sent: int, received: int) -> None:
        """Record one Triton request."""
        self.triton_seconds.observe(seconds, tags={"engine": engine})
        self.stage_seconds.observe(seconds, tags={"stage": "triton"})
        self.triton_bytes.inc(sent, tags={"engine": engine, "direction": "sent"})
        self.triton_bytes.inc(received, tags={"engine": engine, "direction": "received"})


class _Families:
    """A prometheus_client collector over already-built metric families (for `generate_latest`)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def _ours(text: str, prefix: str) -> str:
    """Only the lines of `prefix` families (HELP, TYPE, samples): Ray's own families are most of the text."""
    keep = (prefix, RAY_PREFIX + prefix)
    lines = [
        line
        for line in text.splitlines()
        if (line[7:] if line.startswith(("# HELP ", "# TYPE ")) else line).startswith(keep)
    ]
    return "\n".join(lines) + "\n" if lines else ""


def _parse(text: str) -> list[Metric]:
    try:
        return list(text_string_to_metric_families(text))
    except (ValueError, TypeError, IndexError) as e:  # one malformed endpoint must not hide the others
        log.warning("unparsable Prometheus text from a metrics endpoint (%s): skipped", e)
        return []


def filter_prometheus(texts: Iterable[str], prefix: str = PREFIX) -> str:
    """Merge Prometheus texts from several endpoints into one, keeping only `prefix` families.

    Parsed with prometheus_client's text parser and written with its exposition: Ray's `ray_`
    prefix is stripped, its bookkeeping labels dropped, HELP/TYPE written once per family, and
    exact duplicate series (same name and labels) kept once.
    """
    families: dict[str, Metric] = {}
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for text in texts:
        ours = _ours(text, prefix)
        for fam in _parse(ours) if ours else []:
            name = fam.name.removeprefix(RAY_PREFIX)
            if not name.startswith(prefix):
                continue
            out = families.get(name)
            if out is None:
                out = families[name] = Metric(name, fam.documentation, fam.type, fam.unit)
            for sample in fam.samples:
                labels = {
                    k: v
                    for k, v in sample.labels.items()
                    if k not in DROPPED_LABELS and not k.startswith(DROPPED_LABEL_PREFIXES)
                }
                sample_name = sample.name.removeprefix(RAY_PREFIX)
                key = (sample_name, tuple(sorted(labels.items())))
                if key in seen:
                    continue
                seen.add(key)
                out.samples.append(Sample(sample_name, labels, sample.value, sample.timestamp, sample.exemplar))
    ordered = (families[n] for n in sorted(families))
    return generate_latest(_Families(ordered)).decode()  # type: ignore[arg-type]


class MetricsCollector:
    """Fetches every Ray metrics endpoint and returns the filtered, merged text for GET /metrics."""

    def __init__(self, urls: list[str] | None = None, node_refresh_s: float = 30.0, timeout_s: float = 3.0) -> None:
        self._static = list(urls or [])
        self._urls: list[str] = []
        self._urls_at = 0.0
        self._refresh = node_refresh_s
        self._timeout = timeout_s

    def endpoints(self) -> list[str]:
        """The metrics URLs to read: configured ones, else every alive Ray node's export port."""
        if self._static:
            return self._static
        now = time.monotonic()
        if not self._urls or now - self._urls_at > self._refresh:
            import ray

            try:
                self._urls = [
                    f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
                    for n in ray.nodes()
                    if n.get("Alive") and n.get("MetricsExportPort")
                ]
                self._urls_at = now
            except Exception as e:  # not in a Ray cluster (unit tests): nothing to read
                log.debug("no Ray nodes to read metrics from: %s", e)
                self._urls = []
        return self._urls

    async def collect(self) -> str:
        """The merged `vtfuse_*` text of every endpoint that answered."""
        urls = await asyncio.to_thread(self.endpoints)
        async with httpx.AsyncClient(timeout=self._timeout) as client:

            async def one(url: str) -> str:
                try:
                    r = await client.get(url)
                    r.raise_for_status()
                    return r.text
                except httpx.HTTPError as e:
                    log.warning("metrics endpoint %s did not answer: %s", url, e)
                    return ""

            texts = await asyncio.gather(*(one(u) for u in urls))
        return filter_prometheus(texts)
