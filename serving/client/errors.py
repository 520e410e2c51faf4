"""The exceptions the clients raise: one `ApiError` base, a narrow subclass per kind of failure.

Each carries the HTTP status (int) or gRPC status name (str), the API's error code and
message, the request id and, for an overload, the server's `Retry-After` in seconds.
"""

from __future__ import annotations

import math
from pathlib import Path


class ApiError(Exception):
    """The API answered with an error (HTTP status or gRPC status, code and message from the error body)."""

    def __init__(
        self,
        status: int | str,
        code: str,
        message: str,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" (request id {request_id})" if request_id else ""))
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.retry_after = retry_after


class BadRequest(ApiError):
    """The request is wrong (HTTP 400/404/405/413/415/422, gRPC INVALID_ARGUMENT...): fix it, do not retry."""


class PayloadTooLarge(BadRequest):
    """Body or pixel count over the server's limits (HTTP 413, gRPC RESOURCE_EXHAUSTED `payload_too_large`)."""


class AuthenticationError(ApiError):
    """Missing or wrong API key (HTTP 401, gRPC UNAUTHENTICATED): pass `api_key=` or set VTFUSE_API_KEY."""


class Overloaded(ApiError):
    """Refused at admission or rate-limited (HTTP 429, gRPC RESOURCE_EXHAUSTED), after the client's retries."""


class Unavailable(ApiError):
    """Triton down, the model not ready or the server draining (HTTP 503, gRPC UNAVAILABLE), after the retries."""


class DeadlineExceeded(ApiError):
    """The request's deadline expired, upstream (HTTP 504) or on the client (gRPC DEADLINE_EXCEEDED)."""


class ServerError(ApiError):
    """The server failed on a valid request (HTTP 500/502, gRPC INTERNAL)."""


class ApiConnectionError(ApiError):
    """No answer at all: connection refused or reset, TLS failure, client-side timeout (after the retries)."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__("connection", "connection_error", message, request_id)

    def __str__(self) -> str:
        return self.message + (f" (request id {self.request_id})" if self.request_id else "")


_HTTP = {401: AuthenticationError, 413: PayloadTooLarge, 429: Overloaded, 503: Unavailable, 504: DeadlineExceeded}
_GRPC = {
    "UNAUTHENTICATED": AuthenticationError,
    "PERMISSION_DENIED": AuthenticationError,
    "RESOURCE_EXHAUSTED": Overloaded,
    "UNAVAILABLE": Unavailable,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "INVALID_ARGUMENT": BadRequest,
    "NOT_FOUND": BadRequest,
    "UNIMPLEMENTED": BadRequest,
    "OUT_OF_RANGE": BadRequest,
    "FAILED_PRECONDITION": BadRequest,
}


def error_class(status: int | str, code: str) -> type[ApiError]:
    """The narrow class for an HTTP status or gRPC status name and the API's error code."""
    if code == "payload_too_large":
        return PayloadTooLarge
    if isinstance(status, int):
        if status in _HTTP:
            return _HTTP[status]
        return BadRequest if 400 <= status < 500 else ServerError
    return _GRPC.get(status, ServerError)


def api_error(
    status: int | str, code: str, message: str, request_id: str | None = None, retry_after: float | None = None
) -> ApiError:
    """An instance of the narrow class `error_class` picks."""
    return error_class(status, code)(status, code, message, request_id, retry_after)


def parse_retry_after(value: str | bytes | None) -> float | None:
    """Seconds from a `Retry-After` value (whole or decimal seconds; an HTTP date is ignored)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def read_image(image: bytes | str | Path) -> bytes:
    """Image file bytes from bytes or a path."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    return Path(image).read_bytes()
