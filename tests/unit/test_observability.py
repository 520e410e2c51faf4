"""Tracing, health and log routing without a cluster (the real stack: tests/integration/test_observability.py)."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2
from opentelemetry import trace

from serving import tracing
from serving.app import health
from serving.app.logs import ToServeLogger, serve_logging_config


def test_tracing_is_off_without_an_endpoint_and_on_with_one():
    assert tracing.otlp_endpoint({}) is None and tracing.serve_tracing_config({}) is None
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4318/v1/traces"}
    assert tracing.otlp_endpoint(env) == "http://t:4318/v1/traces"  # the traces-specific variable wins
    cfg = tracing.serve_tracing_config({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert cfg == {"enabled": True, "exporter_import_path": tracing.EXPORTER_IMPORT_PATH, "sampling_ratio": 1.0}
    assert tracing.sampling_ratio({"OTEL_TRACES_SAMPLER_ARG": "0.1"}) == 0.1
    assert tracing.sampling_ratio({"OTEL_TRACES_SAMPLER_ARG": "junk"}) == 1.0
    processors = tracing.otlp_span_processors()  # what Ray Serve's exporter hook returns
    assert len(processors) == 1
    processors[0].shutdown()


def test_triton_trace_args():
    args = tracing.triton_trace_args("http://collector:4318", ratio=0.1)
    assert "--trace-config=mode=opentelemetry" in args
    assert "--trace-config=opentelemetry,url=collector:4318/v1/traces" in args
    assert "--trace-config=rate=10" in args and "--trace-config=level=TIMESTAMPS" in args
    assert "--trace-config=opentelemetry,resource=service.name=vtfuse-triton" in args
    off = tracing.triton_trace_args("http://collector:4318/v1/traces", enabled=False)
    assert "--trace-config=level=OFF" in off and "--trace-config=opentelemetry,url=collector:4318/v1/traces" in off


def test_triton_call_is_free_when_not_tracing_and_a_child_span_with_traceparent_when_tracing():
    with tracing.triton_call("fusion", "rid-1") as headers:
        assert headers is None  # no recording span: no span, no metadata

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # as Ray Serve's setup_tracing does in a replica
    with provider.get_tracer("test").start_as_current_span("replica", kind=trace.SpanKind.SERVER) as server:
        with tracing.triton_call("fusion", "rid-1") as headers:
            assert headers is not None
            call = trace.get_current_span()
        ctx = server.get_span_context()
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert trace_id == f"{ctx.trace_id:032x}" and span_id == f"{call.get_span_context().span_id:016x}"
    assert int(flags, 16) & 1  # sampled
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["triton fusion"].parent.span_id == ctx.span_id
    assert spans["triton fusion"].kind == trace.SpanKind.CLIENT
    assert spans["triton fusion"].attributes["vtfuse.request_id"] == "rid-1"


class FakeContext:
    def __init__(self) -> None:
        self.code = None
        self.details = ""

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


def test_health_check_answers():
    async def ready() -> bool:
        return True

    async def not_ready() -> bool:
        return False

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert health.API_SERVICE == "vtfuse.v1.Vtfuse"
    for service in ("", "vtfuse.v1.Vtfuse"):
        assert asyncio.run(health.check(service, False, ready)).status == serving
        assert asyncio.run(health.check(service, True, ready)).status == not_serving  # draining
        assert asyncio.run(health.check(service, False, not_ready)).status == not_serving
    ctx = FakeContext()
    asyncio.run(health.check("other.Service", False, ready, ctx))
    assert ctx.code == grpc.StatusCode.NOT_FOUND and "other.Service" in ctx.details


def test_serving_logs_are_handed_to_ray_serves_logger():
    records: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record):
            records.append(record)

    serve_logger = logging.getLogger("ray.serve")
    capture = Capture()
    serve_logger.addHandler(capture)
    ours = logging.getLogger("serving.test_observability")
    handler = ToServeLogger()
    ours.addHandler(handler)
    ours.propagate = False
    try:
        ours.warning("hello %s", "there")
    finally:
        ours.removeHandler(handler)
        serve_logger.removeHandler(capture)
    assert [r.getMessage() for r in records] == ["hello there"]
    assert records[0].name == "serving.test_observability"
    assert serve_logging_config("json") == {"encoding": "JSON", "log_level": "INFO",
                                            "additional_log_standard_attrs": ["name"]}
