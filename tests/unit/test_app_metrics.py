"""/metrics text: Ray's export filtered to our families, bookkeeping labels dropped, several nodes merged."""

from __future__ import annotations

import asyncio

import httpx

from serving.app.metrics import MetricsCollector, filter_prometheus
from tests.helpers import metric_value

RAY_LABELS = (
    'Component="core_worker",NodeAddress="10.0.0.{n}",SessionName="s",Version="2.60.0",WorkerId="w{r}",'
    'application="vtfuse",deployment="Ingress",otel_scope_name="x",otel_scope_schema_url="",'
    'otel_scope_version="",replica="{r}"'
)


def node_text(n: int, replicas: dict[str, float]) -> str:
    lines = [
        "# HELP ray_vtfuse_requests_total API requests.",
        "# TYPE ray_vtfuse_requests_total counter",
    ]
    for r, v in replicas.items():
        lines.append(f'ray_vtfuse_requests_total{{{RAY_LABELS.format(n=n, r=r)},route="/v1/vqa",status="200"}} {v}')
    lines += [
        "# HELP ray_serve_num_router_requests_total Ray's own.",
        "# TYPE ray_serve_num_router_requests_total counter",
        'ray_serve_num_router_requests_total{deployment="Ingress"} 99.0',
        "# TYPE ray_vtfuse_stage_duration_seconds histogram",
        f'ray_vtfuse_stage_duration_seconds_bucket{{{RAY_LABELS.format(n=n, r="a")},le="0.1",stage="decode"}} 3.0',
        f'ray_vtfuse_stage_duration_seconds_count{{{RAY_LABELS.format(n=n, r="a")},stage="decode"}} 3.0',
    ]
    return "\n".join(lines) + "\n"


def test_filter_keeps_ours_strips_prefix_and_bookkeeping_labels():
    out = filter_prometheus([node_text(1, {"a": 3.0, "b": 4.0})])
    assert "ray_" not in out and "serve_num_router" not in out
    assert "WorkerId" not in out and "otel_scope" not in out and "SessionName" not in out
    assert out.count("# TYPE vtfuse_requests_total counter") == 1
    labels = 'application="vtfuse",deployment="Ingress",replica="a",route="/v1/vqa",status="200"'
    assert f"vtfuse_requests_total{{{labels}}} 3.0" in out
    assert metric_value(out, "vtfuse_requests_total", route="/v1/vqa", status="200") == 7.0
    assert metric_value(out, "vtfuse_stage_duration_seconds_count", stage="decode") == 3.0


def test_replicas_on_several_nodes_are_all_counted_once():
    out = filter_prometheus([node_text(1, {"a": 3.0}), node_text(2, {"b": 5.0, "c": 1.0}), ""])
    assert metric_value(out, "vtfuse_requests_total", route="/v1/vqa") == 9.0
    assert out.count("# HELP vtfuse_requests_total") == 1


def test_collector_reads_every_endpoint_and_survives_a_dead_one():
    texts = {"http://n1/metrics": node_text(1, {"a": 2.0}), "http://n2/metrics": node_text(2, {"b": 3.0})}

    def handler(request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        if url in texts:
            return httpx.Response(200, text=texts[url])
        return httpx.Response(500)

    collector = MetricsCollector(["http://n1/metrics", "http://n2/metrics", "http://dead/metrics"])
    real = httpx.AsyncClient

    def fake_client(**kw):
        return real(transport=httpx.MockTransport(handler), **kw)

    httpx.AsyncClient = fake_client  # type: ignore[misc]
    try:
        out = asyncio.run(collector.collect())
    finally:
        httpx.AsyncClient = real  # type: ignore[misc]
    assert metric_value(out, "vtfuse_requests_total") == 5.0


def test_output_is_valid_exposition_and_a_malformed_endpoint_is_skipped():
    from prometheus_client.parser import text_string_to_metric_families

    same = node_text(1, {"a": 3.0})
    out = filter_prometheus([same, same, "this is { not prometheus", node_text(2, {"b": 1.0})])
    families = {f.name: f for f in text_string_to_metric_families(out)}  # parses back
    assert families["vtfuse_requests"].type == "counter"
    assert families["vtfuse_stage_duration_seconds"].type == "histogram"
    assert metric_value(out, "vtfuse_requests_total") == 4.0  # the duplicated endpoint counted once
