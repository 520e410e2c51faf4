"""The Tritons of a Ray cluster's nodes as one process sees them: published by `vtfuse serve`, read by API replicas.

`vtfuse serve --ray-address` runs one Triton per node that offers the resource `vtfuse_triton`
(serving.triton.pernode) and writes, every few seconds, where each one listens and how it is
(`ready`, `starting`, `restarting`, `draining`, `failed`, `unreachable`) into Ray's internal
key-value store (namespace `vtfuse`, key `tritons`). An API replica whose `triton_url` is
`ray:vtfuse_triton` reads that list in a background thread (`TritonDirectory`) and calls the
Triton of its own node first, then the others (serving.triton.client fails over between them).

Nothing here needs the publisher to be alive: a replica keeps the last list it read, and a Triton
that stopped answering is skipped by the client's own bookkeeping until it answers again.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)

RAY_SCHEME = "ray:"
RESOURCE = "vtfuse_triton"  # the custom resource a node offers to host a Triton
DISCOVERY_URL = f"{RAY_SCHEME}{RESOURCE}"  # AppArgs.triton_url for per-node Tritons
KV_NAMESPACE = "vtfuse"
KV_KEY = "tritons"
# States a client may send requests to, best first; any other state is left out.
SERVING_STATES = ("ready", "draining", "starting", "restarting", "unreachable")


def is_discovery_url(url: str) -> bool:
    """True when `url` asks for the cluster's per-node Tritons rather than one host:port."""
    return url.startswith(RAY_SCHEME)


@dataclass(frozen=True)
class TritonEndpoint:
    """One node's Triton: where it listens and its state as `vtfuse serve` last saw it."""

    node_id: str
    node_ip: str
    grpc: str  # host:port
    http: str = ""
    metrics: str = ""
    state: str = "starting"
    restarts: int = 0
    pid: int | None = None
    failure: str = ""
    log: str = ""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TritonEndpoint:
        """From `to_json`'s dict (unknown keys ignored: a newer publisher)."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class Published:
    """What the publisher wrote: the endpoints and when."""

    endpoints: tuple[TritonEndpoint, ...] = ()
    updated: float = 0.0  # wall-clock seconds
    owner: str = ""  # who published (host and pid of `vtfuse serve`)
    extra: dict[str, Any] = field(default_factory=dict)


def encode(endpoints: Sequence[TritonEndpoint], owner: str = "", **extra: Any) -> bytes:
    """The KV value for `endpoints`."""
    doc = {"updated": time.time(), "owner": owner, "tritons": [e.to_json() for e in endpoints], **extra}
    return json.dumps(doc).encode()


def decode(raw: bytes | None) -> Published:
    """The KV value back (an empty `Published` for none or garbage)."""
    if not raw:
        return Published()
    try:
        doc = json.loads(raw)
        eps = tuple(TritonEndpoint.from_json(e) for e in doc.get("tritons", []))
        extra = {k: v for k, v in doc.items() if k not in ("tritons", "updated", "owner")}
        return Published(eps, float(doc.get("updated", 0.0)), str(doc.get("owner", "")), extra)
    except (ValueError, TypeError, AttributeError):
        log.warning("the published Triton list is not readable: ignored")
        return Published()


def publish(endpoints: Sequence[TritonEndpoint], owner: str = "", **extra: Any) -> None:
    """Write the list into Ray's internal KV (needs `ray.init`)."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(KV_KEY, encode(endpoints, owner, **extra), overwrite=True, namespace=KV_NAMESPACE)


def unpublish() -> None:
    """Remove the list (the Tritons are being stopped)."""
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(KV_KEY, namespace=KV_NAMESPACE)


def read_published() -> Published:
    """The list as published now (empty when none or when this process is not connected to Ray)."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return Published()
    return decode(_internal_kv_get(KV_KEY, namespace=KV_NAMESPACE))


def order(endpoints: Sequence[TritonEndpoint], own_node: str | None, salt: int = 0) -> list[TritonEndpoint]:
    """The endpoints to try, in order: this node's own (unless failed), then the others.

    The others go by state (`SERVING_STATES` order: ready ones first), and among equals in a
    rotation that `salt` picks, so that the replicas of a node whose Triton is down spread their
    calls over the rest rather than all picking the same one. Failed Tritons are left out.
    """
    usable = [e for e in endpoints if e.state in SERVING_STATES and e.grpc]
    own = [e for e in usable if e.node_id == own_node and e.state in ("ready", "draining", "unreachable")]
    rest: list[TritonEndpoint] = []
    for state in SERVING_STATES:
        group = [e for e in usable if e.state == state and e not in own]
        group.sort(key=lambda e: zlib.crc32(e.node_id.encode()))
        k = salt % len(group) if group else 0
        rest += group[k:] + group[:k]
    return own + rest


class TritonDirectory:
    """The cluster's Tritons for this process, own node first, refreshed in a background thread.

    `urls()` never blocks on Ray: it returns the list read last (the first call reads it once,
    synchronously, so a replica's first request has it).
    """

    def __init__(
        self,
        refresh_s: float = 1.0,
        read: Callable[[], Published] = read_published,
        own_node: str | None = None,
        salt: int | None = None,
    ) -> None:
        self.refresh_s = refresh_s
        self.read = read
        self._own = own_node
        self.salt = random.randrange(1 << 30) if salt is None else salt
        self._published = Published()
        self._ordered: list[TritonEndpoint] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def own_node(self) -> str | None:
        """This process's Ray node id (None outside Ray)."""
        if self._own is None:
            try:
                import ray

                if ray.is_initialized():
                    self._own = ray.get_runtime_context().get_node_id()
            except Exception:  # outside a Ray worker
                return None
        return self._own

    def refresh(self) -> None:
        """Read the published list once."""
        try:
            published = self.read()
        except Exception as e:  # GCS briefly unreachable: keep the last list
            log.warning("reading the cluster's Triton list failed (%s): keeping the last one", e)
            return
        ordered = order(published.endpoints, self.own_node, self.salt)
        with self._lock:
            if [e.grpc for e in ordered] != [e.grpc for e in self._ordered]:
                log.info("Tritons, in the order this replica tries them: %s",
                         ", ".join(f"{e.grpc} ({e.state})" for e in ordered) or "none")
            self._published, self._ordered = published, ordered

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh()

    def _ensure_started(self) -> None:
        if self._thread is None:
            self.refresh()
            self._thread = threading.Thread(target=self._run, name="triton-directory", daemon=True)
            self._thread.start()

    def endpoints(self) -> list[TritonEndpoint]:
        """The usable endpoints, in the order to try them."""
        self._ensure_started()
        with self._lock:
            return list(self._ordered)

    def published(self) -> Published:
        """Everything last read, failed Tritons included (for `GET /v1/cluster`)."""
        self._ensure_started()
        with self._lock:
            return self._published

    def urls(self) -> list[str]:
        """gRPC host:port of each usable Triton, in the order to try them."""
        return [e.grpc for e in self.endpoints()]

    def close(self) -> None:
        """Stop the background refresh."""
        self._stop.set()
