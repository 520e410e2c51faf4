"""What the four clients' caption calls share: the generation parameters, the SSE event reader, the stream iterators.

A stream is lazy: the request goes out when the first event is asked for. Closing it (`close()`,
leaving its `with` block, or dropping it after `break`) closes the HTTP response or cancels the
gRPC call, which is how the server learns to free the request's decoder slot.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Generator, Mapping
from typing import Any, Literal, TypedDict

from serving.client.errors import ApiConnectionError, ApiError, ServerError, api_error
from serving.client.results import CaptionEvent, CaptionResult
from serving.client.retry import retryable_http


class GenerationParameters(TypedDict, total=False):
    """Keyword arguments of `caption` and `caption_stream`; one left out (or None) takes the checkpoint's default.

    Only the ones given are sent; the server checks their values (422 / INVALID_ARGUMENT).
    """

    max_new_tokens: int | None
    min_new_tokens: int | None
    num_beams: int | None
    do_sample: bool | None
    temperature: float | None
    top_k: int | None
    top_p: float | None
    repetition_penalty: float | None
    no_repeat_ngram_size: int | None
    length_penalty: float | None
    early_stopping: bool | Literal["never"] | None
    seed: int | None


GENERATION_PARAMETERS: tuple[str, ...] = tuple(GenerationParameters.__annotations__)


def generation_parameters(params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters that were given (not None); a name that is none of them is a TypeError, as for any call."""
    unknown = sorted(set(params) - set(GENERATION_PARAMETERS))
    if unknown:
        raise TypeError(f"unknown generation parameter {unknown[0]!r}; they are: {', '.join(GENERATION_PARAMETERS)}")
    return {k: v for k, v in params.items() if v is not None}


# An error event has the API's code but no status of its own (the stream answered 200): each
# gets the HTTP status the same error has before a stream (serving/errors.py), so the same
# narrow ApiError class is raised either way.
_CODE_STATUS = {
    "invalid_input": 400,
    "invalid_json": 400,
    "invalid_base64": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "schema_violation": 422,
    "unknown_model": 422,
    "task_not_supported": 422,
    "overloaded": 429,
    "rate_limited": 429,
    "upstream_error": 502,
    "upstream_unavailable": 503,
    "shutting_down": 503,
    "upstream_timeout": 504,
}


def event_error(error: Any, request_id: str | None) -> ApiError:
    """The narrow ApiError of a stream's `{"error": {"code", "message"}}` event."""
    code = str(error.get("code") or "internal") if isinstance(error, dict) else "internal"
    message = str(error.get("message") or "") if isinstance(error, dict) else str(error)
    return api_error(_CODE_STATUS.get(code, 500), code, message, request_id)


def retryable_stream_error(err: ApiError) -> bool:
    """Whether a stream that failed before its first event may be tried again (a lost connection, 429, 503)."""
    return isinstance(err, ApiConnectionError) or (isinstance(err.status, int) and retryable_http(err.status))


class EventReader:
    """Reads `text/event-stream` lines into CaptionEvents: the JSON of each event's `data:` lines.

    Comments (`:` lines) and the other SSE fields are ignored; an `error` event is raised as its ApiError.
    """

    def __init__(self, request_id: str | None) -> None:
        self.request_id = request_id
        self.events = 0
        self._data: list[str] = []

    def feed(self, line: str) -> CaptionEvent | None:
        """The event a line completes (a blank line ends one), else None."""
        if line:
            name, _, value = line.partition(":")
            if name == "data":
                self._data.append(value[1:] if value.startswith(" ") else value)
            return None
        if not self._data:
            return None
        text, self._data = "\n".join(self._data), []
        try:
            obj = json.loads(text)
        except ValueError:
            raise ServerError("stream", "invalid_event", f"a stream event is not JSON: {text[:200]!r}") from None
        if isinstance(obj, dict) and "error" in obj:
            raise event_error(obj["error"], self.request_id)
        try:
            event = CaptionEvent.from_json(obj, self.request_id)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ServerError("stream", "invalid_event", f"not a caption event: {text[:200]!r}") from None
        self.events += 1
        return event

    def incomplete(self) -> ApiError:
        """The error of a stream that ended without its last event (a proxy or the network cut it)."""
        return ApiConnectionError(f"the stream ended after {self.events} events, before its last", self.request_id)


class CaptionStream:
    """The events of one streamed caption, in order; the last one carries the whole `CaptionResult`.

    Iterate it (once). `close()`, leaving its `with` block, or dropping it (a `for` loop over the
    call that breaks) ends the request: the HTTP response is closed, the gRPC call cancelled.
    `result` is the `CaptionResult` once the last event has been read.
    """

    def __init__(self, events: Generator[CaptionEvent, None, None]) -> None:
        self._events = events
        self.result: CaptionResult | None = None

    def __iter__(self) -> CaptionStream:
        return self

    def __next__(self) -> CaptionEvent:
        event = next(self._events)
        if event.result is not None:
            self.result = event.result
        return event

    def close(self) -> None:
        """Stop reading: close the HTTP response or cancel the gRPC call (nothing when it already ended)."""
        self._events.close()

    def __enter__(self) -> CaptionStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncCaptionStream:
    """The async `CaptionStream`: `async for event in stream`, `await stream.aclose()`, `async with`."""

    def __init__(self, events: AsyncGenerator[CaptionEvent, None]) -> None:
        self._events = events
        self.result: CaptionResult | None = None

    def __aiter__(self) -> AsyncCaptionStream:
        return self

    async def __anext__(self) -> CaptionEvent:
        event = await self._events.__anext__()
        if event.result is not None:
            self.result = event.result
        return event

    async def aclose(self) -> None:
        """Stop reading: close the HTTP response or cancel the gRPC call (nothing when it already ended)."""
        await self._events.aclose()

    async def __aenter__(self) -> AsyncCaptionStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
