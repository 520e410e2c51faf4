"""Error mapping: Triton/gRPC failures → serving.errors, errors → HTTP statuses, gRPC codes and headers."""

from __future__ import annotations

import asyncio
import pickle
import types

import grpc
import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from serving.app import grpc_api
from serving.app.metrics import ApiMetrics
from serving.errors import (
    InvalidBase64,
    InvalidInput,
    InvalidJson,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    SchemaViolation,
    UnknownModel,
    UnsupportedMediaType,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    VtfuseError,
    error_body,
    error_headers,
)
from serving.proto import vtfuse_pb2 as pb
from serving.triton.client import TritonClient, TritonClientSettings, channel_args, map_triton_error
from tests.unit.app_fakes import make_args, make_checkpoint, make_pipeline


def tse(status: str, msg: str) -> InferenceServerException:
    return InferenceServerException(msg=msg, status=f"StatusCode.{status}")


@pytest.mark.parametrize(
    "exc, cls, status",
    [
        (tse("UNAVAILABLE", "failed to connect to all addresses"), UpstreamUnavailable, 503),
        (tse("UNAVAILABLE", "Exceeds maximum queue size"), Overloaded, 429),
        (tse("UNAVAILABLE", "Request timeout expired"), UpstreamTimeout, 504),
        (tse("DEADLINE_EXCEEDED", "Deadline Exceeded"), UpstreamTimeout, 504),
        (tse("RESOURCE_EXHAUSTED", "too many requests"), Overloaded, 429),
        (tse("INVALID_ARGUMENT", "unexpected shape for input 'PIXELS'"), InvalidInput, 400),
        (tse("NOT_FOUND", "Request for unknown model: 'x' is not found"), UpstreamUnavailable, 503),
        (tse("INTERNAL", "engine failed: boom"), UpstreamError, 502),
        (asyncio.TimeoutError(), UpstreamTimeout, 504),
        (RuntimeError("weird"), UpstreamError, 502),
    ],
)
def test_triton_errors_map_to_service_errors(exc, cls, status):
    err = map_triton_error(exc, "fusion")
    assert type(err) is cls and err.http_status == status and "fusion" in err.message


def test_retryable_upstream_errors_carry_retry_after():
    assert map_triton_error(tse("UNAVAILABLE", "connection refused"), "m").retry_after == 1.0
    assert map_triton_error(tse("RESOURCE_EXHAUSTED", "x"), "m").retry_after == 1.0
    assert error_headers(Overloaded("x", retry_after=1.0)) == {"Retry-After": "1"}
    assert error_headers(Overloaded("x", retry_after=0.2)) == {"Retry-After": "1"}
    assert error_headers(SchemaViolation("x")) == {}


@pytest.mark.parametrize(
    "cls, http, grpc_name, code",
    [
        (InvalidJson, 400, "INVALID_ARGUMENT", "invalid_json"),
        (InvalidBase64, 400, "INVALID_ARGUMENT", "invalid_base64"),
        (PayloadTooLarge, 413, "RESOURCE_EXHAUSTED", "payload_too_large"),
        (UnsupportedMediaType, 415, "INVALID_ARGUMENT", "unsupported_media_type"),
        (SchemaViolation, 422, "INVALID_ARGUMENT", "schema_violation"),
        (UnknownModel, 422, "INVALID_ARGUMENT", "unknown_model"),
        (Overloaded, 429, "RESOURCE_EXHAUSTED", "overloaded"),
        (UpstreamUnavailable, 503, "UNAVAILABLE", "upstream_unavailable"),
        (UpstreamTimeout, 504, "DEADLINE_EXCEEDED", "upstream_timeout"),
        (NotFound, 404, "NOT_FOUND", "not_found"),
        (MethodNotAllowed, 405, "UNIMPLEMENTED", "method_not_allowed"),
    ],
)
def test_one_map_to_http_and_grpc(cls, http, grpc_name, code):
    err = cls("msg")
    assert (err.http_status, err.code) == (http, code)
    assert grpc_api.grpc_code(err) == getattr(grpc.StatusCode, grpc_name)
    assert error_body(err) == {"error": {"code": code, "message": "msg"}}


def test_errors_survive_pickling_with_retry_after():
    # Errors cross Ray process boundaries (the Preprocess deployment returns them).
    err = pickle.loads(pickle.dumps(Overloaded("full", retry_after=2.0)))
    assert isinstance(err, Overloaded) and err.message == "full" and err.retry_after == 2.0


def test_channel_args_cap_reconnect_backoff():
    args = dict(channel_args(TritonClientSettings(max_reconnect_backoff_ms=1500)))
    assert args["grpc.max_reconnect_backoff_ms"] == 1500
    assert args["grpc.initial_reconnect_backoff_ms"] <= args["grpc.max_reconnect_backoff_ms"]
    assert args["grpc.min_reconnect_backoff_ms"] <= args["grpc.max_reconnect_backoff_ms"]


class _StubClient:
    """Stands in for tritonclient.grpc.aio.InferenceServerClient."""

    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors
        self.seen: list[dict] = []

    async def infer(self, model, inputs, **kw):
        self.seen.append({"model": model, **kw})
        if self.errors:
            raise self.errors.pop(0)
        return types.SimpleNamespace(as_numpy=lambda name: np.zeros((1, 2), np.float32))


def _client_with(stub: _StubClient, **settings) -> TritonClient:
    c = TritonClient(TritonClientSettings(**settings))
    c._pool = lambda: [stub]  # type: ignore[method-assign]
    return c


def test_client_passes_request_id_deadline_and_queue_timeout():
    stub = _StubClient([])
    client = _client_with(stub)

    async def main():
        import time

        return await client.infer(
            "fusion", {"X": np.zeros((1, 3), np.float32)}, ["Y"], deadline=time.monotonic() + 2.0, request_id="abc"
        )

    out = asyncio.run(main())
    assert out["Y"].shape == (1, 2)
    (call,) = stub.seen
    assert call["request_id"] == "abc" and 0 < call["client_timeout"] <= 2.0
    assert 0 < call["timeout"] <= 2_000_000  # Triton's queue timeout in µs
    assert client.stats.sent == 12 and client.stats.received == 8


def test_client_retries_connection_errors_once_but_never_a_full_queue():
    import time

    stub = _StubClient([tse("UNAVAILABLE", "Socket closed")])
    out = asyncio.run(_client_with(stub).infer("m", {"X": np.zeros((1,))}, ["Y"], deadline=time.monotonic() + 2))
    assert "Y" in out and len(stub.seen) == 2
    stub = _StubClient([tse("UNAVAILABLE", "Exceeds maximum queue size")])
    with pytest.raises(Overloaded):
        asyncio.run(_client_with(stub).infer("m", {"X": np.zeros((1,))}, ["Y"], deadline=time.monotonic() + 2))
    assert len(stub.seen) == 1


def test_client_refuses_an_expired_deadline_without_calling():
    import time

    stub = _StubClient([])
    with pytest.raises(UpstreamTimeout):
        asyncio.run(_client_with(stub).infer("m", {"X": np.zeros((1,))}, ["Y"], deadline=time.monotonic() - 1))
    assert stub.seen == []


class _GrpcContext:
    def __init__(self):
        self.code = self.details = None
        self.trailing = []

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, md):
        self.trailing = md


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    return make_args(make_checkpoint(tmp_path_factory.mktemp("ckpt")))


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (250, 250, 250)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "method, request_, code, error_code",
    [
        (
            "Vqa",
            pb.VqaRequest(image=b"junk", questions=["q"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unsupported_media_type",
        ),
        ("Vqa", pb.VqaRequest(image=_png(), questions=[]), grpc.StatusCode.INVALID_ARGUMENT, "schema_violation"),
        (
            "Vqa",
            pb.VqaRequest(image=_png(), questions=["q"] * 33),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "payload_too_large",
        ),
        (
            "Match",
            pb.MatchRequest(image=_png(), texts=["a"], model="huge"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown_model",
        ),
        (
            "Retrieve",
            pb.RetrieveRequest(image=_png(), texts=["a"], text="b"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "schema_violation",
        ),
        ("Embed", pb.EmbedRequest(), grpc.StatusCode.INVALID_ARGUMENT, "schema_violation"),
    ],
)
def test_grpc_errors_become_status_codes(args, method, request_, code, error_code):
    pipeline, _ = make_pipeline(args)
    ctx = _GrpcContext()
    out = asyncio.run(grpc_api.handle(method, request_, ctx, pipeline, args, ApiMetrics(), "rid-1"))
    assert out == grpc_api.EMPTY[method]()
    assert ctx.code == code and ctx.details.startswith(error_code)
    assert ("request_id", "rid-1") in ctx.trailing and ("error-code", error_code) in ctx.trailing


def test_grpc_upstream_unavailable_is_unavailable_with_retry_after(args):
    pipeline, fake = make_pipeline(args)
    fake.error = UpstreamUnavailable("Triton is unavailable", retry_after=1.0)
    ctx = _GrpcContext()
    asyncio.run(
        grpc_api.handle("Vqa", pb.VqaRequest(image=_png(), questions=["q"]), ctx, pipeline, args, ApiMetrics(), None)
    )
    assert ctx.code == grpc.StatusCode.UNAVAILABLE and ("retry-after", "1") in ctx.trailing


def test_grpc_success_converts_every_field(args):
    pipeline, fake = make_pipeline(args)
    req = pb.VqaRequest(image=_png(), questions=["how many circles are there?"], top_k=3, return_attention=True)
    resp = asyncio.run(grpc_api.handle("Vqa", req, _GrpcContext(), pipeline, args, ApiMetrics(), "r"))
    (a,) = resp.answers
    assert a.question == "how many circles are there?" and len(a.top_k) == 3
    assert a.attention.rows == 8 and a.attention.cols == 8 and len(a.attention.values) == 64
    assert a.tokens[0] == "[CLS]" and a.tokens[-1] == "[SEP]" and "circles" in a.tokens
    assert all(c[3] == "r" for c in fake.calls)  # the request id reached every Triton call
    assert isinstance(VtfuseError("x"), Exception)


def test_grpc_api_key_is_checked_when_configured(tmp_path):
    args = make_args(make_checkpoint(tmp_path / "c"), api_keys=["k1"])
    pipeline, _ = make_pipeline(args)
    req = pb.EmbedRequest(texts=["a red circle"])
    ctx = _GrpcContext()
    asyncio.run(grpc_api.handle("Embed", req, ctx, pipeline, args, ApiMetrics(), None, api_key=None))
    assert ctx.code == grpc.StatusCode.UNAUTHENTICATED and ctx.details.startswith("unauthorized")
    ctx = _GrpcContext()
    out = asyncio.run(grpc_api.handle("Embed", req, ctx, pipeline, args, ApiMetrics(), None, api_key="k1"))
    assert ctx.code is None and len(out.text_embeddings) == 1
