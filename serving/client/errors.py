"""The one exception the clients raise for an API error, with the API's code and the request id."""

from __future__ import annotations

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


def read_image(image: bytes | str | Path) -> bytes:
    """Image file bytes from bytes or a path."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    return Path(image).read_bytes()
