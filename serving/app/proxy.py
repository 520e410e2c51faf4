"""Middleware for Ray Serve's HTTP proxy: fast admission, retries of calls a dead replica dropped, JSON errors only.

Ray Serve installs it in its proxy actor when `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`
is `serving.app.proxy:middlewares` in the environment the Ray cluster starts with
(`vtfuse serve` sets it; the k8s RayService sets it on the head pod). It sits in front of
everything the proxy does:

1. **Admission.** At most `VTFUSE_PROXY_MAX_INFLIGHT` task requests (POST /v1/*) in flight
   through this proxy; the next one gets a JSON 429 with `Retry-After` at once, without a
   hop to a replica (a refusal costs the proxy ~0.1 ms instead of a Ray call). The
   ingress replicas keep their own `limits.max_inflight` as the second line.
2. **Retries.** The task routes are idempotent (inference has no side effects). When the
   replica serving one dies mid-call, Ray's proxy answers a plain-text 500 (or nothing);
   the body, kept when it is at most `VTFUSE_PROXY_RETRY_MAX_BODY` bytes, is replayed up
   to `VTFUSE_PROXY_RETRIES` times and Serve routes it to a live replica.
3. **One error shape.** Any error Ray's proxy makes itself (backpressure when
   `max_queued_requests` is full, no replica, request timeout, a dead replica after the
   retries) is rewritten to the API's `{"error": {"code", "message"}}` with the status
   of serving.errors and `Retry-After`: no plain-text error ever reaches a client.
   Responses the application made (JSON, or any status below 400) pass untouched.
4. **Arrival stamp.** Each task request gets `x-vtfuse-received-at` (when this proxy got it),
   so a draining replica still serves what was in flight at the front door (`stamp_received`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.app.haproxy_wrapper import RECEIVED_AT_HEADER
from serving.errors import (
    Overloaded,
    UpstreamTimeout,
    UpstreamUnavailable,
    VtfuseError,
    error_body,
    error_headers,
)

log = logging.getLogger(__name__)

CALLBACK = "serving.app.proxy:middlewares"
TASK_PATHS = frozenset({"/v1/vqa", "/v1/match", "/v1/retrieve", "/v1/embed"})


@dataclass(frozen=True)
class ProxySettings:
    """Proxy middleware settings, read from the proxy actor's environment.

    Attributes:
        max_inflight: task requests in flight through one proxy before a 429 (0: no limit).
        stamp_received: set RECEIVED_AT_HEADER on task requests (this proxy is the front door).
        retries: replays of a task request whose replica died (0: none).
        retry_max_body: largest body kept in memory for a replay, bytes.
        retry_backoff_s: wait before the first replay (doubles each time).
    """

    max_inflight: int = 0
    stamp_received: bool = True
    retries: int = 2
    retry_max_body: int = 4 * 1024 * 1024
    retry_backoff_s: float = 0.05

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ProxySettings:
        """`VTFUSE_PROXY_MAX_INFLIGHT`, `VTFUSE_PROXY_RETRIES`, `VTFUSE_PROXY_RETRY_MAX_BODY`, ..._BACKOFF_S."""
        e = dict(os.environ if env is None else env)
        d = cls()
        return cls(
            max_inflight=int(e.get("VTFUSE_PROXY_MAX_INFLIGHT", d.max_inflight)),
            retries=int(e.get("VTFUSE_PROXY_RETRIES", d.retries)),
            retry_max_body=int(e.get("VTFUSE_PROXY_RETRY_MAX_BODY", d.retry_max_body)),
            retry_backoff_s=float(e.get("VTFUSE_PROXY_RETRY_BACKOFF_S", d.retry_backoff_s)),
        )


def proxy_error(status: int | None, text: str) -> VtfuseError:
    """The API error for a response Ray's proxy made itself (`status` None: it sent none at all)."""
    detail = " ".join(text.split())[:200]
    if status == 429 or (status == 503 and "queued" in text.lower()):
        return Overloaded(f"the API's request queue is full: retry later ({detail})", retry_after=1.0)
    if status == 408:
        return UpstreamTimeout(f"the request timed out in the API's proxy ({detail})")
    if status == 404:
        return UpstreamUnavailable(
            "no application serves this path yet (starting or being redeployed): retry shortly", retry_after=2.0
        )
    if status == 503:
        return UpstreamUnavailable(f"the API is unavailable: retry shortly ({detail})", retry_after=1.0)
    return UpstreamUnavailable(
        "the API replica serving this request stopped before answering: retry (another replica will answer)",
        retry_after=1.0,
    )


async def send_error(send: Send, err: VtfuseError, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    """Send `err` as the JSON error response."""
    body = json.dumps(error_body(err)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error_headers(err).items()]
    headers += extra or []
    await send({"type": "http.response.start", "status": err.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _Relay:
    """Forwards the application's response; holds back a non-JSON error, which may be the proxy's own."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.mode: str | None = None  # None until the response starts; then "pass" or "hold"
        self.start: Message | None = None
        self.held: list[Message] = []

    @property
    def status(self) -> int | None:
        """Status of the held response (None when nothing was sent)."""
        return None if self.start is None else int(self.start["status"])

    @property
    def text(self) -> str:
        """Body of the held response."""
        return b"".join(m.get("body", b"") for m in self.held).decode(errors="replace")

    async def __call__(self, message: Message) -> None:
        if self.mode is None and message["type"] == "http.response.start":
            status = int(message["status"])
            ctype = next((v for k, v in message.get("headers", []) if k.lower() == b"content-type"), b"")
            if status < 400 or b"json" in ctype.lower():
                self.mode = "pass"
            else:
                self.mode, self.start = "hold", message
                return
        if self.mode == "hold":
            self.held.append(message)
            return
        await self.send(message)

    def made_by_proxy(self) -> bool:
        """True for what Ray's proxy (or uvicorn under it) answers by itself, never the application."""
        status, text = self.status, self.text.lower()
        if self.mode is None or status in (408, 500, 503, 429):
            return True  # the application's errors are all JSON
        return status == 404 and "not found. ping" in text

    async def flush(self) -> None:
        """Send a held response unchanged (an application's own non-JSON error)."""
        assert self.start is not None
        await self.send(self.start)
        for m in self.held:
            await self.send(m)


def _replayer(head: list[Message], receive: Receive) -> Receive:
    """A `receive` that returns the kept body messages first, then the client's own."""
    pending = list(head)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


class ProxyGuard:
    """The middleware (see the module docstring)."""

    def __init__(self, app: ASGIApp, settings: ProxySettings | None = None) -> None:
        self.app = app
        self.settings = settings or ProxySettings.from_env()
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "").startswith("/-/"):  # Ray's own probes
            await self.app(scope, receive, send)
            return
        task = scope.get("method") == "POST" and scope.get("path", "").rstrip("/") in TASK_PATHS
        if not task:
            await self._once(scope, receive, send)
            return
        limit = self.settings.max_inflight
        if limit and self.inflight >= limit:
            await send_error(
                send,
                Overloaded(
                    f"{self.inflight} requests in flight (VTFUSE_PROXY_MAX_INFLIGHT={limit}): retry later",
                    retry_after=1.0,
                ),
            )
            return
        if self.settings.stamp_received:
            scope = stamp_received(scope)
        self.inflight += 1
        try:
            await self._with_retries(scope, receive, send)
        finally:
            self.inflight -= 1

    async def _attempt(self, scope: Scope, receive: Receive, send: Send) -> _Relay:
        relay = _Relay(send)
        try:
            await self.app(scope, receive, relay)
        except Exception:
            if relay.mode == "pass":
                raise
            log.exception("%s: the proxy failed before answering", scope.get("path"))
        return relay

    async def _once(self, scope: Scope, receive: Receive, send: Send) -> None:
        relay = await self._attempt(scope, receive, send)
        if relay.mode == "pass":
            return
        if relay.made_by_proxy():
            await send_error(send, proxy_error(relay.status, relay.text))
        else:
            await relay.flush()

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[list[Message], bool]:
        """Messages of the body read so far, and whether that is all of it (kept only up to retry_max_body)."""
        cap = self.settings.retry_max_body
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if self.settings.retries <= 0 or (declared.isdigit() and int(declared) > cap):
            return [], False
        messages: list[Message] = []
        size = 0
        while True:
            msg = await receive()
            messages.append(msg)
            if msg["type"] != "http.request":
                return messages, False  # the client went away
            size += len(msg.get("body", b""))
            if not msg.get("more_body", False):
                return messages, True
            if size > cap:
                return messages, False

    async def _with_retries(self, scope: Scope, receive: Receive, send: Send) -> None:
        head, complete = await self._read_body(scope, receive)
        attempts = 1 + (self.settings.retries if complete else 0)
        backoff = self.settings.retry_backoff_s
        for attempt in range(1, attempts + 1):
            replay = _replayer(head, receive)
            relay = await self._attempt(scope, replay, send)
            if relay.mode == "pass":
                return
            if not relay.made_by_proxy():
                await relay.flush()
                return
            retryable = relay.status is None or relay.status == 500
            if retryable and attempt < attempts:
                log.warning(
                    "%s: the replica dropped the call (%s); replaying it (attempt %d of %d)",
                    scope.get("path"),
                    relay.status or "no response",
                    attempt + 1,
                    attempts,
                )
                await asyncio.sleep(backoff)
                backoff *= 2
                continue
            await send_error(send, proxy_error(relay.status, relay.text))
            return


def stamp_received(scope: Scope) -> Scope:
    """`scope` with RECEIVED_AT_HEADER set to now (ms since the epoch), replacing any the caller sent.

    A draining replica still admits a request the front door had before the drain began
    (serving.app.pipeline.Admission); HAProxy stamps its requests the same way.
    """
    name = RECEIVED_AT_HEADER.encode()
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != name]
    headers.append((name, str(int(time.time() * 1000)).encode()))
    return {**scope, "headers": headers}


def in_replica() -> bool:
    """True inside a Serve replica's own HTTP server (direct ingress, behind HAProxy), False in Ray's proxy actor."""
    from ray.serve import context

    return context._get_internal_replica_context() is not None


def middlewares() -> list[Any]:
    """The `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` callback: the middleware list Ray's proxy applies.

    Ray also applies it in each replica's own HTTP server when HAProxy is the front door. There
    only the JSON error shape is this middleware's job: HAProxy replays a dropped call on another
    replica (a replay inside the replica would run it on the same one again, after keeping a copy
    of every body), and the replica's ApiMiddleware admits requests against its own limit.
    """
    settings = ProxySettings.from_env()
    if in_replica():
        settings = replace(settings, max_inflight=0, retries=0, stamp_received=False)  # HAProxy stamps
    log.info("vtfuse proxy middleware: %s", settings)
    return [Middleware(ProxyGuard, settings=settings)]
