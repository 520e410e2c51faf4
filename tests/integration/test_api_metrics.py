"""/metrics aggregated over replicas (two ingress replicas in the fixture) and request ids in the replicas' logs."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import fresh_samples, metric_value

pytestmark = pytest.mark.integration


def scrape_api(url: str) -> str:
    r = httpx.get(url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


def wait_for(url: str, predicate, timeout: float = 20.0) -> str:
    """Ray exports replica metrics every second or so: poll until the predicate holds."""
    deadline = time.monotonic() + timeout
    text = scrape_api(url)
    while not predicate(text) and time.monotonic() < deadline:
        time.sleep(0.5)
        text = scrape_api(url)
    return text


def settled(url: str, value, quiet_s: float = 3.0, timeout: float = 30.0) -> str:
    """A scrape after `value(text)` stayed unchanged for `quiet_s`: earlier tests' requests are all exported."""
    deadline = time.monotonic() + timeout
    text = scrape_api(url)
    last, since = value(text), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        text = scrape_api(url)
        if value(text) != last:
            last, since = value(text), time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return text


def test_request_counts_by_route_and_status_sum_over_replicas(serve_app):
    url = serve_app.http_url
    labels = {"application": "vtfuse", "route": "/v1/embed", "protocol": "http"}

    def count(text: str, status: str | None = None) -> float:
        return metric_value(text, "vtfuse_requests_total", **labels, **({"status": status} if status else {}))

    before = settled(url, count)
    ok0, bad0 = count(before, "200"), count(before, "422")
    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(24):
            assert c.post("/v1/embed", json={"texts": ["a red circle"]}).status_code == 200
        for _ in range(3):
            assert c.post("/v1/embed", json={}).status_code == 422

    text = wait_for(url, lambda t: count(t, "200") - ok0 >= 24 and count(t, "422") - bad0 >= 3)
    assert count(text, "200") - ok0 == 24
    assert count(text, "422") - bad0 == 3
    replicas = {
        line.split('replica="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("vtfuse_requests_total{") and 'application="vtfuse",deployment="Ingress"' in line
    }
    assert len(replicas) == 2, f"expected series from both ingress replicas, got {replicas}"


def test_stage_latency_histograms_and_batch_sizes(serve_app):
    url = serve_app.http_url
    img, qa, _ = fresh_samples(1, seed=2)[0]
    before = scrape_api(url)
    n0 = metric_value(before, "vtfuse_preprocess_batch_size_count")
    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(5):
            r = c.post("/v1/vqa", json={"image": base64.b64encode(img).decode(), "questions": [qa.question]})
            assert r.status_code == 200
    text = wait_for(url, lambda t: metric_value(t, "vtfuse_preprocess_batch_size_count") >= n0 + 1)
    assert "# TYPE vtfuse_request_duration_seconds histogram" in text
    assert "# TYPE vtfuse_requests_total counter" in text
    for stage in ("decode", "tokenize", "preprocess", "triton"):
        assert metric_value(text, "vtfuse_stage_duration_seconds_count", stage=stage) > 0, stage
    for engine in ("image_encoder", "text_encoder", "fusion"):
        assert metric_value(text, "vtfuse_triton_request_duration_seconds_count", engine=engine) > 0, engine
        assert metric_value(text, "vtfuse_triton_tensor_bytes_total", engine=engine, direction="sent") > 0
    assert metric_value(text, "vtfuse_request_duration_seconds_count", route="/v1/vqa") > 0
    batches = metric_value(text, "vtfuse_preprocess_batches_total")
    batched = metric_value(text, "vtfuse_preprocess_batched_requests_total")
    assert batches == metric_value(text, "vtfuse_preprocess_batch_size_count") and batched >= batches
    # Ray's histogram _sum comes from bucket midpoints: half-integer buckets make it exact for sizes ≤ 16
    assert metric_value(text, "vtfuse_preprocess_batch_size_sum") == pytest.approx(batched)
    assert "ray_" not in text and "WorkerId" not in text


def test_request_id_is_in_every_replica_log_line_about_the_request(serve_app):
    import ray

    rid = f"trace-me-{int(time.time())}"
    r = httpx.post(
        serve_app.http_url + "/v1/match",
        json={
            "image": base64.b64encode(fresh_samples(1, seed=4)[0][0]).decode(),
            "texts": ["a red circle", "circle " * 40],
        },  # the second text is refused in Preprocess
        headers={"X-Request-ID": rid},
        timeout=30,
    )
    assert r.status_code == 422 and r.headers["x-request-id"] == rid
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    deadline = time.monotonic() + 15
    hits: list[str] = []
    while time.monotonic() < deadline:
        hits = [
            line
            for f in logs.rglob("*")
            if f.is_file() and f.suffix in (".err", ".out", ".log")
            for line in f.read_text(errors="replace").splitlines()
            if rid in line
        ]
        if any("serving.app.http_api" in h for h in hits) and any("serving.app.preprocess" in h for h in hits):
            break
        time.sleep(0.5)
    ours = [h for h in hits if "serving.app." in h]  # TEXT or JSON lines (the session stack logs JSON)
    assert any("serving.app.http_api" in h for h in ours), hits
    assert any("serving.app.preprocess" in h for h in ours), hits
    assert all(f"request_id={rid}" in h or rid in h for h in ours)
