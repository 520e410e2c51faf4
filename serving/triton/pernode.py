"""A Triton per Ray node: an actor pinned to each node offering `vtfuse_triton` runs and supervises its tritonserver.

`vtfuse serve --ray-address` (serving.app.onray) keeps a `TritonFleet`: one `NodeTriton` actor on
every alive node that offers the custom resource `vtfuse_triton` (`ray start ... --resources
'{"vtfuse_triton": 1}'`). Each actor is pinned to its node (a hard node-affinity strategy) and
holds one unit of the resource, so a node runs one Triton at most. The actor starts tritonserver
under a TritonSupervisor, as `vtfuse serve` does on one machine: restarted when it dies or hangs,
its stubs and shared memory cleared. The server is a child of the actor's thread and gets SIGTERM
from the kernel when that thread (the actor's process) dies, so a Triton never outlives its actor;
the actors are owned by `vtfuse serve`, so they end with it.

The model repository is a path that must exist on every such node (a shared filesystem, or a copy
at the same path): the API replicas read each model's tokenizer and configuration from it too. A
node where it is missing or empty gets no Triton, and the reason is logged and listed in
`GET /v1/cluster`. Cloud-storage URIs (`s3://`, `gs://`, `as://`) are refused for that reason.

Each Triton listens on the node's address, on TRITON_*_PORT when those are free on the node, else
on free ports (several nodes on one machine); the fleet publishes where (serving.triton.directory).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from serving.procs import PortInUse, free_port, port_taken
from serving.triton.directory import RESOURCE, TritonEndpoint, publish, unpublish
from serving.triton.launcher import TritonSettings, TritonStartError, is_ready
from serving.triton.supervisor import TritonSupervisor

log = logging.getLogger(__name__)

NAMESPACE = "vtfuse"
ACTOR_PREFIX = "vtfuse_triton_"
CLOUD_SCHEMES = ("s3://", "gs://", "as://")


def actor_name(node_id: str) -> str:
    """The name of the Triton actor of a node (one per node and cluster)."""
    return f"{ACTOR_PREFIX}{node_id}"


def repository_problem(repository: str, where: str = "this node") -> str | None:
    """Why a node cannot serve `repository` (None when it can); the message names the fix."""
    if repository.startswith(CLOUD_SCHEMES):
        return (
            f"model repository {repository}: cloud storage is not supported across nodes (the API replicas read "
            "each model's tokenizer and configuration from the repository folder): sync it to the same path on "
            "every node and pass that path"
        )
    path = Path(repository)
    if not path.is_dir():
        return (
            f"model repository {repository} is missing on {where}: copy it to the same path on every node that "
            f"offers {RESOURCE} (or mount shared storage there), or remove the resource from this node"
        )
    if not any(path.glob("*/config.pbtxt")):
        return (
            f"model repository {repository} on {where} holds no model (no */config.pbtxt): build it there "
            "(`make repository`) or copy a built one"
        )
    return None


@dataclass(frozen=True)
class NodeTritonSpec:
    """How every node's Triton runs (from `vtfuse serve`'s flags); ports are preferences, see `node_settings`."""

    settings: TritonSettings
    log_dir: str

    @property
    def repository(self) -> str:
        """The model repository path every node must hold."""
        return str(self.settings.repository)


def node_settings(spec: NodeTritonSpec, host: str, taken: Any = port_taken) -> TritonSettings:
    """The node's Triton settings: on `host`, at the wanted ports if all are free there, else on free ports."""
    s = spec.settings
    wanted = (s.http_port, s.grpc_port, s.metrics_port)
    if any(taken(host, p) or (host != "127.0.0.1" and taken("127.0.0.1", p)) for p in wanted):
        ports = [free_port() for _ in wanted]
        log.warning("Triton ports %s are taken on %s: using %s", wanted, host, ports)
        wanted = (ports[0], ports[1], ports[2])
    return replace(s, host=host, http_port=wanted[0], grpc_port=wanted[1], metrics_port=wanted[2])


PORT_RETRIES = 3  # fresh free ports after a clash with another node's Triton on the same machine


class NodeTriton:
    """The actor body (made a Ray actor by `TritonFleet`): one supervised tritonserver on this node."""

    def __init__(self, spec: NodeTritonSpec) -> None:
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        where = f"node {self.node_ip} ({self.node_id[:12]}, host {socket.gethostname()})"
        self.failure = repository_problem(spec.repository, where)
        self.started = time.time()
        self.settings = node_settings(spec, self.node_ip)
        self.log_path = Path(spec.log_dir) / f"tritonserver-{self.node_id[:12]}.log"
        self.supervisor: TritonSupervisor | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        if self.failure is not None:
            log.error("%s", self.failure)
            return
        self.supervisor = TritonSupervisor(self.settings, log_path=self.log_path)
        threading.Thread(target=self._run, name="node-triton", daemon=True).start()

    def _run(self) -> None:
        """Start the server, then live as long as it should (it is this thread's child: see the module doc)."""
        assert self.supervisor is not None
        try:
            self._start_on_free_ports()
            log.info("Triton of node %s ready: gRPC %s", self.node_ip, self.supervisor.server.url_grpc)
        except Exception as e:
            self.failure = f"tritonserver did not start on node {self.node_ip}: {e}"[:2000]
            log.error("%s", self.failure)
        finally:
            self._ready.set()
        self._stop.wait()

    def _start_on_free_ports(self, retries: int = PORT_RETRIES) -> None:
        """Start the supervisor; where a port it chose was taken meanwhile, again on fresh free ports.

        Nodes sharing a machine choose their ports at the same moment: the other node's Triton can take
        one between this node's check and its bind (a stranger then answers on it, or the bind fails).
        """
        for attempt in range(retries + 1):
            assert self.supervisor is not None
            try:
                self.supervisor.start()
                return
            except (PortInUse, TritonStartError):
                s = self.settings
                clash = any(port_taken(s.host, p) for p in (s.http_port, s.grpc_port, s.metrics_port))
                if attempt == retries or not clash:
                    raise
                self.settings = replace(s, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
                log.warning("Triton ports of node %s were taken meanwhile: trying %s", self.node_ip,
                            (self.settings.http_port, self.settings.grpc_port, self.settings.metrics_port))
                self.supervisor = TritonSupervisor(self.settings, log_path=self.log_path)

    def status(self) -> dict[str, Any]:
        """This node's Triton as a TritonEndpoint dict (state: starting, ready, restarting, failed, stopped)."""
        s = self.settings
        sup = self.supervisor
        failure = self.failure or (sup.failure if sup is not None else None) or ""
        if failure:
            state = "failed"
        elif self._stop.is_set():
            state = "stopped"
        elif not self._ready.is_set():
            state = "starting"
        elif sup is not None and sup.server.poll() is None and is_ready(s.host, s.http_port, timeout=1.0):
            state = "ready"
        else:
            state = "restarting"
        return TritonEndpoint(
            node_id=self.node_id,
            node_ip=self.node_ip,
            grpc=f"{s.host}:{s.grpc_port}",
            http=f"http://{s.host}:{s.http_port}",
            metrics=f"http://{s.host}:{s.metrics_port}/metrics",
            state=state,
            restarts=sup.restarts if sup is not None else 0,
            pid=sup.pid if sup is not None else None,
            failure=failure,
            log=str(self.log_path),
        ).to_json()

    def stop(self) -> int | None:
        """Drain and stop the server (SIGTERM, its exit timeout, SIGKILL of its group); its exit code."""
        code = self.supervisor.stop() if self.supervisor is not None else None
        self._stop.set()
        return code


@dataclass
class NodeRecord:
    """What the fleet knows about one node's Triton."""

    handle: Any
    ip: str
    created: float = field(default_factory=time.monotonic)
    status: TritonEndpoint | None = None
    unreachable_since: float | None = None


class TritonFleet:
    """One NodeTriton actor per alive node offering `vtfuse_triton`, kept so by `reconcile()` (driver side).

    `reconcile()` starts an actor on each such node without one (a node that joined or rejoined;
    draining nodes get none), forgets those of nodes that left, reads every actor's status and
    publishes the list for the API replicas. A node whose repository is missing is refused (its
    actor removed) and tried again after `retry_refused_s`. `stop()` drains and stops every Triton.
    """

    def __init__(self, spec: NodeTritonSpec, retry_refused_s: float = 30.0, status_timeout_s: float = 3.0) -> None:
        self.spec = spec
        self.retry_refused_s = retry_refused_s
        self.status_timeout_s = status_timeout_s
        self.nodes: dict[str, NodeRecord] = {}
        self.refused: dict[str, tuple[str, float]] = {}  # node id → (why, when)
        self.draining: set[str] = set()
        self.retiring: dict[str, tuple[Any, float]] = {}  # node id → (its stop() call, when asked)
        self.owner = f"{socket.gethostname()} pid {os.getpid()}"
        self._actor_class: Any = None
        self._gcs: Any = None

    @staticmethod
    def candidate_nodes() -> dict[str, tuple[str, float]]:
        """Alive nodes offering at least one `vtfuse_triton`: node id → (address, its GPUs)."""
        import ray

        return {
            n["NodeID"]: (n.get("NodeManagerAddress", ""), float(n.get("Resources", {}).get("GPU", 0)))
            for n in ray.nodes()
            if n.get("Alive") and float(n.get("Resources", {}).get(RESOURCE, 0)) >= 1
        }

    def draining_nodes(self) -> set[str]:
        """Nodes Ray is draining (`ray drain-node`, autoscaler scale-down or preemption)."""
        import ray
        from ray._raylet import GcsClient  # type: ignore[attr-defined]  # Serve reads drains the same way

        try:
            if self._gcs is None:
                self._gcs = GcsClient(address=ray.get_runtime_context().gcs_address)
            return set(self._gcs.get_draining_nodes(timeout=3))
        except Exception as e:
            log.warning("could not read the draining nodes (%s)", e)
            return set()

    def _new_actor(self, node_id: str, gpus: float) -> Any:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if self._actor_class is None:
            self._actor_class = ray.remote(NodeTriton)
        return self._actor_class.options(
            name=actor_name(node_id),
            namespace=NAMESPACE,
            num_cpus=0,  # Triton's threads are not Ray's to schedule; the resource makes it one per node
            # The node's GPUs are its Triton's: Ray then sets CUDA_VISIBLE_DEVICES to them (with none it would
            # hide every GPU from the server).
            num_gpus=gpus,
            resources={RESOURCE: 1},
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            max_restarts=-1,  # the actor's process died on a live node: start it (and its Triton) again
            max_concurrency=4,  # status() answers while stop() drains
        ).remote(self.spec)

    def reconcile(self) -> None:
        """Match actors to nodes, read their statuses, publish the list."""
        import ray

        alive = self.candidate_nodes()
        self.draining = self.draining_nodes() & set(alive)
        for node_id in [n for n in self.nodes if n not in alive]:
            log.warning("node %s (%s) left the cluster: its Triton is gone", self.nodes[node_id].ip, node_id[:12])
            self._forget(node_id)
        now = time.monotonic()
        for node_id, (ip, gpus) in alive.items():
            if node_id in self.nodes or node_id in self.draining:
                continue
            why = self.refused.get(node_id)
            if why is not None and now - why[1] < self.retry_refused_s:
                continue
            try:
                self.nodes[node_id] = NodeRecord(self._new_actor(node_id, gpus), ip)
                log.info("starting a Triton on node %s (%s)", ip, node_id[:12])
            except ValueError as e:  # the name is taken: another `vtfuse serve` runs one there
                self.refused[node_id] = (f"node {ip} already runs a vtfuse Triton of another vtfuse serve: {e}", now)
                log.error("%s", self.refused[node_id][0])
        for node_id, (ref, since) in list(self.retiring.items()):  # stopped, or given up on: let the node go
            done, _ = ray.wait([ref], timeout=0)
            if done or now - since > self.spec.settings.exit_timeout_s + 15:
                log.info("the Triton of draining node %s stopped: the node can finish draining", node_id[:12])
                self._forget(node_id)
        refs = {
            node_id: rec.handle.status.remote() for node_id, rec in self.nodes.items() if node_id not in self.retiring
        }
        done, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.status_timeout_s)
        done_set = set(done)
        for node_id, ref in refs.items():
            rec = self.nodes[node_id]
            if ref not in done_set:
                rec.unreachable_since = rec.unreachable_since or now
                continue
            try:
                rec.status = TritonEndpoint.from_json(ray.get(ref))
                rec.unreachable_since = None
            except Exception as e:  # the actor died for good (its node is dead or it cannot be scheduled)
                log.warning("the Triton actor of node %s is gone (%s)", rec.ip, str(e).splitlines()[0][:200])
                self._forget(node_id)
                continue
            if rec.status.state == "failed":
                self.refused[node_id] = (rec.status.failure, now)
                log.error("node %s gets no Triton: %s", rec.ip, rec.status.failure)
                self._forget(node_id)
        self.publish()

    def retire(self, node_id: str) -> None:
        """Stop a draining node's Triton (its replicas have moved), without waiting: the node can then go idle.

        Ray lets a drained node's raylet exit once nothing runs there, and the Triton actor would keep it.
        """
        rec = self.nodes.get(node_id)
        if rec is None or node_id in self.retiring:
            return
        log.info("node %s is draining and hosts no replica: stopping its Triton", rec.ip)
        self.retiring[node_id] = (rec.handle.stop.remote(), time.monotonic())

    def _forget(self, node_id: str) -> None:
        import ray

        self.retiring.pop(node_id, None)
        rec = self.nodes.pop(node_id, None)
        if rec is not None:
            try:
                ray.kill(rec.handle, no_restart=True)
            except Exception:  # already gone
                log.debug("killing the Triton actor of %s failed", node_id, exc_info=True)

    def endpoints(self) -> list[TritonEndpoint]:
        """Every node's Triton as last read (draining and unreachable ones marked so; refused ones as failed)."""
        out = []
        for node_id, rec in self.nodes.items():
            st = rec.status or TritonEndpoint(node_id=node_id, node_ip=rec.ip, grpc="", state="starting")
            if rec.unreachable_since is not None and st.state == "ready":
                st = replace(st, state="unreachable")
            if node_id in self.retiring:
                st = replace(st, state="stopped")  # replicas elsewhere must not choose it any more
            elif node_id in self.draining and st.state in ("ready", "unreachable"):
                st = replace(st, state="draining")
            out.append(st)
        for node_id, (why, _) in self.refused.items():
            if node_id not in self.nodes:
                out.append(TritonEndpoint(node_id=node_id, node_ip="", grpc="", state="failed", failure=why))
        return out

    def publish(self) -> None:
        """Write `endpoints()` for the API replicas."""
        publish(self.endpoints(), self.owner)

    def ready(self) -> list[TritonEndpoint]:
        """The Tritons that answer ready now."""
        return [e for e in self.endpoints() if e.state == "ready"]

    def wait_ready(self, timeout_s: float, every_s: float = 1.0) -> list[TritonEndpoint]:
        """Reconcile until every started Triton is ready or refused (at least one ready), or `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.reconcile()
            eps = self.endpoints()
            pending = [e for e in eps if e.state not in ("ready", "failed")]
            if (not pending and self.ready()) or time.monotonic() > deadline:
                return self.ready()
            if not self.nodes and self.refused and len(self.refused) >= len(self.candidate_nodes()):
                return []  # every node refused
            time.sleep(every_s)

    def stop(self, timeout_s: float = 40.0) -> None:
        """Stop every Triton (each drains its queue), then the actors; unpublish the list."""
        import ray

        try:
            unpublish()
        except Exception:
            log.debug("unpublishing the Triton list failed", exc_info=True)
        refs = [rec.handle.stop.remote() for rec in self.nodes.values()]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for node_id in list(self.nodes):
            self._forget(node_id)
