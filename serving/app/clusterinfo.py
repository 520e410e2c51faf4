"""`GET /v1/cluster`: the Ray cluster's nodes, the API's replicas and the Tritons, with their health.

Read in the replica that answers, from Ray (nodes and draining nodes from the GCS, replicas and
proxies from Serve's controller) and from the Triton list `vtfuse serve --ray-address` publishes
(serving.triton.directory). On one machine (`vtfuse serve`) the one Triton is the app's
`triton_url`, ready when the default model's engines are. Each source that does not answer within
`TIMEOUT_S` leaves its part empty and says so in `errors`; the route is behind the API key.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, Field

from serving.triton.directory import RESOURCE, is_discovery_url, read_published

log = logging.getLogger(__name__)

TIMEOUT_S = 5.0
APP_NAME = "vtfuse"


class NodeInfo(BaseModel):
    """One Ray node."""

    node_id: str
    ip: str
    head: bool
    alive: bool
    draining: bool = False
    cpus: float = 0.0
    triton_slots: float = Field(0.0, description=f"The node's `{RESOURCE}` resource: 1 when it runs a Triton.")


class ReplicaInfo(BaseModel):
    """One replica of the application."""

    deployment: str
    replica_id: str
    node_id: str
    node_ip: str
    state: str
    pid: int | None = None


class FrontDoorInfo(BaseModel):
    """Serve's HTTP proxy on one node."""

    node_id: str
    node_ip: str
    status: str


class TritonInfo(BaseModel):
    """One Triton: where it listens and its state (ready, starting, restarting, draining, unreachable, failed)."""

    node_id: str = ""
    node_ip: str = ""
    grpc: str
    http: str = ""
    metrics: str = ""
    state: str
    restarts: int = 0
    pid: int | None = None
    failure: str = ""


class ClusterResponse(BaseModel):
    """Body of `GET /v1/cluster`."""

    nodes: list[NodeInfo]
    replicas: list[ReplicaInfo]
    front_doors: list[FrontDoorInfo]
    tritons: list[TritonInfo]
    errors: list[str] = Field(default_factory=list, description="Parts that could not be read, and why.")


def _connected() -> None:
    import ray

    if not ray.is_initialized():  # never start a cluster from here (Serve's client would)
        raise RuntimeError("this process is not connected to a Ray cluster")


def nodes_now() -> list[NodeInfo]:
    """Every node Ray knows (dead ones too, until Ray forgets them), with the draining ones marked."""
    import ray
    from ray._raylet import GcsClient  # type: ignore[attr-defined]  # as Serve reads drains

    _connected()
    try:
        draining = set(GcsClient(address=ray.get_runtime_context().gcs_address).get_draining_nodes(timeout=3))
    except Exception:
        draining = set()
    out = []
    for n in ray.nodes():
        res = n.get("Resources", {}) or {}
        out.append(
            NodeInfo(
                node_id=str(n["NodeID"]),
                ip=str(n.get("NodeManagerAddress", "")),
                head="node:__internal_head__" in res,
                alive=bool(n.get("Alive")),
                draining=str(n["NodeID"]) in draining,
                cpus=float(res.get("CPU", 0.0)),
                triton_slots=float(res.get(RESOURCE, 0.0)),
            )
        )
    return sorted(out, key=lambda x: (not x.alive, not x.head, x.ip, x.node_id))


def serve_now(app: str = APP_NAME) -> tuple[list[ReplicaInfo], list[FrontDoorInfo]]:
    """The app's replicas and Serve's proxies, from Serve's controller."""
    from ray.serve.context import _get_global_client

    _connected()
    client = _get_global_client()
    if client is None:
        raise RuntimeError("Serve is not running in this process's cluster")
    details = client.get_serve_details()
    replicas = []
    for dep_name, dep in ((details.get("applications") or {}).get(app, {}).get("deployments") or {}).items():
        for r in dep.get("replicas") or []:
            replicas.append(
                ReplicaInfo(
                    deployment=dep_name,
                    replica_id=str(r.get("replica_id", "")),
                    node_id=str(r.get("node_id", "")),
                    node_ip=str(r.get("node_ip", "")),
                    state=str(r.get("state", "")).rsplit(".", 1)[-1],
                    pid=r.get("pid"),
                )
            )
    doors = [
        FrontDoorInfo(
            node_id=str(nid), node_ip=str(p.get("node_ip", "")), status=str(p.get("status", "")).rsplit(".", 1)[-1]
        )
        for nid, p in (details.get("proxies") or {}).items()
    ]
    return replicas, doors


async def cluster_status(
    triton_url: str, local_ready: Callable[[], Awaitable[bool]] | None = None, app: str = APP_NAME
) -> ClusterResponse:
    """Gather the parts (each bounded by TIMEOUT_S) into the response."""
    errors: list[str] = []

    async def part(what: str, fn: Callable[[], Any]) -> Any:
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn), timeout=TIMEOUT_S)
        except Exception as e:
            errors.append(f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}".rstrip(": "))
            return None

    nodes, serve_parts, published = await asyncio.gather(
        part("nodes", nodes_now), part("replicas", lambda: serve_now(app)), part("tritons", read_published)
    )
    replicas, doors = serve_parts if serve_parts is not None else ([], [])
    if is_discovery_url(triton_url):
        tritons = [
            TritonInfo(node_id=e.node_id, node_ip=e.node_ip, grpc=e.grpc, http=e.http, metrics=e.metrics,
                       state=e.state, restarts=e.restarts, pid=e.pid, failure=e.failure)
            for e in (published.endpoints if published is not None else ())
        ]
    else:
        ready = False
        if local_ready is not None:
            try:
                ready = await asyncio.wait_for(local_ready(), timeout=TIMEOUT_S)
            except Exception as e:
                errors.append(f"triton: {type(e).__name__}")
        tritons = [TritonInfo(grpc=triton_url, state="ready" if ready else "unready")]
    return ClusterResponse(nodes=nodes or [], replicas=replicas, front_doors=doors, tritons=tritons, errors=errors)
