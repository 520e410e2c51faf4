"""HTTP clients (httpx): `VtfuseClient` (sync) and `AsyncVtfuseClient`, one method per API call."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from serving.client.errors import ApiError, read_image

Image = bytes | str | Path


def _b64(image: Image) -> str:
    return base64.b64encode(read_image(image)).decode("ascii")


def _raise_for_error(r: httpx.Response) -> dict[str, Any]:
    """The JSON body of a 2xx response, else ApiError with the API's code and message."""
    rid = r.headers.get("x-request-id")
    if r.is_success:
        return r.json()
    try:
        err = r.json()["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", r.text[:500]
    retry = r.headers.get("retry-after")
    raise ApiError(r.status_code, code, message, rid, float(retry) if retry and retry.isdigit() else None)


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


class VtfuseClient:
    """Synchronous HTTP client.

    Example:
        >>> c = VtfuseClient("http://127.0.0.1:8080")
        >>> c.vqa("shapes.png", ["how many circles are there?"])["answers"][0]["answer"]
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8080",
        timeout: float = 30.0,
        headers: dict[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout, headers=headers, transport=transport)

    def _post(self, path: str, body: dict[str, Any], request_id: str | None) -> dict[str, Any]:
        headers = {"X-Request-ID": request_id} if request_id else None
        return _raise_for_error(self._http.post(path, json=body, headers=headers))

    def vqa(
        self,
        image: Image,
        questions: Sequence[str],
        top_k: int = 1,
        model: str | None = None,
        return_attention: bool = False,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Answer questions about one image (POST /v1/vqa)."""
        body = _bodies(image=image, questions=questions, top_k=top_k, model=model, return_attention=return_attention)
        return self._post("/v1/vqa", body, request_id)

    def vqa_multipart(
        self, image: Image, questions: Sequence[str], top_k: int = 1, request_id: str | None = None
    ) -> dict[str, Any]:
        """The same call as multipart/form-data: the image as a file part, one `question` field each."""
        files = {"image": ("image", read_image(image), "application/octet-stream")}
        data = {"question": list(questions), "top_k": str(top_k)}
        headers = {"X-Request-ID": request_id} if request_id else None
        return _raise_for_error(self._http.post("/v1/vqa", files=files, data=data, headers=headers))

    def match(
        self, image: Image, texts: Sequence[str], model: str | None = None, request_id: str | None = None
    ) -> dict[str, Any]:
        """ITM probability of each text for one image (POST /v1/match)."""
        return self._post("/v1/match", _bodies(image=image, texts=texts, model=model), request_id)

    def retrieve_texts(
        self,
        image: Image,
        texts: Sequence[str],
        top_k: int = 1,
        model: str | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Rank texts for an image (POST /v1/retrieve, image form)."""
        body = _bodies(image=image, texts=texts, top_k=top_k, model=model)
        return self._post("/v1/retrieve", body, request_id)

    def retrieve_images(
        self,
        text: str,
        images: Sequence[Image],
        top_k: int = 1,
        model: str | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Rank images for a text (POST /v1/retrieve, text form)."""
        body = _bodies(text=text, images=images, top_k=top_k, model=model)
        return self._post("/v1/retrieve", body, request_id)

    def embed(
        self,
        images: Sequence[Image] | None = None,
        texts: Sequence[str] | None = None,
        model: str | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Image and/or text embeddings (POST /v1/embed)."""
        return self._post("/v1/embed", _bodies(images=images, texts=texts, model=model), request_id)

    def models(self) -> dict[str, Any]:
        """The served models with their tasks, engines, precision, source and parity (GET /v1/models)."""
        return _raise_for_error(self._http.get("/v1/models"))

    def ready(self) -> bool:
        """True when GET /readyz answers 200."""
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


class AsyncVtfuseClient:
    """Asynchronous HTTP client with the same methods as `VtfuseClient`, awaited."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8080",
        timeout: float = 30.0,
        headers: dict[str, str] | None = None,
        max_connections: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=timeout,
            headers=headers,
            transport=transport,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    async def _post(self, path: str, body: dict[str, Any], request_id: str | None) -> dict[str, Any]:
        headers = {"X-Request-ID": request_id} if request_id else None
        return _raise_for_error(await self._http.post(path, json=body, headers=headers))

    async def vqa(
        self,
        image: Image,
        questions: Sequence[str],
        top_k: int = 1,
        model: str | None = None,
        return_attention: bool = False,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Answer questions about one image (POST /v1/vqa)."""
        body = _bodies(image=image, questions=questions, top_k=top_k, model=model, return_attention=return_attention)
        return await self._post("/v1/vqa", body, request_id)

    async def match(
        self, image: Image, texts: Sequence[str], model: str | None = None, request_id: str | None = None
    ) -> dict[str, Any]:
        """ITM probability of each text for one image (POST /v1/match)."""
        return await self._post("/v1/match", _bodies(image=image, texts=texts, model=model), request_id)

    async def retrieve_texts(
        self,
        image: Image,
        texts: Sequence[str],
        top_k: int = 1,
        model: str | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Rank texts for an image (POST /v1/retrieve, image form)."""
        body = _bodies(image=image, texts=texts, top_k=top_k, model=model)
        return await self._post("/v1/retrieve", body, request_id)

    async def retrieve_images(
        self,
        text: str,
        images: Sequence[Image],
        top_k: int = 1,
        model: str | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Rank images for a text (POST /v1/retrieve, text form)."""
        body = _bodies(text=text, images=images, top_k=top_k, model=model)
        return await self._post("/v1/retrieve", body, request_id)

    async def embed(
        self,
        images: Sequence[Image] | None = None,
        texts: Sequence[str] | None = None,
        model: str | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Image and/or text embeddings (POST /v1/embed)."""
        return await self._post("/v1/embed", _bodies(images=images, texts=texts, model=model), request_id)

    async def models(self) -> dict[str, Any]:
        """The served models with their tasks, engines, precision, source and parity (GET /v1/models)."""
        return _raise_for_error(await self._http.get("/v1/models"))

    async def ready(self) -> bool:
        """True when GET /readyz answers 200."""
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
