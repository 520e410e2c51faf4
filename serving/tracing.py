"""OpenTelemetry traces: Ray Serve's spans exported over OTLP, a child span per Triton call, `traceparent` to Triton.

Off unless an OTLP endpoint is configured (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
`OTEL_EXPORTER_OTLP_ENDPOINT`, or `vtfuse serve --otlp-endpoint`, which sets the latter).
When on:

- Ray Serve's tracing (`tracing_config` of the Serve config) is enabled with
  `otlp_span_processors` as its exporter: the HTTP and gRPC proxies read the client's W3C
  `traceparent`, start a span in that trace, and the Ingress replica's span is its child;
- each Triton call is a client span under the replica's span (`triton_call`), and its
  `traceparent` goes to Triton as gRPC metadata, so Triton's own spans
  (`--trace-config mode=opentelemetry`, set by `vtfuse serve`) join the same trace.

Spans are exported over OTLP/HTTP (protobuf) with the SDK's batch processor, configured by
the standard `OTEL_*` variables (`OTEL_SERVICE_NAME`, `OTEL_EXPORTER_OTLP_HEADERS`,
`OTEL_BSP_SCHEDULE_DELAY`, ...). Sampling is parent-based: a client's sampled `traceparent`
is always traced; requests without one are sampled at the ratio `OTEL_TRACES_SAMPLER_ARG`
(default 1.0). When off, `triton_call` costs one context lookup.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.propagate import extract, inject

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
EXPORTER_IMPORT_PATH = "serving.tracing:otlp_span_processors"
DEFAULT_SERVICE_NAME = "vtfuse-api"
TRITON_SERVICE_NAME = "vtfuse-triton"

_tracer = trace.get_tracer("serving.triton")
_server_tracer = trace.get_tracer("serving.app")


def otlp_endpoint(env: Mapping[str, str] | None = None) -> str | None:
    """The configured OTLP endpoint (traces-specific first), or None: tracing off."""
    env = os.environ if env is None else env
    for name in ENDPOINT_VARS:
        if env.get(name):
            return env[name]
    return None


def sampling_ratio(env: Mapping[str, str] | None = None) -> float:
    """Head-sampling ratio for requests that arrive without a sampled `traceparent` (`OTEL_TRACES_SAMPLER_ARG`)."""
    env = os.environ if env is None else env
    try:
        return min(1.0, max(0.0, float(env.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))))
    except ValueError:
        return 1.0


def serve_tracing_config(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Ray Serve's `tracing_config` (OTLP export) when an endpoint is configured, else None (tracing off)."""
    if otlp_endpoint(env) is None:
        return None
    return {"enabled": True, "exporter_import_path": EXPORTER_IMPORT_PATH, "sampling_ratio": sampling_ratio(env)}


def otlp_traces_url(endpoint: str) -> str:
    """A base OTLP/HTTP endpoint (http://host:4318) → its traces URL, as the SDK derives it."""
    return endpoint if endpoint.rstrip("/").endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"


def triton_trace_args(
    endpoint: str, ratio: float = 1.0, service_name: str = TRITON_SERVICE_NAME, enabled: bool = True
) -> tuple[str, ...]:
    """`tritonserver` flags exporting its per-request spans to the same OTLP/HTTP endpoint.

    Triton reads the `traceparent` its callers send (HTTP header or gRPC metadata), so its
    spans (`InferRequest`, the model, `compute`) join the caller's trace. Triton samples
    every `rate`-th request: 1 / ratio. `enabled=False` starts with trace level OFF (the
    trace API, `POST /v2/trace/setting`, turns it on at run time).
    """
    url = otlp_traces_url(endpoint)
    for scheme in ("http://", "https://"):
        url = url.removeprefix(scheme)  # Triton's url setting is host:port/path
    rate = max(1, round(1.0 / ratio)) if ratio > 0 else 0
    level = "TIMESTAMPS" if rate and enabled else "OFF"
    return (
        "--trace-config=mode=opentelemetry",
        f"--trace-config=opentelemetry,url={url}",
        f"--trace-config=opentelemetry,resource=service.name={service_name}",
        f"--trace-config=rate={max(rate, 1)}",
        f"--trace-config=level={level}",
    )


def otlp_span_processors() -> list[Any]:
    """Ray Serve's tracing exporter hook (`tracing_config.exporter_import_path`): batch export over OTLP/HTTP.

    Runs in every proxy and replica process; the exporter reads the `OTEL_*` environment.
    """
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    return [BatchSpanProcessor(OTLPSpanExporter())]


@contextmanager
def grpc_server_span(method: str, metadata: Mapping[str, str]) -> Iterator[None]:
    """A server span for a gRPC call whose `traceparent` metadata Ray Serve's gRPC proxy did not carry over.

    Ray Serve (2.60) reads `traceparent` on its gRPC proxy but the replica's span does not
    join the caller's trace; this span does, so the Triton calls under it do too. Nothing
    happens without a `traceparent`, when tracing is off, or when the current span is
    already in the caller's trace.
    """
    carrier = {k: v for k, v in metadata.items() if k in ("traceparent", "tracestate")}
    if "traceparent" not in carrier or isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        yield
        return
    remote = extract(carrier)
    wanted = trace.get_current_span(remote).get_span_context().trace_id
    if trace.get_current_span().get_span_context().trace_id == wanted:
        yield
        return
    with _server_tracer.start_as_current_span(
        f"grpc vtfuse.v1.Vtfuse/{method}",
        context=remote,
        kind=trace.SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": "vtfuse.v1.Vtfuse", "rpc.method": method},
    ):
        yield


@contextmanager
def triton_call(model: str, request_id: str) -> Iterator[dict[str, str] | None]:
    """A client span for one Triton request; yields the gRPC metadata carrying its `traceparent` (None when off)."""
    if not trace.get_current_span().is_recording():
        yield None
        return
    with _tracer.start_as_current_span(
        f"triton {model}",
        kind=trace.SpanKind.CLIENT,
        attributes={"rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService",
                    "rpc.method": "ModelInfer", "triton.model": model, "vtfuse.request_id": request_id},
    ):
        headers: dict[str, str] = {}
        inject(headers)
        yield headers
