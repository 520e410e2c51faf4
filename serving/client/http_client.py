"""HTTP clients (httpx): `VtfuseClient` (sync) and `AsyncVtfuseClient`, one method per API call, typed results.

Both send the API key (`X-API-Key`), verify TLS against the system's or a given CA, retry
429/503 and failed connections with capped, jittered exponential backoff that honours
`Retry-After`, and raise the narrow `ApiError` subclasses of `serving.client.errors`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from serving.client.errors import (
    ApiConnectionError,
    ApiError,
    DeadlineExceeded,
    api_error,
    parse_retry_after,
    read_image,
)
from serving.client.results import EmbedResult, MatchResult, ModelList, RetrieveResult, VqaResult
from serving.client.retry import Retry, retryable_http

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
    return body


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
    ) -> RetrieveResult:
        """Rank texts for an image (POST /v1/retrieve, image form)."""
        body = _bodies(image=image, texts=texts, top_k=top_k, model=model)
        return RetrieveResult.from_json(*self._post("/v1/retrieve", body, request_id))

    def retrieve_images(
        self,
        text: str,
        images: Sequence[Image],
        top_k: int = 1,
        model: str | None = None,
        request_id: str | None = None,
    ) -> RetrieveResult:
        """Rank images for a text (POST /v1/retrieve, text form)."""
        body = _bodies(text=text, images=images, top_k=top_k, model=model)
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
    ) -> RetrieveResult:
        """Rank texts for an image (POST /v1/retrieve, image form)."""
        body = _bodies(image=image, texts=texts, top_k=top_k, model=model)
        return RetrieveResult.from_json(*await self._post("/v1/retrieve", body, request_id))

    async def retrieve_images(
        self,
        text: str,
        images: Sequence[Image],
        top_k: int = 1,
        model: str | None = None,
        request_id: str | None = None,
    ) -> RetrieveResult:
        """Rank images for a text (POST /v1/retrieve, text form)."""
        body = _bodies(text=text, images=images, top_k=top_k, model=model)
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
