"""gRPC clients of the API on Ray Serve's gRPC proxy (port 9000): `VtfuseGrpcClient` and `AsyncVtfuseGrpcClient`.

The same typed results, API key (`x-api-key` metadata), TLS, retries and exceptions as the
HTTP clients: RESOURCE_EXHAUSTED (not `payload_too_large`) and UNAVAILABLE are retried with
capped, jittered exponential backoff that honours the `retry-after` trailing metadata.
`caption_stream` reads the CaptionStream call's events as they come and cancels the call when closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Generator, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from serving.client.captions import AsyncCaptionStream, CaptionStream, GenerationParameters, generation_parameters
from serving.client.errors import ApiConnectionError, ApiError, api_error, parse_retry_after, read_image
from serving.client.http_client import Image
from serving.client.results import (
    CaptionEvent,
    CaptionResult,
    EmbedResult,
    MatchResult,
    ModelList,
    RetrieveResult,
    VqaResult,
)
from serving.client.retry import Retry, retryable_grpc
from serving.proto import vtfuse_pb2 as pb
from serving.proto import vtfuse_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from typing import Unpack

log = logging.getLogger(__name__)


def _meta(md: Iterable[Any] | None) -> dict[str, str]:
    """Metadata (sync tuples or grpc.aio.Metadata) → {key: value}."""
    out: dict[str, str] = {}
    for k, v in md or ():
        out[str(k)] = v.decode("ascii", "replace") if isinstance(v, bytes) else str(v)
    return out


def _api_error(e: grpc.RpcError, request_id: str | None = None) -> ApiError:
    """A failed call → the narrow ApiError with the status name, the API's error code and the request id."""
    meta = _meta(e.trailing_metadata())  # type: ignore[attr-defined]
    details = e.details() or ""  # type: ignore[attr-defined]
    status = e.code().name  # type: ignore[attr-defined]
    code = meta.get("error-code")
    # The API's own errors read "code: message" with `error-code` metadata; gRPC's (no connection...) do not.
    message = details.split(": ", 1)[1] if code and details.startswith(f"{code}: ") else details
    return api_error(
        status,
        code or status.lower(),
        message,
        meta.get("request_id") or request_id,
        parse_retry_after(meta.get("retry-after")),
    )


def _drain(call: Any) -> None:
    """Read a stream to its end after its last event, so the call ends OK rather than cancelled."""
    try:
        for _ in call:
            pass
    except grpc.RpcError:
        pass  # the result is already in hand


async def _adrain(call: Any) -> None:
    try:
        async for _ in call:
            pass
    except grpc.RpcError:
        pass


def channel_credentials(tls: bool, ca_cert: str | Path | bytes | None) -> grpc.ChannelCredentials | None:
    """TLS credentials (the system's roots, or the PEM `ca_cert`), or None for plaintext."""
    if not tls and ca_cert is None:
        return None
    roots = Path(ca_cert).read_bytes() if isinstance(ca_cert, str | Path) else ca_cert
    return grpc.ssl_channel_credentials(root_certificates=roots)


def _options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # reconnect soon after a restart, so the client's own retries find the server back
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5000),
    ]


def _incomplete(events: int, request_id: str) -> ApiError:
    return ApiConnectionError(f"the stream ended after {events} events, before its last", request_id)



def _shortlist(shortlist: int | str | None) -> int:
    """The proto's shortlist field: 0 the server's default, -1 every candidate ("all"), else the number."""
    if shortlist is None:
        return 0
    return -1 if shortlist == "all" else int(shortlist)

class _Requests:
    """Request protos and call plumbing shared by the sync and async gRPC clients."""

    def __init__(
        self,
        target: str,
        timeout: float,
        application: str | None,
        max_message_bytes: int,
        api_key: str | None,
        retry: Retry | None,
        tls: bool,
        ca_cert: str | Path | bytes | None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.application = application
        self.api_key = api_key
        self.retry = retry or Retry()
        self._credentials = channel_credentials(tls, ca_cert)
        self._options = _options(max_message_bytes)

    def _metadata(self, request_id: str) -> list[tuple[str, str]]:
        md = [("request_id", request_id)]
        if self.application:
            md.append(("application", self.application))
        if self.api_key:
            md.append(("x-api-key", self.api_key))
        return md

    def _next_wait(self, retry: int, err: ApiError, method: str) -> float | None:
        """The wait before retrying a call that failed before any answer (None: raise now)."""
        wait = self.retry.delay(retry, err.retry_after)
        if wait is not None:
            log.info("%s: %s; retry %d/%d in %.2f s", method, err, retry, self.retry.max_retries, wait)
        return wait

    def _failed(self, e: grpc.RpcError, rid: str, retry: int, method: str) -> tuple[ApiError, float | None]:
        """The error of a failed try and the wait before the next (None: raise now)."""
        err = _api_error(e, rid)
        status = e.code().name  # type: ignore[attr-defined]
        wait = None
        if retryable_grpc(status, err.code, e.details() or ""):  # type: ignore[attr-defined]
            wait = self.retry.delay(retry, err.retry_after)
        if wait is not None:
            log.info("%s: %s; retry %d/%d in %.2f s", method, err, retry, self.retry.max_retries, wait)
        return err, wait

    @staticmethod
    def _vqa(image: Image, questions: Sequence[str], top_k: int, model: str, attention: bool) -> pb.VqaRequest:
        return pb.VqaRequest(
            image=read_image(image), questions=list(questions), top_k=top_k, model=model, return_attention=attention
        )

    @staticmethod
    def _match(image: Image, texts: Sequence[str], model: str) -> pb.MatchRequest:
        return pb.MatchRequest(image=read_image(image), texts=list(texts), model=model)

    @staticmethod
    def _retrieve_texts(image: Image, texts: Sequence[str], top_k: int, model: str,
                        shortlist: int | str | None = None) -> pb.RetrieveRequest:
        return pb.RetrieveRequest(image=read_image(image), texts=list(texts), top_k=top_k, model=model,
                                  shortlist=_shortlist(shortlist))

    @staticmethod
    def _retrieve_images(text: str, images: Sequence[Image], top_k: int, model: str,
                         shortlist: int | str | None = None) -> pb.RetrieveRequest:
        return pb.RetrieveRequest(text=text, images=[read_image(i) for i in images], top_k=top_k, model=model,
                                  shortlist=_shortlist(shortlist))

    @staticmethod
    def _embed(images: Sequence[Image] | None, texts: Sequence[str] | None, model: str) -> pb.EmbedRequest:
        return pb.EmbedRequest(images=[read_image(i) for i in images or ()], texts=list(texts or ()), model=model)

    @staticmethod
    def _caption(image: Image, prompt: str | None, model: str, params: GenerationParameters) -> pb.CaptionRequest:
        values = generation_parameters(params)
        early = values.get("early_stopping")
        if isinstance(early, bool):  # the proto's field is a string: "true", "false" or "never"
            values["early_stopping"] = "true" if early else "false"
        req = pb.CaptionRequest(image=read_image(image), model=model)
        if prompt is not None:
            req.prompt = prompt
        if values:
            req.parameters.CopyFrom(pb.GenerationParameters(**values))
        return req


class VtfuseGrpcClient(_Requests):
    """Synchronous gRPC client; every call returns a typed result (`serving.client.results`).

    Args:
        target: `host:port` of the API's gRPC port.
        timeout: the deadline of each try, seconds.
        application: the Serve application to route to (`application` metadata), when several are deployed.
        api_key: sent as `x-api-key` metadata on every call.
        retry: retry policy (`serving.client.retry.Retry`).
        tls: use TLS, trusting the system's CAs (or `ca_cert`).
        ca_cert: PEM file (or bytes) of the CA(s) to trust; implies TLS.

    Example:
        >>> with VtfuseGrpcClient("127.0.0.1:9000") as c:
        ...     c.vqa(open("shapes.png", "rb").read(), ["how many circles are there?"]).answer
    """

    def __init__(
        self,
        target: str = "127.0.0.1:9000",
        timeout: float = 30.0,
        application: str | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        *,
        api_key: str | None = None,
        retry: Retry | None = None,
        tls: bool = False,
        ca_cert: str | Path | bytes | None = None,
    ) -> None:
        super().__init__(target, timeout, application, max_message_bytes, api_key, retry, tls, ca_cert)
        if self._credentials is None:
            self._channel = grpc.insecure_channel(target, options=self._options)
        else:
            self._channel = grpc.secure_channel(target, self._credentials, options=self._options)
        self._stub = pb_grpc.VtfuseStub(self._channel)

    def _call(self, method: str, request: Any, request_id: str | None) -> tuple[Any, str]:
        """(response proto, request id); retries what may pass later, else raises ApiError."""
        rid = request_id or uuid.uuid4().hex
        retry = 0
        while True:
            try:
                resp, call = getattr(self._stub, method).with_call(
                    request, timeout=self.timeout, metadata=self._metadata(rid)
                )
                return resp, _meta(call.trailing_metadata()).get("request_id") or rid
            except grpc.RpcError as e:
                retry += 1
                err, wait = self._failed(e, rid, retry, method)
                if wait is None:
                    raise err from None
                time.sleep(wait)

    def _stream(self, method: str, request: Any, request_id: str | None) -> Generator[CaptionEvent, None, None]:
        """A server-streaming call's events; retried as `_call` is, but only until an event reached the caller."""
        rid = request_id or uuid.uuid4().hex
        retry = 0
        while True:
            yielded = 0
            call = getattr(self._stub, method)(request, timeout=self.timeout, metadata=self._metadata(rid))
            try:
                for message in call:
                    event = CaptionEvent.from_proto(message, rid)
                    if event.last:
                        _drain(call)
                    yielded += 1
                    yield event
                    if event.last:
                        return
                err, wait = _incomplete(yielded, rid), None
                if not yielded:
                    retry += 1
                    wait = self._next_wait(retry, err, method)
            except grpc.RpcError as e:
                if yielded:
                    raise _api_error(e, rid) from None  # the caller has seen tokens: a retry would repeat them
                retry += 1
                err, wait = self._failed(e, rid, retry, method)
            finally:
                call.cancel()  # closing the stream early ends the call: the server frees the slot
            if wait is None:
                raise err
            time.sleep(wait)

    def vqa(
        self,
        image: Image,
        questions: Sequence[str],
        top_k: int = 1,
        model: str = "",
        return_attention: bool = False,
        request_id: str | None = None,
    ) -> VqaResult:
        """Answer questions about one image."""
        req = self._vqa(image, questions, top_k, model or "", return_attention)
        return VqaResult.from_proto(*self._call("Vqa", req, request_id))

    def match(self, image: Image, texts: Sequence[str], model: str = "", request_id: str | None = None) -> MatchResult:
        """ITM probability of each text for one image."""
        return MatchResult.from_proto(*self._call("Match", self._match(image, texts, model or ""), request_id))

    def retrieve_texts(
        self, image: Image, texts: Sequence[str], top_k: int = 1, model: str = "", request_id: str | None = None,
        shortlist: int | str | None = None,
    ) -> RetrieveResult:
        """Rank texts for an image."""
        req = self._retrieve_texts(image, texts, top_k, model or "", shortlist)
        return RetrieveResult.from_proto(*self._call("Retrieve", req, request_id))

    def retrieve_images(
        self, text: str, images: Sequence[Image], top_k: int = 1, model: str = "", request_id: str | None = None,
        shortlist: int | str | None = None,
    ) -> RetrieveResult:
        """Rank images for a text."""
        req = self._retrieve_images(text, images, top_k, model or "", shortlist)
        return RetrieveResult.from_proto(*self._call("Retrieve", req, request_id))

    def embed(
        self,
        images: Sequence[Image] | None = None,
        texts: Sequence[str] | None = None,
        model: str = "",
        request_id: str | None = None,
    ) -> EmbedResult:
        """Image and/or text embeddings."""
        return EmbedResult.from_proto(*self._call("Embed", self._embed(images, texts, model or ""), request_id))

    def list_models(self, request_id: str | None = None) -> ModelList:
        """The served models with their tasks, engines, precision, source and parity (ListModels)."""
        return ModelList.from_proto(*self._call("ListModels", pb.ListModelsRequest(), request_id))

    models = list_models  # the HTTP client's name

    def caption(
        self,
        image: Image,
        prompt: str | None = None,
        model: str = "",
        request_id: str | None = None,
        **params: Unpack[GenerationParameters],
    ) -> CaptionResult:
        """Caption one image (Caption); `params` are generation parameters, e.g. `max_new_tokens=20`."""
        req = self._caption(image, prompt, model or "", params)
        return CaptionResult.from_proto(*self._call("Caption", req, request_id))

    def caption_stream(
        self,
        image: Image,
        prompt: str | None = None,
        model: str = "",
        request_id: str | None = None,
        **params: Unpack[GenerationParameters],
    ) -> CaptionStream:
        """Caption one image token by token (CaptionStream): an iterator of `CaptionEvent`s.

        The call starts when the first event is asked for. `timeout` bounds the whole stream.
        Close the stream (or use it in a `with` block) to stop early: the call is cancelled.
        """
        req = self._caption(image, prompt, model or "", params)
        return CaptionStream(self._stream("CaptionStream", req, request_id))

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> VtfuseGrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncVtfuseGrpcClient(_Requests):
    """Asynchronous gRPC client (grpc.aio): the same arguments, methods and results as `VtfuseGrpcClient`, awaited.

    The channel opens on the first call, in the running event loop.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:9000",
        timeout: float = 30.0,
        application: str | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        *,
        api_key: str | None = None,
        retry: Retry | None = None,
        tls: bool = False,
        ca_cert: str | Path | bytes | None = None,
    ) -> None:
        super().__init__(target, timeout, application, max_message_bytes, api_key, retry, tls, ca_cert)
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None

    def _get_stub(self) -> Any:
        if self._channel is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
            else:
                self._channel = grpc.aio.secure_channel(self.target, self._credentials, options=self._options)
            self._stub = pb_grpc.VtfuseStub(self._channel)
        return self._stub

    async def _call(self, method: str, request: Any, request_id: str | None) -> tuple[Any, str]:
        """(response proto, request id); retries what may pass later, else raises ApiError."""
        rid = request_id or uuid.uuid4().hex
        retry = 0
        while True:
            try:
                call = getattr(self._get_stub(), method)(request, timeout=self.timeout, metadata=self._metadata(rid))
                resp = await call
                return resp, _meta(await call.trailing_metadata()).get("request_id") or rid
            except grpc.RpcError as e:
                retry += 1
                err, wait = self._failed(e, rid, retry, method)
                if wait is None:
                    raise err from None
                await asyncio.sleep(wait)

    async def _stream(self, method: str, request: Any, request_id: str | None) -> AsyncGenerator[CaptionEvent, None]:
        """A server-streaming call's events; retried as `_call` is, but only until an event reached the caller."""
        rid = request_id or uuid.uuid4().hex
        retry = 0
        while True:
            yielded = 0
            call = getattr(self._get_stub(), method)(request, timeout=self.timeout, metadata=self._metadata(rid))
            try:
                async for message in call:
                    event = CaptionEvent.from_proto(message, rid)
                    if event.last:
                        await _adrain(call)
                    yielded += 1
                    yield event
                    if event.last:
                        return
                err, wait = _incomplete(yielded, rid), None
                if not yielded:
                    retry += 1
                    wait = self._next_wait(retry, err, method)
            except grpc.RpcError as e:
                if yielded:
                    raise _api_error(e, rid) from None  # the caller has seen tokens: a retry would repeat them
                retry += 1
                err, wait = self._failed(e, rid, retry, method)
            finally:
                call.cancel()  # closing the stream early ends the call: the server frees the slot
            if wait is None:
                raise err
            await asyncio.sleep(wait)

    async def vqa(
        self,
        image: Image,
        questions: Sequence[str],
        top_k: int = 1,
        model: str = "",
        return_attention: bool = False,
        request_id: str | None = None,
    ) -> VqaResult:
        """Answer questions about one image."""
        req = self._vqa(image, questions, top_k, model or "", return_attention)
        return VqaResult.from_proto(*await self._call("Vqa", req, request_id))

    async def match(
        self, image: Image, texts: Sequence[str], model: str = "", request_id: str | None = None
    ) -> MatchResult:
        """ITM probability of each text for one image."""
        return MatchResult.from_proto(*await self._call("Match", self._match(image, texts, model or ""), request_id))

    async def retrieve_texts(
        self, image: Image, texts: Sequence[str], top_k: int = 1, model: str = "", request_id: str | None = None,
        shortlist: int | str | None = None,
    ) -> RetrieveResult:
        """Rank texts for an image."""
        req = self._retrieve_texts(image, texts, top_k, model or "", shortlist)
        return RetrieveResult.from_proto(*await self._call("Retrieve", req, request_id))

    async def retrieve_images(
        self, text: str, images: Sequence[Image], top_k: int = 1, model: str = "", request_id: str | None = None,
        shortlist: int | str | None = None,
    ) -> RetrieveResult:
        """Rank images for a text."""
        req = self._retrieve_images(text, images, top_k, model or "", shortlist)
        return RetrieveResult.from_proto(*await self._call("Retrieve", req, request_id))

    async def embed(
        self,
        images: Sequence[Image] | None = None,
        texts: Sequence[str] | None = None,
        model: str = "",
        request_id: str | None = None,
    ) -> EmbedResult:
        """Image and/or text embeddings."""
        return EmbedResult.from_proto(*await self._call("Embed", self._embed(images, texts, model or ""), request_id))

    async def list_models(self, request_id: str | None = None) -> ModelList:
        """The served models with their tasks, engines, precision, source and parity (ListModels)."""
        return ModelList.from_proto(*await self._call("ListModels", pb.ListModelsRequest(), request_id))

    models = list_models

    async def caption(
        self,
        image: Image,
        prompt: str | None = None,
        model: str = "",
        request_id: str | None = None,
        **params: Unpack[GenerationParameters],
    ) -> CaptionResult:
        """Caption one image (Caption); `params` are generation parameters, e.g. `max_new_tokens=20`."""
        req = self._caption(image, prompt, model or "", params)
        return CaptionResult.from_proto(*await self._call("Caption", req, request_id))

    def caption_stream(
        self,
        image: Image,
        prompt: str | None = None,
        model: str = "",
        request_id: str | None = None,
        **params: Unpack[GenerationParameters],
    ) -> AsyncCaptionStream:
        """Caption one image token by token: `async for event in client.caption_stream(...)` (not awaited).

        As `VtfuseGrpcClient.caption_stream`; `await stream.aclose()` (or `async with`) cancels the call.
        """
        req = self._caption(image, prompt, model or "", params)
        return AsyncCaptionStream(self._stream("CaptionStream", req, request_id))

    async def aclose(self) -> None:
        """Close the channel."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> AsyncVtfuseGrpcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
