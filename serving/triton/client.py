"""Async gRPC client for Triton: a small channel pool, per-call deadlines, request ids, errors as serving.errors.

Every call takes an absolute deadline (`time.monotonic()` seconds) and sends the time left
both as the gRPC deadline and as Triton's own queue timeout, so a request that can no
longer be answered in time is dropped from the dynamic batcher's queue instead of run.
gRPC's reconnect backoff is capped (`max_reconnect_backoff_ms`) so that after a Triton
restart the channels find the new server within seconds, not minutes.

Failover: with several Tritons (`url` `ray:vtfuse_triton`, one per Ray node, listed by
serving.triton.directory; or an `endpoints` callable), a call goes to the first of the list
(this node's own) and, when that one is unreachable or going away, to the next one at once;
inference is idempotent, so the request is not lost. An endpoint that failed so is tried last
for `DOWN_FOR_S`. A stream fails over only before its first response.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import InferInput, InferRequestedOutput, service_pb2, service_pb2_grpc
from tritonclient.utils import (
    InferenceServerException,
    deserialize_bytes_tensor,
    np_to_triton_dtype,
    serialize_byte_tensor,
    triton_to_np_dtype,
)

from serving import tracing
from serving.errors import (
    InvalidInput,
    Overloaded,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    VtfuseError,
    error_from_code,
)
from serving.triton.directory import is_discovery_url

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
DOWN_FOR_S = 5.0  # an endpoint that failed a call as unreachable is tried last for this long


@dataclass(frozen=True)
class TritonClientSettings:
    """How the API talks to Triton (filled from the app settings).

    Attributes:
        url: Triton's gRPC endpoint, host:port.
        pool_size: gRPC channels to open; calls are spread round-robin over them.
        initial_reconnect_backoff_ms: first wait before reconnecting a broken channel.
        max_reconnect_backoff_ms: cap on the exponential reconnect backoff.
        keepalive_time_ms: HTTP/2 keepalive ping period (detects a dead server between calls).
        retry_unavailable: retries of a call refused with UNAVAILABLE for a connection
            reason (never for a full queue); inference is idempotent.
        retry_backoff_s: wait before such a retry.
        tls: use TLS (Triton started with `--grpc-use-ssl`).
        tls_root_cert: PEM file of the CA that signed Triton's certificate (None: the system roots).
        tls_client_cert: PEM client certificate chain, for mutual TLS.
        tls_client_key: PEM client private key, for mutual TLS.
        tls_server_name: name to verify Triton's certificate against when it is not the URL's host.
    """

    url: str = "127.0.0.1:8001"
    pool_size: int = 2
    initial_reconnect_backoff_ms: int = 100
    max_reconnect_backoff_ms: int = 2000
    keepalive_time_ms: int = 10_000
    retry_unavailable: int = 1
    retry_backoff_s: float = 0.05
    tls: bool = False
    tls_root_cert: str | None = None
    tls_client_cert: str | None = None
    tls_client_key: str | None = field(default=None, repr=False)
    tls_server_name: str | None = None


def channel_args(s: TritonClientSettings) -> list[tuple[str, int | str]]:
    """gRPC channel options: message sizes, keepalive, capped reconnect backoff, a connection per channel."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", s.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", s.initial_reconnect_backoff_ms),
        ("grpc.min_reconnect_backoff_ms", s.initial_reconnect_backoff_ms),
        ("grpc.max_reconnect_backoff_ms", s.max_reconnect_backoff_ms),
        ("grpc.enable_retries", 0),  # retries are ours: only for connection errors, within the deadline
        # Each pool entry its own TCP connection (gRPC shares subchannels across channels by default).
        ("grpc.use_local_subchannel_pool", 1),
    ] + ([("grpc.ssl_target_name_override", s.tls_server_name)] if s.tls and s.tls_server_name else [])


def _read(path: str | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def channel_credentials(s: TritonClientSettings) -> grpc.ChannelCredentials | None:
    """TLS credentials for the channels (None without TLS); files are read once, here."""
    if not s.tls:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(s.tls_root_cert),
        private_key=_read(s.tls_client_key),
        certificate_chain=_read(s.tls_client_cert),
    )


def _status_name(exc: InferenceServerException) -> str:
    """'StatusCode.UNAVAILABLE' → 'UNAVAILABLE' (tritonclient stores the enum's str)."""
    status = exc.status() or ""
    return status.rsplit(".", 1)[-1]


def is_queue_full(message: str) -> bool:
    """Triton's dynamic batcher refusing because its queue is at `max_queue_size`."""
    m = message.lower()
    return "exceeds maximum queue size" in m or "queue is full" in m or "maximum queue" in m


def is_queue_timeout(message: str) -> bool:
    """Triton dropping a queued request whose timeout expired before it ran."""
    m = message.lower()
    return "timeout expired" in m or "request timeout" in m or "deadline" in m


_GONE = (
    "stub process",
    "not healthy",
    "socket closed",
    "connection reset",
    "connection refused",
    "failed to connect",
    "broken pipe",
    "rst_stream",
    "goaway",
    "server is stopping",
    "shutting down",
    "exiting",
    "not ready",
    "unavailable",
)


def is_server_gone(message: str) -> bool:
    """Triton (or one of its Python-backend stubs) dying, stopping or not reachable, as opposed to a model error."""
    m = message.lower()
    return any(p in m for p in _GONE)


def map_triton_error(exc: BaseException, model: str) -> VtfuseError:
    """Translate a tritonclient/gRPC failure into the service's error classes.

    UNAVAILABLE → UpstreamUnavailable (503) unless Triton's queue is full (Overloaded,
    429) or a queued request timed out (UpstreamTimeout, 504); DEADLINE_EXCEEDED →
    UpstreamTimeout; RESOURCE_EXHAUSTED → Overloaded; INVALID_ARGUMENT → InvalidInput;
    NOT_FOUND (model not loaded) → UpstreamUnavailable; INTERNAL/UNKNOWN that say the server
    or a backend stub is going away (Triton killed mid-request) → UpstreamUnavailable;
    anything else → UpstreamError.
    """
    if isinstance(exc, VtfuseError):
        return exc
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamTimeout(f"Triton did not answer {model} before the request deadline")
    if isinstance(exc, grpc.RpcError):
        exc = InferenceServerException(msg=exc.details() or "", status=str(exc.code()))
    if not isinstance(exc, InferenceServerException):
        return UpstreamError(f"calling Triton model {model} failed: {exc}")
    status, message = _status_name(exc), exc.message() or ""
    if status == "DEADLINE_EXCEEDED" or (status == "UNAVAILABLE" and is_queue_timeout(message)):
        return UpstreamTimeout(f"Triton did not answer {model} before the request deadline ({message})")
    if status == "RESOURCE_EXHAUSTED" or is_queue_full(message):
        return Overloaded(f"Triton's queue for {model} is full: retry later", retry_after=1.0)
    if status in ("UNAVAILABLE", "CANCELLED"):
        return UpstreamUnavailable(f"Triton is unavailable for {model} ({message}): retry shortly", retry_after=1.0)
    if status == "NOT_FOUND" or "unknown model" in message.lower():
        return UpstreamUnavailable(f"Triton does not serve {model} ({message})", retry_after=5.0)
    if status == "INVALID_ARGUMENT":
        return InvalidInput(f"Triton refused the input of {model}: {message}")
    if is_server_gone(message):
        return UpstreamUnavailable(f"Triton stopped while running {model} ({message}): retry shortly", retry_after=1.0)
    return UpstreamError(f"Triton model {model} failed: {message or exc}")


# A Triton model that knows the API's error classes says which one in its message (generate.py).
_CODED = re.compile(r"vtfuse:([a-z_]+): (.*)", re.DOTALL)


def map_stream_error(message: str, model: str) -> VtfuseError:
    """An error a decoupled model sent on a stream (no gRPC status there: only the message)."""
    m = _CODED.search(message)
    if m:
        code = m.group(1)
        return error_from_code(code, m.group(2), retry_after=1.0 if code in ("overloaded", "upstream_unavailable")
                               else None)
    if is_queue_full(message):
        return Overloaded(f"Triton's queue for {model} is full: retry later", retry_after=1.0)
    if is_server_gone(message):
        return UpstreamUnavailable(f"Triton stopped while running {model} ({message}): retry shortly", retry_after=1.0)
    return UpstreamError(f"Triton model {model} failed: {message}")


def stream_request(model: str, inputs: Mapping[str, np.ndarray], request_id: str) -> service_pb2.ModelInferRequest:
    """A ModelInferRequest with raw tensor contents (BYTES serialised as Triton expects)."""
    req = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for name, value in inputs.items():
        arr = np.asarray(value)
        t = req.inputs.add()
        t.name = name
        t.shape.extend(arr.shape)
        if arr.dtype == np.object_:
            t.datatype = "BYTES"
            raw = serialize_byte_tensor(arr)
            req.raw_input_contents.append(raw.item() if raw.size else b"")
        else:
            t.datatype = np_to_triton_dtype(arr.dtype)
            req.raw_input_contents.append(np.ascontiguousarray(arr).tobytes())
    return req


def stream_outputs(resp: service_pb2.ModelInferResponse) -> dict[str, np.ndarray]:
    """A streamed response's outputs as numpy arrays."""
    out = {}
    for o, raw in zip(resp.outputs, resp.raw_output_contents):
        shape = list(o.shape)
        if o.datatype == "BYTES":
            out[o.name] = deserialize_bytes_tensor(raw).reshape(shape)
        else:
            out[o.name] = np.frombuffer(raw, dtype=triton_to_np_dtype(o.datatype)).reshape(shape)
    return out


def _is_retryable(err: VtfuseError) -> bool:
    return isinstance(err, UpstreamUnavailable) and "does not serve" not in err.message


def make_input(name: str, array: np.ndarray) -> InferInput:
    """A Triton input from a numpy array (raw bytes on the wire)."""
    arr = np.ascontiguousarray(array)
    inp = InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
    inp.set_data_from_numpy(arr)
    return inp


@dataclass
class WireStats:
    """Tensor bytes this process sent to and received from Triton (for measuring feature traffic)."""

    sent: int = 0
    received: int = 0
    calls: int = 0


class TritonClient:
    """A pool of `tritonclient.grpc.aio` clients bound lazily to the running event loop.

    With `endpoints` (a callable giving host:port addresses in the order to try them), or a
    `settings.url` of `ray:vtfuse_triton` (the per-node Tritons serving.triton.directory lists), each
    call fails over along the list; otherwise every call goes to `settings.url`.
    """

    def __init__(self, settings: TritonClientSettings, endpoints: Callable[[], Sequence[str]] | None = None) -> None:
        self.settings = settings
        self._clients: list[grpcaio.InferenceServerClient] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next = itertools.count()
        self.stats = WireStats()
        self._outputs: dict[tuple[str, str], tuple[str, ...]] = {}
        self._channels: list[grpc.aio.Channel] = []  # for streams to decoupled models (raw gRPC: cancellable)
        self._channels_loop: asyncio.AbstractEventLoop | None = None
        # Failover over several Tritons: per-address pools and when each may be tried first again.
        self.directory: Any = None
        if endpoints is None and is_discovery_url(settings.url):
            from serving.triton.directory import TritonDirectory

            self.directory = TritonDirectory()
            endpoints = self.directory.urls
        self._endpoints = endpoints
        self._pools: dict[str, list[grpcaio.InferenceServerClient]] = {}
        self._stream_pools: dict[str, list[grpc.aio.Channel]] = {}
        self._pools_loop: asyncio.AbstractEventLoop | None = None
        self._down: dict[str, float] = {}

    @property
    def fails_over(self) -> bool:
        """True when calls go to a list of Tritons rather than one address."""
        return self._endpoints is not None

    def _targets(self) -> list[str | None]:
        """Addresses to try, in order (None: `settings.url` through the single pool); down ones last.

        Raises:
            UpstreamUnavailable: a failover list that is empty (no Triton of the cluster is up).
        """
        if self._endpoints is None:
            return [None]
        urls = list(dict.fromkeys(self._endpoints()))
        if not urls:
            raise UpstreamUnavailable(
                "no Triton is up on any Ray node offering the resource vtfuse_triton: retry shortly "
                "(`vtfuse serve --ray-address` starts one per such node)",
                retry_after=1.0,
            )
        now = time.monotonic()
        up: list[str | None] = [u for u in urls if self._down.get(u, 0.0) <= now]
        return up + [u for u in urls if self._down.get(u, 0.0) > now]

    def _mark_down(self, url: str | None, why: str) -> None:
        if url is None:
            return
        if self._down.get(url, 0.0) <= time.monotonic():
            log.warning("Triton %s unreachable (%s): trying the other nodes' first for %.0f s", url, why, DOWN_FOR_S)
        self._down[url] = time.monotonic() + DOWN_FOR_S

    def _loop_pools(self) -> None:
        loop = asyncio.get_running_loop()
        if self._pools_loop is not loop:  # channels belong to one loop
            self._pools, self._stream_pools, self._pools_loop = {}, {}, loop

    def _pool_at(self, url: str) -> list[grpcaio.InferenceServerClient]:
        self._loop_pools()
        pool = self._pools.get(url)
        if pool is None:
            creds = channel_credentials(self.settings)
            pool = [
                grpcaio.InferenceServerClient(url, creds=creds, channel_args=channel_args(self.settings))
                for _ in range(max(1, self.settings.pool_size))
            ]
            self._pools[url] = pool
        return pool

    def _pool(self) -> list[grpcaio.InferenceServerClient]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # aio channels belong to one loop: (re)create them in this one
            creds = channel_credentials(self.settings)
            self._clients = [
                grpcaio.InferenceServerClient(self.settings.url, creds=creds, channel_args=channel_args(self.settings))
                for _ in range(max(1, self.settings.pool_size))
            ]
            self._loop = loop
        return self._clients

    def _client(self, url: str | None = None) -> grpcaio.InferenceServerClient:
        pool = self._pool() if url is None else self._pool_at(url)
        return pool[next(self._next) % len(pool)]

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        deadline: float,
        request_id: str = "",
        version: str = "",
    ) -> dict[str, np.ndarray]:
        """Run one inference request; returns the requested outputs as numpy arrays.

        Args:
            model: Triton model name.
            inputs: tensor name → array (with the batch axis).
            outputs: output names to request (others are not computed into the response).
            deadline: absolute `time.monotonic()` by which the answer is needed.
            request_id: passed to Triton as the request id (it appears in Triton's trace/logs).
            version: model version, "" for Triton's policy (latest).

        Raises:
            VtfuseError: UpstreamTimeout, UpstreamUnavailable, Overloaded, InvalidInput or UpstreamError.
        """
        infer_inputs = [make_input(n, a) for n, a in inputs.items()]
        requested = [InferRequestedOutput(o) for o in outputs]
        attempt = 0
        targets = self._targets()
        # Each other Triton once, then `retry_unavailable` more tries (one Triton: as many retries of it).
        tries_left = self.settings.retry_unavailable + len(targets) - 1
        with tracing.triton_call(model, request_id) as headers:  # a span + `traceparent` when tracing is on
            while True:
                left = deadline - time.monotonic()
                if left <= 0.001:
                    raise UpstreamTimeout(f"request deadline expired before calling {model}")
                target = targets[attempt % len(targets)]
                try:
                    result = await self._client(target).infer(
                        model,
                        infer_inputs,
                        model_version=version,
                        outputs=requested,
                        request_id=request_id,
                        headers=headers,
                        client_timeout=left,
                        timeout=max(1, int(left * 1e6)),  # Triton's queue timeout, µs
                    )
                    break
                except (InferenceServerException, grpc.RpcError, asyncio.TimeoutError) as e:
                    err = map_triton_error(e, model)
                    if attempt < tries_left and _is_retryable(err):
                        attempt += 1
                        nxt = targets[attempt % len(targets)]
                        if nxt != target:
                            self._mark_down(target, err.message)
                        if attempt < len(targets):  # a Triton not tried yet (another node's): at once
                            log.warning("request_id=%s %s on %s: %s; failing over to %s",
                                        request_id, model, target, err.message, nxt)
                            continue
                        log.warning("request_id=%s %s: %s; retrying once", request_id, model, err.message)
                        await asyncio.sleep(self.settings.retry_backoff_s)
                        continue
                    log.warning("request_id=%s %s failed: %s", request_id, model, err.message)
                    raise err from None
        out = {o: result.as_numpy(o) for o in outputs}
        self.stats.calls += 1
        self.stats.sent += sum(int(np.asarray(a).nbytes) for a in inputs.values())
        self.stats.received += sum(int(a.nbytes) for a in out.values())
        return out

    def _stream_stub(self, url: str | None = None) -> service_pb2_grpc.GRPCInferenceServiceStub:
        if url is not None:
            self._loop_pools()
            channels = self._stream_pools.get(url)
            if channels is None:
                creds, opts = channel_credentials(self.settings), channel_args(self.settings)
                channels = [
                    grpc.aio.secure_channel(url, creds, options=opts) if creds is not None
                    else grpc.aio.insecure_channel(url, options=opts)
                    for _ in range(max(1, self.settings.pool_size))
                ]
                self._stream_pools[url] = channels
            return service_pb2_grpc.GRPCInferenceServiceStub(channels[next(self._next) % len(channels)])
        loop = asyncio.get_running_loop()
        if self._channels_loop is not loop:
            creds = channel_credentials(self.settings)
            opts = channel_args(self.settings)
            self._channels = [
                grpc.aio.secure_channel(self.settings.url, creds, options=opts) if creds is not None
                else grpc.aio.insecure_channel(self.settings.url, options=opts)
                for _ in range(max(1, self.settings.pool_size))
            ]
            self._channels_loop = loop
        return service_pb2_grpc.GRPCInferenceServiceStub(self._channels[next(self._next) % len(self._channels)])

    async def stream(
        self, model: str, inputs: Mapping[str, np.ndarray], *, deadline: float, request_id: str = ""
    ) -> AsyncIterator[dict[str, np.ndarray]]:
        """One request to a decoupled model over a gRPC stream: yields each response's outputs, the final one last.

        Leaving the loop early (the client went away), an exception, or the deadline cancels the
        stream: Triton then marks the request cancelled and the model drops it (generate.py checks
        before every step). Errors are the service's error classes, as for `infer`.

        Raises:
            VtfuseError: UpstreamTimeout, UpstreamUnavailable, Overloaded, the model's own coded errors.
        """
        left = deadline - time.monotonic()
        if left <= 0.001:
            raise UpstreamTimeout(f"request deadline expired before calling {model}")
        request = stream_request(model, inputs, request_id)
        sent = sum(int(np.asarray(a).nbytes) for a in inputs.values())

        async def requests() -> AsyncIterator[service_pb2.ModelInferRequest]:
            yield request
            await asyncio.Event().wait()  # keep our side open until the call ends or is cancelled

        targets = self._targets()
        with tracing.triton_call(model, request_id) as headers:
            for i, target in enumerate(targets):
                left = deadline - time.monotonic()
                if left <= 0.001:
                    raise UpstreamTimeout(f"request deadline expired before calling {model}")
                call = self._stream_stub(target).ModelStreamInfer(
                    requests(), timeout=left, metadata=tuple((headers or {}).items()) or None
                )
                answered = False
                try:
                    async for resp in call:
                        if resp.error_message:
                            err = map_stream_error(resp.error_message, model)
                            log.warning("request_id=%s %s failed: %s", request_id, model, err.message)
                            raise err
                        out = stream_outputs(resp.infer_response)
                        self.stats.received += sum(int(a.nbytes) for a in out.values())
                        final = resp.infer_response.parameters["triton_final_response"].bool_param
                        answered = True
                        yield out
                        if final:
                            break
                    return
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise UpstreamTimeout(f"Triton did not finish {model} before the request deadline") from None
                    err = map_triton_error(e, model)
                    if not answered and i + 1 < len(targets) and _is_retryable(err):  # nothing sent on: fail over
                        self._mark_down(target, err.message)
                        log.warning("request_id=%s %s stream on %s: %s; failing over to %s",
                                    request_id, model, target, err.message, targets[i + 1])
                        continue
                    raise err from None
                finally:
                    call.cancel()
                    self.stats.calls += 1
                    self.stats.sent += sent

    async def model_outputs(self, model: str, version: str = "") -> tuple[str, ...]:
        """Every output a model declares (Triton's model metadata), asked once per model and version."""
        key = (model, version)
        if key not in self._outputs:
            targets = self._targets()
            for i, target in enumerate(targets):
                try:
                    meta = await self._client(target).get_model_metadata(model, version, as_json=True)
                    break
                except (InferenceServerException, grpc.RpcError):
                    if i + 1 == len(targets):
                        raise
                    self._mark_down(target, f"metadata of {model}")
            self._outputs[key] = tuple(o["name"] for o in meta.get("outputs", []))
        return self._outputs[key]

    async def models_ready(self, models: Sequence[tuple[str, str]], timeout_s: float = 2.0) -> dict[str, bool]:
        """Readiness of each (model, version); a model is not ready when Triton cannot be reached."""

        async def one(name: str, version: str, target: str | None) -> bool:
            try:
                ready = self._client(target).is_model_ready(name, version)
                return bool(await asyncio.wait_for(ready, timeout=timeout_s))
            except (InferenceServerException, grpc.RpcError, asyncio.TimeoutError):
                return False

        try:
            targets = self._targets()
        except UpstreamUnavailable:
            targets = []
        # With failover a model is ready when one Triton of the list has it ready (asked in order).
        left, ready = list(models), set[tuple[str, str]]()
        for target in targets:
            results = await asyncio.gather(*(one(n, v, target) for n, v in left))
            ready.update(m for m, ok in zip(left, results) if ok)
            left = [m for m in left if m not in ready]
            if not left:
                break
        return {f"{n}:{v}" if v else n: (n, v) in ready for n, v in models}

    async def close(self) -> None:
        """Close every channel of the pool."""
        for c in self._clients:
            try:
                await c.close()
            except Exception:  # closing a channel of a finished loop: nothing left to release
                log.debug("closing a Triton channel failed", exc_info=True)
        for ch in [*self._channels, *(c for chs in self._stream_pools.values() for c in chs)]:
            try:
                await ch.close()
            except Exception:
                log.debug("closing a Triton stream channel failed", exc_info=True)
        for c in (c for pool in self._pools.values() for c in pool):
            try:
                await c.close()
            except Exception:
                log.debug("closing a Triton channel failed", exc_info=True)
        self._clients, self._channels = [], []
        self._pools, self._stream_pools = {}, {}
        self._loop = self._channels_loop = self._pools_loop = None
        if self.directory is not None:
            self.directory.close()
