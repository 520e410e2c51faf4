"""Narrow error classes for the whole service, each with its HTTP and gRPC status in one place."""

from __future__ import annotations


class VtfuseError(Exception):
    """Base error: `code` is the stable machine-readable string in the JSON error body."""

    code = "internal"
    http_status = 500
    grpc_status = "INTERNAL"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class InvalidInput(VtfuseError):
    """Malformed request: bad JSON, bad base64, wrong types (HTTP 400)."""

    code = "invalid_input"
    http_status = 400
    grpc_status = "INVALID_ARGUMENT"


class InvalidJson(InvalidInput):
    """A body that is not valid JSON, or not a JSON object (HTTP 400)."""

    code = "invalid_json"


class InvalidBase64(InvalidInput):
    """An image field that is not valid base64 (HTTP 400)."""

    code = "invalid_base64"


class NotFound(VtfuseError):
    """No such route (HTTP 404)."""

    code = "not_found"
    http_status = 404
    grpc_status = "NOT_FOUND"


class MethodNotAllowed(VtfuseError):
    """The route exists but not with this HTTP method (HTTP 405)."""

    code = "method_not_allowed"
    http_status = 405
    grpc_status = "UNIMPLEMENTED"


class PayloadTooLarge(VtfuseError):
    """Body or pixel count over the configured limits (HTTP 413)."""

    code = "payload_too_large"
    http_status = 413
    grpc_status = "RESOURCE_EXHAUSTED"


class UnsupportedMediaType(VtfuseError):
    """Bytes that are not a PNG, JPEG or WebP image, or a truncated one (HTTP 415)."""

    code = "unsupported_media_type"
    http_status = 415
    grpc_status = "INVALID_ARGUMENT"


class SchemaViolation(VtfuseError):
    """Well-formed but invalid request: empty lists, text over the token limit, unknown fields (HTTP 422)."""

    code = "schema_violation"
    http_status = 422
    grpc_status = "INVALID_ARGUMENT"


class UnknownModel(SchemaViolation):
    """A `model` field naming a preset or version that is not served (HTTP 422)."""

    code = "unknown_model"


class TaskNotSupported(SchemaViolation):
    """The request's task (vqa, match, retrieve, embed) is not one the chosen model has."""

    code = "task_not_supported"


class Unauthorized(VtfuseError):
    """Missing or wrong API key (HTTP 401)."""

    code = "unauthorized"
    http_status = 401
    grpc_status = "UNAUTHENTICATED"


class Overloaded(VtfuseError):
    """Refused at admission: too many requests in flight or queued (HTTP 429)."""

    code = "overloaded"
    http_status = 429
    grpc_status = "RESOURCE_EXHAUSTED"


class RateLimited(Overloaded):
    """This API key (or client address) sent more requests than its rate limit allows (HTTP 429)."""

    code = "rate_limited"


class UpstreamUnavailable(VtfuseError):
    """Triton is down, not ready or refusing (HTTP 503)."""

    code = "upstream_unavailable"
    http_status = 503
    grpc_status = "UNAVAILABLE"


class ShuttingDown(UpstreamUnavailable):
    """The server is draining for a graceful shutdown: new requests are refused (HTTP 503)."""

    code = "shutting_down"


class UpstreamError(VtfuseError):
    """Triton answered with an error that is not the caller's fault (HTTP 502)."""

    code = "upstream_error"
    http_status = 502
    grpc_status = "INTERNAL"


class UpstreamTimeout(VtfuseError):
    """An admitted request's deadline expired upstream (HTTP 504)."""

    code = "upstream_timeout"
    http_status = 504
    grpc_status = "DEADLINE_EXCEEDED"


def error_body(err: VtfuseError) -> dict[str, dict[str, str]]:
    """The one JSON error shape the API returns for every error."""
    return {"error": {"code": err.code, "message": err.message}}


def error_headers(err: VtfuseError) -> dict[str, str]:
    """HTTP headers an error response carries: `Retry-After` (whole seconds) when the caller should retry."""
    if err.retry_after is None:
        return {}
    return {"Retry-After": str(max(1, int(round(err.retry_after))))}


def _subclasses(cls: type[VtfuseError]) -> list[type[VtfuseError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _subclasses(sub)
    return out


def error_from_code(code: str, message: str, retry_after: float | None = None) -> VtfuseError:
    """The error class whose `code` this is (a Triton model's `vtfuse:<code>: message` → the same API error)."""
    for cls in _subclasses(VtfuseError):
        if cls.code == code:
            return cls(message, retry_after=retry_after)
    return VtfuseError(message, retry_after=retry_after)
