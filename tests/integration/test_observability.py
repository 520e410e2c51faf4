"""Observability on the session stack: JSON logs with the request id, OTLP traces end to end, gRPC health.

The session stack (tests/integration/conftest.py) runs with Serve's `logging_config` in JSON,
Ray Serve tracing exporting over OTLP/HTTP to a real receiver (tests/otlp.py) and Triton in
OpenTelemetry trace mode pointed at the same receiver (trace level OFF until a test turns it on).
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.proto import vtfuse_pb2 as pb
from serving.proto import vtfuse_pb2_grpc as pb_grpc
from tests.helpers import fresh_samples
from tests.otlp import OtlpReceiver, Span

pytestmark = pytest.mark.integration

SERVICE = "vtfuse-api-test"  # OTEL_SERVICE_NAME of the session stack
TRITON_SERVICE = "vtfuse-triton"


def _serve_log_lines(rid: str) -> list[dict]:
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    out = []
    for f in logs.glob("*.log"):
        for line in f.read_text(errors="replace").splitlines():
            if rid in line and line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out


def test_json_log_lines_carry_the_callers_request_id(serve_app):
    rid = f"json-log-{secrets.token_hex(6)}"
    image = base64.b64encode(fresh_samples(1, seed=31)[0][0]).decode()
    r = httpx.post(serve_app.http_url + "/v1/vqa", json={"image": image, "questions": ["how many shapes are there?"]},
                   headers={"X-Request-ID": rid}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == rid

    def ours(lines: list[dict]) -> list[dict]:
        return [d for d in lines if d.get("name", "").startswith("serving.app.")]

    def serves(lines: list[dict]) -> list[dict]:
        return [d for d in lines if d.get("name") is None or d.get("name", "").startswith("ray.serve")]

    # Both lines are written after the answer went out (Serve's access line last), so wait for both.
    deadline = time.monotonic() + 30
    lines: list[dict] = []
    while time.monotonic() < deadline:
        lines = [d for d in _serve_log_lines(rid) if d.get("request_id") == rid]
        if ours(lines) and serves(lines):
            break
        time.sleep(0.5)
    assert ours(lines), f"no JSON line of ours with request_id {rid}; lines with it: {lines}"
    line = ours(lines)[0]
    assert line["deployment"].endswith("Ingress") and line["application"] == "vtfuse" and line["route"] == "/"
    assert line["levelname"] == "INFO" and "/v1/vqa" in line["message"]
    # Serve's own access log line for the request, same format, same id.
    assert serves(lines), f"no access line of Serve's with request_id {rid}; lines with it: {lines}"


@pytest.fixture
def triton_tracing(serve_app) -> Iterator[None]:
    """Triton's trace level TIMESTAMPS (every request) for one test, OFF again after it."""
    client = httpclient.InferenceServerClient(serve_app.triton.url_http.removeprefix("http://"))
    client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "1"})
    try:
        yield
    finally:
        client.update_trace_settings(settings={"trace_level": ["OFF"]})
        client.close()


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def _root_of(span: Span, by_id: dict[str, Span]) -> Span:
    while span.parent_span_id in by_id:
        span = by_id[span.parent_span_id]
    return span


def _check_trace(rx: OtlpReceiver, trace_id: str, parent_id: str) -> None:
    def complete() -> list[Span] | None:
        spans = rx.trace(trace_id)
        by_id = {s.span_id: s for s in spans}
        ours = [s for s in spans if s.service == SERVICE]
        triton_calls = [s for s in ours if s.name.startswith("triton ")]
        triton_side = [s for s in spans if s.service == TRITON_SERVICE]
        called = {s.span_id for s in triton_calls}
        # The server spans end last, after their children: they can reach the receiver in a later export
        # batch, so wait until every Triton call's chain goes up to a child of the caller's span.
        if (triton_calls and any(s.parent_span_id in called for s in triton_side)
                and all(_root_of(c, by_id).parent_span_id == parent_id for c in triton_calls)):
            return spans
        return None

    spans: list[Span] = rx.wait_for(  # type: ignore[assignment]
        f"trace {trace_id}: API server, Triton-call and Triton spans, one chain", complete)
    by_id = {s.span_id: s for s in spans}
    # Our first spans are server spans, children of the caller's span: behind HAProxy, the replica's HTTP
    # server span and Serve's request-handling span side by side; behind Ray's proxy, the proxy's span.
    entry = [s for s in spans if s.parent_span_id == parent_id]
    assert entry and all(s.service == SERVICE and s.kind == 2 for s in entry), [  # SPAN_KIND_SERVER
        (s.name, s.kind, s.service) for s in entry]
    # Every Triton call span descends from one of them (→ Ingress replica → Triton call).
    for call in (s for s in spans if s.name.startswith("triton ")):
        assert call.kind == 3  # SPAN_KIND_CLIENT
        assert _root_of(call, by_id) in entry, call
    # Triton's own spans: InferRequest under our call span, the model and compute spans under it.
    triton_side = [s for s in spans if s.service == TRITON_SERVICE]
    assert {"InferRequest", "compute"} <= {s.name for s in triton_side}, triton_side
    roots = [s for s in triton_side if s.name == "InferRequest"]
    assert all(by_id[r.parent_span_id].name.startswith("triton ") for r in roots), roots


def test_http_traceparent_reaches_triton_in_one_trace(serve_app, otlp_receiver, triton_tracing):
    traceparent, trace_id, parent_id = _traceparent()
    image = base64.b64encode(fresh_samples(1, seed=32)[0][0]).decode()
    r = httpx.post(serve_app.http_url + "/v1/vqa",  # two questions: the engines run from the ingress
                   json={"image": image, "questions": ["how many shapes are there?", "is there a red circle?"]},
                   headers={"traceparent": traceparent}, timeout=30)
    assert r.status_code == 200, r.text
    _check_trace(otlp_receiver, trace_id, parent_id)
    names = {s.name for s in otlp_receiver.trace(trace_id)}
    assert {"triton image_encoder", "triton text_encoder", "triton fusion"} <= names, names


def test_grpc_traceparent_reaches_triton_in_one_trace(serve_app, otlp_receiver, triton_tracing):
    traceparent, trace_id, parent_id = _traceparent()
    with grpc.insecure_channel(serve_app.grpc_target) as channel:
        stub = pb_grpc.VtfuseStub(channel)
        stub.Match(pb.MatchRequest(image=fresh_samples(1, seed=33)[0][0], texts=["a red circle", "a blue square"]),
                   metadata=[("traceparent", traceparent)], timeout=30)
    _check_trace(otlp_receiver, trace_id, parent_id)


def test_untraced_requests_send_no_spans(serve_app, otlp_receiver):
    """Sampling ratio 0 here: a request without a sampled traceparent leaves no trace."""
    traceparent, trace_id, _ = _traceparent()
    image = base64.b64encode(fresh_samples(1, seed=34)[0][0]).decode()
    r = httpx.post(serve_app.http_url + "/v1/vqa", json={"image": image, "questions": ["how many shapes are there?"]},
                   headers={"traceparent": traceparent[:-2] + "00"}, timeout=30)  # flags 00: not sampled
    assert r.status_code == 200
    time.sleep(1.5)
    assert otlp_receiver.trace(trace_id) == []


def test_grpc_health_service(serve_app):
    with grpc.insecure_channel(serve_app.grpc_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "vtfuse.v1.Vtfuse"):
            r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert r.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        watched = list(stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10))
        assert [w.status for w in watched] == [health_pb2.HealthCheckResponse.SERVING]
