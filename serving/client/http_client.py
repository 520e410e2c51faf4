"""HTTP clients (httpx): `VtfuseClient` (sync) and `AsyncVtfuseClient`, one method per API call, typed results.

Both send the API key (`X-API-Key`), verify TLS against the system's or a given CA, retry
429/503 and failed connections with capped, jittered exponential backoff that honours
`Retry-After`, and raise the narrow `ApiError` subclasses of `serving.client.errors`.
`caption_stream` reads the `text/event-stream` answer line by line as it arrives.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from serving.client.captions import (
    AsyncCaptionStream,
    CaptionStream,
    EventReader,
    GenerationParameters,
    generation_parameters,
    retryable_stream_error,
)
from serving.client.errors import (
    ApiConnectionError,
    ApiError,
    DeadlineExceeded,
    api_error,
    parse_retry_after,
    read_image,
)
from serving.client.results import (
    CaptionEvent,
    CaptionResult,
    EmbedResult,
    MatchResult,
    ModelList,
    RetrieveResult,
    VqaResult,
)
from serving.client.retry import Retry, retryable_http

if TYPE_CHECKING:
    from typing import Unpack

log = logging.getLogger(__name__)

Image = bytes | str | Path


def _b64(image: Image) -> str:
    return base64.b64encode(read_image(image)).decode("ascii")


def _error(r: httpx.Response, request_id: str | None) -> ApiError:
    """The narrow ApiError of a non-2xx response, with the API's code, message and Retry-After."""
    try:
        err = r.json()["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", r.text[:500]
    rid = r.headers.get("x-request-id") or request_id
    return api_error(r.status_code, code, message, rid, parse_retry_after(r.headers.get("retry-after")))


def _transport_error(e: httpx.TransportError, request_id: str | None, url: str) -> tuple[ApiError, bool]:
    """A failed connection → (the error to raise, whether a retry may help).

    A read or write timeout is not retried: the server had the request for the whole timeout.
    """
    if isinstance(e, httpx.ReadTimeout | httpx.WriteTimeout):
        return DeadlineExceeded("timeout", "client_timeout", f"no answer from {url} in time: {e}", request_id), False
    return ApiConnectionError(f"{type(e).__name__} talking to {url}: {e} (is the API running?)", request_id), True


def _bodies(
    *,
    image: Image | None = None,
    images: Sequence[Image] | None = None,
    text: str | None = None,
    texts: Sequence[str] | None = None,
    questions: Sequence[str] | None = None,
    top_k: int | None = None,
    model: str | None = None,
    return_attention: bool = False,
    shortlist: int | str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if image is not None:
        body["image"] = _b64(image)
    if images is not None:
        body["images"] = [_b64(i) for i in images]
    if text is not None:
        body["text"] = text
    if texts is not None:
        body["texts"] = list(texts)
    if questions is not None:
        body["questions"] = list(questions)
    if top_k is not None:
        body["top_k"] = top_k
    if model is not None:
        body["model"] = model
    if return_attention:
        body["return_attention"] = True
    if shortlist is not None:
        body["shortlist"] = shortlist
    return body


def _caption_body(
    image: Image, prompt: str | None, model: str | None, params: GenerationParameters, stream: bool = False
) -> dict[str, Any]:
    """A /v1/caption body: the image, and the prompt, model and generation parameters that were given."""
    body = _bodies(image=image, model=model)
    if prompt is not None:
        body["prompt"] = prompt
    body.update(generation_parameters(params))
    if stream:
        body["stream"] = True
    return body


STREAM_HEADERS = {"Accept": "text/event-stream"}


def _drain(lines: Iterator[str]) -> None:
    """Read a stream to its end after its last event, so the connection goes back to the pool."""
    try:
        for _ in lines:
            pass
    except httpx.TransportError:
        pass  # the result is already in hand


async def _adrain(lines: AsyncIterator[str]) -> None:
    try:
        async for _ in lines:
            pass
    except httpx.TransportError:
        pass


def _client_kwargs(
    base_url: str,
    timeout: float,
    headers: dict[str, str] | None,
    api_key: str | None,
    verify: bool | ssl.SSLContext,
    ca_cert: str | Path | None,
) -> dict[str, Any]:
    """httpx client arguments: base URL, timeout, headers with the API key, TLS verification."""
    all_headers = dict(headers or {})
    if api_key:
        all_headers["X-API-Key"] = api_key
    if ca_cert is not None:
        verify = ssl.create_default_context(cafile=str(ca_cert))
    return {"base_url": base_url, "timeout": timeout, "headers": all_headers, "verify": verify}


class _Calls:
    """Request building and retry decisions shared by the sync and async clients."""

    retry: Retry

    def _plan(self, request_id: str | None) -> tuple[str, dict[str, str]]:
        # One id for every try of a call, so the server's logs tie the retries together.
        rid = request_id or uuid.uuid4().hex
        return rid, {"X-Request-ID": rid}

    def _next_wait(self, retry: int, err: ApiError, retryable: bool, path: str) -> float | None:
        wait = self.retry.delay(retry, err.retry_after) if retryable else None
        if wait is not None:
            log.info("%s: %s; retry %d/%d in %.2f s", path, err, retry, self.retry.max_retries, wait)
        return wait


class VtfuseClient(_Calls):
    """Synchronous HTTP client; every call returns a typed result (`serving.client.results`).

    Args:
        base_url: the API, e.g. `http://127.0.0.1:8080` or `https://api.example.com`.
        timeout: seconds per try (connect, send, wait for the answer).
        api_key: sent as `X-API-Key` on every call.
        retry: retry policy (`serving.client.retry.Retry`); `Retry(max_retries=0)` never retries.
        verify: TLS verification: True (system CAs), False, or an `ssl.SSLContext`.
        ca_cert: a PEM file of the CA(s) to trust instead of the system's (a self-signed server's cert).
        headers: extra headers on every call.
        transport: an httpx transport (tests).

    Example:
        >>> with VtfuseClient("http://127.0.0.1:8080", api_key="k1") as c:
        ...     c.vqa("shapes.png", ["how many circles are there?"]).answer
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8080",
        timeout: float = 30.0,
        headers: dict[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        *,
        api_key: str | None = None,
        retry: Retry | None = None,
        verify: bool | ssl.SSLContext = True,
        ca_cert: str | Path | None = None,
    ) -> None:
        self.retry = retry or Retry()
        kwargs = _client_kwargs(base_url, timeout, headers, api_key, verify, ca_cert)
        self._http = httpx.Client(transport=transport, **kwargs)

    def _request(self, method: str, path: str, request_id: str | None, **kwargs: Any) -> tuple[Any, str]:
        """(JSON body, request id) of a 2xx answer; retries what may pass later, else raises ApiError."""
        rid, headers = self._plan(request_id)
        retry = 0
        while True:
            try:
                r = self._http.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError as e:
                err, retryable = _transport_error(e, rid, str(self._http.base_url))
            else:
                if r.is_success:
                    return r.json(), r.headers.get("x-request-id") or rid
                err, retryable = _error(r, rid), retryable_http(r.status_code)
            retry += 1
            wait = self._next_wait(retry, err, retryable, path)
            if wait is None:
                raise err
            time.sleep(wait)

    def _post(self, path: str, body: dict[str, Any], request_id: str | None) -> tuple[Any, str]:
        return self._request("POST", path, request_id, json=body)

    def _stream(self, path: str, body: dict[str, Any], request_id: str | None) -> Generator[CaptionEvent, None, None]:
        """A streamed call's events; retried as `_request` is, but only until an event reached the caller."""
        rid, headers = self._plan(request_id)
        retry = 0
        while True:
            yielded = False
            try:
                with self._http.stream("POST", path, json=body, headers=headers | STREAM_HEADERS) as r:
                    if r.is_success:
                        reader = EventReader(r.headers.get("x-request-id") or rid)
                        lines = r.iter_lines()
                        for line in lines:
                            event = reader.feed(line)
                            if event is None:
                                continue
                            if event.last:
                                _drain(lines)
                            yielded = True
                            yield event
                            if event.last:
                                return
                        raise reader.incomplete()
                    r.read()
                    err, retryable = _error(r, rid), retryable_http(r.status_code)
            except httpx.TransportError as e:
                err, retryable = _transport_error(e, rid, str(self._http.base_url))
            except ApiError as e:  # an error event, or a stream cut before its last event
                err, retryable = e, retryable_stream_error(e)
            if yielded:
                raise err  # the caller has seen tokens: a retry would repeat them
            retry += 1
            wait = self._next_wait(retry, err, retryable, path)
            if wait is None:
                raise err
            time.sleep(wait)

    def vqa(
        self,
        image: Image,
        questions: Sequence[str],
        top_k: int = 1,
        model: str | None = None,
        return_attention: bool = False,
        request_id: str | None = None,
    ) -> VqaResult:
        """Answer questions about one image (POST /v1/vqa)."""
        body = _bodies(image=image, questions=questions, top_k=top_k, model=model, return_attention=return_attention)
        return VqaResult.from_json(*self._post("/v1/vqa", body, request_id))

    def vqa_multipart(
        self, image: Image, questions: Sequence[str], top_k: int = 1, request_id: str | None = None
    ) -> VqaResult:
        """The same call as multipart/form-data: the image as a file part, one `question` field each."""
        files = {"image": ("image", read_image(image), "application/octet-stream")}
        data = {"question": list(questions), "top_k": str(top_k)}
        return VqaResult.from_json(*self._request("POST", "/v1/vqa", request_id, files=files, data=data))

    def match(
        self, image: Image, texts: Sequence[str], model: str | None = None, request_id: str | None = None
    ) -> MatchResult:
        """ITM probability of each text for one image (POST /v1/match)."""
        body = _bodies(image=image, texts=texts, model=model)
        return MatchResult.from_json(*self._post("/v1/match", body, request_id))

    def retrieve_texts(
        self,
        image: Image,
        texts: Sequence[str],
        top_k: int = 1,
        model: str | None = None,
        request_id: str | None = None,
        shortlist: int | str | None = None,
    ) -> RetrieveResult:
        """Rank texts for an image (POST /v1/retrieve, image form)."""
        body = _bodies(image=image, texts=texts, top_k=top_k, model=model, shortlist=shortlist)
        return RetrieveResult.from_json(*self._post("/v1/retrieve", body, request_id))

    def retrieve_images(
        self,
        text: str,
        images: Sequence[Image],
        top_k: int = 1,
        model: str | None = None,
        request_id: str | None = None,
        shortlist: int | str | None = None,
    ) -> RetrieveResult:
        """Rank images for a text (POST /v1/retrieve, text form)."""
        body = _bodies(text=text, images=images, top_k=top_k, model=model, shortlist=shortlist)
        return RetrieveResult.from_json(*self._post("/v1/retrieve", body, request_id))

    def embed(
        self,
        images: Sequence[Image] | None = None,
        texts: Sequence[str] | None = None,
        model: str | None = None,
        request_id: str | None = None,
    ) -> EmbedResult:
        """Image and/or text embeddings (POST /v1/embed)."""
        body = _bodies(images=images, texts=texts, model=model)
        return EmbedResult.from_json(*self._post("/v1/embed", body, request_id))

    def models(self, request_id: str | None = None) -> ModelList:
        """The served models with their tasks, engines, precision, source and parity (GET /v1/models)."""
        return ModelList.from_json(*self._request("GET", "/v1/models", request_id))

    list_models = models  # the gRPC client's name

    def caption(
        self,
        image: Image,
        prompt: str | None = None,
        model: str | None = None,
        request_id: str | None = None,
        **params: Unpack[GenerationParameters],
    ) -> CaptionResult:
        """Caption one image (POST /v1/caption); `params` are generation parameters, e.g. `max_new_tokens=20`."""
        body = _caption_body(image, prompt, model, params)
        return CaptionResult.from_json(*self._post("/v1/caption", body, request_id))

    def caption_stream(
        self,
        image: Image,
        prompt: str | None = None,
        model: str | None = None,
        request_id: str | None = None,
        **params: Unpack[GenerationParameters],
    ) -> CaptionStream:
        """Caption one image token by token (POST /v1/caption, `stream`): an iterator of `CaptionEvent`s.

        The request goes out when the first event is asked for; an error before the stream is
        raised there, one during it from the event where it happened. Close the stream (or use
        it in a `with` block) to stop early: the response is closed and the server frees the slot.
        """
        body = _caption_body(image, prompt, model, params, stream=True)
        return CaptionStream(self._stream("/v1/caption", body, request_id))

    def ready(self) -> bool:
        """True when GET /readyz answers 200 (one try, no retries)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> VtfuseClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncVtfuseClient(_Calls):
    """Asynchronous HTTP client: the same arguments, methods and results as `VtfuseClient`, awaited."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8080",
        timeout: float = 30.0,
        headers: dict[str, str] | None = None,
        max_connections: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        api_key: str | None = None,
        retry: Retry | None = None,
        verify: bool | ssl.SSLContext = True,
        ca_cert: str | Path | None = None,
    ) -> None:
        self.retry = retry or Retry()
        self._http = httpx.AsyncClient(
            transport=transport,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            **_client_kwargs(base_url, timeout, headers, api_key, verify, ca_cert),
        )

    async def _request(self, method: str, path: str, request_id: str | None, **kwargs: Any) -> tuple[Any, str]:
        """(JSON body, request id) of a 2xx answer; retries what may pass later, else raises ApiError."""
        rid, headers = self._plan(request_id)
        retry = 0
        while True:
            try:
                r = await self._http.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError as e:
                err, retryable = _transport_error(e, rid, str(self._http.base_url))
            else:
                if r.is_success:
                    return r.json(), r.headers.get("x-request-id") or rid
                err, retryable = _error(r, rid), retryable_http(r.status_code)
            retry += 1
            wait = self._next_wait(retry, err, retryable, path)
            if wait is None:
                raise err
            await asyncio.sleep(wait)

    async def _post(self, path: str, body: dict[str, Any], request_id: str | None) -> tuple[Any, str]:
        return await self._request("POST", path, request_id, json=body)

    async def _stream(
        self, path: str, body: dict[str, Any], request_id: str | None
    ) -> AsyncGenerator[CaptionEvent, None]:
        """A streamed call's events; retried as `_request` is, but only until an event reached the caller."""
        rid, headers = self._plan(request_id)
        retry = 0
        while True:
            yielded = False
            try:
                async with self._http.stream("POST", path, json=body, headers=headers | STREAM_HEADERS) as r:
                    if r.is_success:
                        reader = EventReader(r.headers.get("x-request-id") or rid)
                        lines = r.aiter_lines()
                        async for line in lines:
                            event = reader.feed(line)
                            if event is None:
                                continue
                            if event.last:
                                await _adrain(lines)
                            yielded = True
                            yield event
                            if event.last:
                                return
                        raise reader.incomplete()
                    await r.aread()
                    err, retryable = _error(r, rid), retryable_http(r.status_code)
            except httpx.TransportError as e:
                err, retryable = _transport_error(e, rid, str(self._http.base_url))
            except ApiError as e:  # an error event, or a stream cut before its last event
                err, retryable = e, retryable_stream_error(e)
            if yielded:
                raise err  # the caller has seen tokens: a retry would repeat them
            retry += 1
            wait = self._next_wait(retry, err, retryable, path)
            if wait is None:
                raise err
            await asyncio.sleep(wait)

    async def vqa(
        self,
        image: Image,
        questions: Sequence[str],
        top_k: int = 1,
        model: str | None = None,
        return_attention: bool = False,
        request_id: str | None = None,
    ) -> VqaResult:
        """Answer questions about one image (POST /v1/vqa)."""
        body = _bodies(image=image, questions=questions, top_k=top_k, model=model, return_attention=return_attention)
        return VqaResult.from_json(*await self._post("/v1/vqa", body, request_id))

    async def match(
        self, image: Image, texts: Sequence[str], model: str | None = None, request_id: str | None = None
    ) -> MatchResult:
        """ITM probability of each text for one image (POST /v1/match)."""
        body = _bodies(image=image, texts=texts, model=model)
        return MatchResult.from_json(*await self._post("/v1/match", body, request_id))

    async def retrieve_texts(
        self,
        image: Image,
        texts: Sequence[str],
        top_k: int = 1,
        model: str | None = None,
        request_id: str | None = None,
        shortlist: int | str | None = None,
    ) -> RetrieveResult:
        """Rank texts for an image (POST /v1/retrieve, image form)."""
        body = _bodies(image=image, texts=texts, top_k=top_k, model=model, shortlist=shortlist)
        return RetrieveResult.from_json(*await self._post("/v1/retrieve", body, request_id))

    async def retrieve_images(
        self,
        text: str,
        images: Sequence[Image],
        top_k: int = 1,
        model: str | None = None,
        request_id: str | None = None,
        shortlist: int | str | None = None,
    ) -> RetrieveResult:
        """Rank images for a text (POST /v1/retrieve, text form)."""
        body = _bodies(text=text, images=images, top_k=top_k, model=model, shortlist=shortlist)
        return RetrieveResult.from_json(*await self._post("/v1/retrieve", body, request_id))

    async def embed(
        self,
        images: Sequence[Image] | None = None,
        texts: Sequence[str] | None = None,
        model: str | None = None,
        request_id: str | None = None,
    ) -> EmbedResult:
        """Image and/or text embeddings (POST /v1/embed)."""
        body = _bodies(images=images, texts=texts, model=model)
        return EmbedResult.from_json(*await self._post("/v1/embed", body, request_id))

    async def models(self, request_id: str | None = None) -> ModelList:
        """The served models with their tasks, engines, precision, source and parity (GET /v1/models)."""
        return ModelList.from_json(*await self._request("GET", "/v1/models", request_id))

    list_models = models

    async def caption(
        self,
        image: Image,
        prompt: str | None = None,
        model: str | None = None,
        request_id: str | None = None,
        **params: Unpack[GenerationParameters],
    ) -> CaptionResult:
        """Caption one image (POST /v1/caption); `params` are generation parameters, e.g. `max_new_tokens=20`."""
        body = _caption_body(image, prompt, model, params)
        return CaptionResult.from_json(*await self._post("/v1/caption", body, request_id))

    def caption_stream(
        self,
        image: Image,
        prompt: str | None = None,
        model: str | None = None,
        request_id: str | None = None,
        **params: Unpack[GenerationParameters],
    ) -> AsyncCaptionStream:
        """Caption one image token by token: `async for event in client.caption_stream(...)` (not awaited).

        As `VtfuseClient.caption_stream`; `await stream.aclose()` (or `async with`) stops it early.
        """
        body = _caption_body(image, prompt, model, params, stream=True)
        return AsyncCaptionStream(self._stream("/v1/caption", body, request_id))

    async def ready(self) -> bool:
        """True when GET /readyz answers 200 (one try, no retries)."""
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncVtfuseClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
