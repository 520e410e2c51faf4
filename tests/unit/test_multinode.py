"""More than one machine, without a cluster: Triton failover, the Triton list, node checks, the cluster config and CLI.

The real two-node run is tests/integration/test_multinode.py; here each piece a user depends on
is held to what they would see: a request that survives its node's Triton going away, the order
replicas try Tritons in, a refusal that names the missing repository or the unreachable address.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import types
from collections import Counter

import grpc
import numpy as np
import pytest
from starlette.testclient import TestClient
from tritonclient.utils import InferenceServerException

from serving.app import onray
from serving.app.clusterinfo import ClusterResponse, NodeInfo, TritonInfo
from serving.app.http_api import create_api
from serving.app.metrics import ApiMetrics
from serving.errors import UpstreamUnavailable
from serving.paths import REPO_ROOT
from serving.procs import free_port
from serving.triton import client as client_mod
from serving.triton.client import TritonClient, TritonClientSettings
from serving.triton.directory import (
    DISCOVERY_URL,
    Published,
    TritonDirectory,
    TritonEndpoint,
    decode,
    encode,
    order,
)
from serving.triton.launcher import TritonSettings
from serving.triton.pernode import NodeTritonSpec, node_settings, repository_problem
from tests.unit.app_fakes import make_args, make_checkpoint, make_pipeline


def tse(status: str, msg: str) -> InferenceServerException:
    return InferenceServerException(msg=msg, status=f"StatusCode.{status}")


class Stub:
    """One Triton's tritonclient: answers, or fails with the errors queued."""

    def __init__(self, name: str, errors: list[Exception] | None = None, ready: set[str] | None = None) -> None:
        self.name = name
        self.errors = list(errors or [])
        self.calls = 0
        self.ready = ready if ready is not None else {"fusion"}

    async def infer(self, model, inputs, **kw):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return types.SimpleNamespace(as_numpy=lambda name: np.full((1, 1), ord(self.name[0]), np.float32))

    async def is_model_ready(self, name, version):
        if self.errors:
            raise self.errors[0]
        return name in self.ready


def failover_client(stubs: dict[str, Stub], order_: list[str]) -> TritonClient:
    c = TritonClient(TritonClientSettings(url="unused:1"), endpoints=lambda: list(order_))
    c._pool_at = lambda url: [stubs[url]]  # type: ignore[method-assign]
    return c


def run(coro):
    return asyncio.run(coro)


# -- failover ---------------------------------------------------------------------------


def test_a_request_whose_node_triton_is_gone_is_answered_by_another_node():
    own = Stub("own", [tse("UNAVAILABLE", "failed to connect to all addresses; connection refused")])
    other = Stub("other")
    c = failover_client({"a:1": own, "b:1": other}, ["a:1", "b:1"])
    out = run(c.infer("fusion", {"X": np.zeros((1,))}, ["Y"], deadline=time.monotonic() + 2))
    assert out["Y"][0, 0] == ord("o") and own.calls == 1 and other.calls == 1
    # The failed one is tried last for a while: the next call goes to the other node at once.
    run(c.infer("fusion", {"X": np.zeros((1,))}, ["Y"], deadline=time.monotonic() + 2))
    assert own.calls == 1 and other.calls == 2


def test_a_triton_stopping_mid_call_fails_over_but_a_full_queue_and_a_bad_input_do_not():
    own = Stub("own", [tse("INTERNAL", "Failed to process the request(s): stub process is not healthy")])
    other = Stub("other")
    c = failover_client({"a:1": own, "b:1": other}, ["a:1", "b:1"])
    assert "Y" in run(c.infer("fusion", {"X": np.zeros((1,))}, ["Y"], deadline=time.monotonic() + 2))
    assert other.calls == 1
    from serving.errors import InvalidInput, Overloaded

    for err, cls in ((tse("UNAVAILABLE", "Exceeds maximum queue size"), Overloaded),
                     (tse("INVALID_ARGUMENT", "unexpected shape"), InvalidInput)):
        own, other = Stub("own", [err]), Stub("other")
        c = failover_client({"a:1": own, "b:1": other}, ["a:1", "b:1"])
        with pytest.raises(cls):
            run(c.infer("fusion", {"X": np.zeros((1,))}, ["Y"], deadline=time.monotonic() + 2))
        assert other.calls == 0  # the same request would fail there too (or add load where it is already high)


def test_every_triton_down_is_a_503_with_retry_after_and_none_listed_too():
    gone = tse("UNAVAILABLE", "connection refused")
    c = failover_client({"a:1": Stub("a", [gone] * 5), "b:1": Stub("b", [gone] * 5)}, ["a:1", "b:1"])
    with pytest.raises(UpstreamUnavailable) as e:
        run(c.infer("fusion", {"X": np.zeros((1,))}, ["Y"], deadline=time.monotonic() + 2))
    assert e.value.retry_after
    empty = failover_client({}, [])
    with pytest.raises(UpstreamUnavailable, match="no Triton is up on any Ray node offering the resource vtfuse_trit"):
        run(empty.infer("fusion", {"X": np.zeros((1,))}, ["Y"], deadline=time.monotonic() + 2))
    assert run(empty.models_ready([("fusion", "")])) == {"fusion": False}


def test_readiness_counts_a_model_ready_on_any_triton_of_the_list():
    c = failover_client({"a:1": Stub("a", ready={"fusion"}), "b:1": Stub("b", ready={"fusion", "vqa"})},
                        ["a:1", "b:1"])
    assert run(c.models_ready([("fusion", ""), ("vqa", ""), ("caption", "")])) == {
        "fusion": True, "vqa": True, "caption": False}


class _Call:
    """A raw gRPC stream call: fails at once, or yields nothing and ends."""

    def __init__(self, error: grpc.RpcError | None) -> None:
        self.error = error
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.error is not None:
            raise self.error
        raise StopAsyncIteration

    def cancel(self):
        self.cancelled = True


class _RpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


def test_a_stream_fails_over_before_its_first_response():
    tried = []

    def stub_for(url):
        err = _RpcError(grpc.StatusCode.UNAVAILABLE, "connection refused") if url == "a:1" else None
        tried.append(url)
        return types.SimpleNamespace(ModelStreamInfer=lambda *a, **k: _Call(err))

    c = TritonClient(TritonClientSettings(url="unused:1"), endpoints=lambda: ["a:1", "b:1"])
    c._stream_stub = stub_for  # type: ignore[method-assign]

    async def main():
        return [x async for x in c.stream("caption", {"X": np.zeros((1,), np.float32)}, deadline=time.monotonic() + 2)]

    assert run(main()) == [] and tried == ["a:1", "b:1"]


def test_one_triton_behaves_as_before_one_retry_of_the_same_address():
    stub = Stub("one", [tse("UNAVAILABLE", "Socket closed")])
    c = TritonClient(TritonClientSettings(url="127.0.0.1:1"))
    c._pool = lambda: [stub]  # type: ignore[method-assign]
    assert not c.fails_over
    run(c.infer("fusion", {"X": np.zeros((1,))}, ["Y"], deadline=time.monotonic() + 2))
    assert stub.calls == 2


def test_the_discovery_url_makes_a_failover_client_over_the_published_list():
    c = TritonClient(TritonClientSettings(url=DISCOVERY_URL))
    try:
        assert c.fails_over and c.directory is not None
    finally:
        c.directory.close()


# -- the Triton list --------------------------------------------------------------------


def ep(node, state="ready", grpc_="", **kw):
    return TritonEndpoint(node_id=node, node_ip="10.0.0." + node[-1], grpc=grpc_ or f"{node}:8001", state=state, **kw)


def test_replicas_try_their_own_node_first_then_ready_ones_never_failed_ones():
    eps = [ep("n1"), ep("n2", "restarting"), ep("n3"), ep("n4", "failed", failure="repository missing"), ep("n5")]
    got = [e.node_id for e in order(eps, "n2", salt=0)]
    assert got[-1] == "n2"  # its own Triton is restarting: the others first
    assert "n4" not in got and set(got[:3]) == {"n1", "n3", "n5"}
    assert [e.node_id for e in order(eps, "n3", salt=0)][0] == "n3"
    # Replicas of one node spread their failover over the others (the rotation differs by salt).
    firsts = {order(eps, "n4", salt=s)[0].node_id for s in range(50)}
    assert firsts == {"n1", "n3", "n5"}
    assert [e.node_id for e in order([ep("n1", "draining"), ep("n2")], None)] == ["n2", "n1"]


def test_the_published_list_round_trips_and_garbage_reads_as_empty():
    eps = [ep("n1", restarts=2, pid=42), ep("n2", "starting")]
    back = decode(encode(eps, owner="head pid 1"))
    assert list(back.endpoints) == eps and back.owner == "head pid 1" and back.updated > 0
    assert decode(b"not json").endpoints == () and decode(None).endpoints == ()


def test_the_directory_keeps_the_last_list_when_reading_fails():
    lists = [Published((ep("n1"), ep("n2"))), RuntimeError("GCS unavailable")]

    def read():
        item = lists.pop(0) if lists else RuntimeError("still down")
        if isinstance(item, Exception):
            raise item
        return item

    d = TritonDirectory(refresh_s=3600, read=read, own_node="n2", salt=0)
    assert d.urls() == ["n2:8001", "n1:8001"]
    d.refresh()
    assert d.urls() == ["n2:8001", "n1:8001"]
    d.close()


# -- a node's Triton --------------------------------------------------------------------


def test_a_node_without_the_repository_is_refused_naming_the_path_and_the_fix(tmp_path):
    missing = repository_problem(str(tmp_path / "nope"), "node 10.0.0.7")
    assert missing and str(tmp_path / "nope") in missing and "node 10.0.0.7" in missing
    assert "same path on every node" in missing
    assert "holds no model" in (repository_problem(str(tmp_path), "node x") or "")
    (tmp_path / "fusion").mkdir()
    (tmp_path / "fusion" / "config.pbtxt").write_text('name: "fusion"')
    assert repository_problem(str(tmp_path)) is None
    s3 = repository_problem("s3://bucket/models") or ""
    assert "not supported" in s3 and "sync it to the same path" in s3


def test_a_node_triton_takes_the_wanted_ports_or_free_ones_when_another_node_on_the_machine_has_them():
    spec = NodeTritonSpec(TritonSettings(http_port=18000, grpc_port=18001, metrics_port=18002), "/tmp")
    s = node_settings(spec, "10.0.0.5", taken=lambda host, port: False)
    assert (s.host, s.http_port, s.grpc_port, s.metrics_port) == ("10.0.0.5", 18000, 18001, 18002)
    s = node_settings(spec, "127.0.0.1", taken=lambda host, port: port == 18001)
    assert s.host == "127.0.0.1" and 18001 not in (s.http_port, s.grpc_port, s.metrics_port)
    assert len({s.http_port, s.grpc_port, s.metrics_port}) == 3 and s.shm_prefix == f"vtfuse{s.grpc_port}_"


# -- `vtfuse serve --ray-address` ------------------------------------------------------


def namespace(**kw) -> argparse.Namespace:
    from serving.app.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    ns = parser.parse_args(["serve", "--ray-address", "127.0.0.1:6379"])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_addresses_are_checked_before_anything_starts(tmp_path, monkeypatch):
    with pytest.raises(onray.ClusterError, match="Ray Client addresses are not supported"):
        onray.resolve_address("ray://head:10001")
    with pytest.raises(onray.ClusterError, match="expected host:port"):
        onray.resolve_address("head")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    with pytest.raises(onray.ClusterError, match="no Ray cluster runs on this machine"):
        onray.resolve_address("auto")
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.1.2.3:6379\n")
    assert onray.resolve_address("auto") == "10.1.2.3:6379"
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(onray.ClusterError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        onray.join(f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 10


def test_the_cluster_config_puts_a_proxy_on_every_node_and_replicas_on_the_node_tritons(monkeypatch):
    monkeypatch.setenv("VTFUSE_API_KEYS", '["k1"]')
    monkeypatch.setenv("VTFUSE_LIMITS_MAX_INFLIGHT", "32")
    ns = namespace(replicas_per_node=2)
    cfg = onray.render_cluster_config(ns, n_nodes=3)
    app = cfg["applications"][0]
    assert cfg["proxy_location"] == "EveryNode"
    assert app["args"]["triton_url"] == DISCOVERY_URL and app["args"]["triton_catalog"] is False
    assert onray.ingress_of(cfg)["num_replicas"] == 6 and onray.ingress_of(cfg)["max_surge_percent"] == 100
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(cfg)  # what Serve will be given
    env = app["runtime_env"]["env_vars"]
    assert env["PYTHONPATH"] == str(REPO_ROOT) and env["VTFUSE_API_KEYS"] == '["k1"]'
    assert env["VTFUSE_LIMITS_MAX_INFLIGHT"] == "32"
    assert not onray.set_replicas(cfg, 4) and onray.set_replicas(cfg, 8)  # raised, never lowered
    assert onray.ingress_of(cfg)["num_replicas"] == 8
    assert onray.bump_spread_epoch(cfg) == 1 and onray.bump_spread_epoch(cfg) == 2
    assert onray.ingress_of(cfg)["ray_actor_options"]["num_cpus"] == 0.25  # kept


def test_the_proxies_get_our_middleware_ray_front_door_and_per_node_ports(monkeypatch):
    monkeypatch.delenv("VTFUSE_FRONT", raising=False)
    ns = namespace(worker_api_port=18081, worker_grpc_port=19001)
    cfg = onray.render_cluster_config(ns, n_nodes=2)
    env = onray.controller_environment(cfg, ns)
    assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "serving.app.proxy:middlewares"
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert env["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] == "18081" and env["RAY_SERVE_WORKER_PROXY_GRPC_PORT"] == "19001"
    assert "VTFUSE_FRONT" not in os.environ
    monkeypatch.setenv("VTFUSE_FRONT", "haproxy")
    with pytest.raises(onray.ClusterError, match="unset VTFUSE_FRONT"):
        onray.controller_environment(cfg, ns)


def test_replicas_are_spread_again_only_when_a_triton_node_has_none_and_another_two():
    assert onray.uneven(Counter({"head": 2}), {"head", "worker"})
    assert not onray.uneven(Counter({"head": 1, "worker": 1}), {"head", "worker"})
    assert not onray.uneven(Counter({"head": 1}), {"head", "worker"})  # nothing to move
    assert not onray.uneven(Counter({"head": 3}), {"head"})


def test_serve_with_an_unreachable_ray_address_exits_at_once_naming_it():
    port = free_port()
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "serving.cli", "serve", "--ray-address", f"127.0.0.1:{port}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert r.returncode == 2, r.stderr
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in r.stderr and "ray start --head" in r.stderr
    assert time.monotonic() - t0 < 30
    r = subprocess.run(
        [sys.executable, "-m", "serving.cli", "serve"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "RAY_ADDRESS": "ray://127.0.0.1:10001"},
    )
    assert r.returncode == 2 and "Ray Client addresses are not supported" in r.stderr


# -- GET /v1/cluster ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_the_cluster_listing_is_behind_the_api_key(ckpt):
    from pydantic import SecretStr

    args = make_args(ckpt).model_copy(update={"api_keys": [SecretStr("sekret")]})
    pipeline, _ = make_pipeline(args)

    async def status() -> ClusterResponse:
        return ClusterResponse(
            nodes=[NodeInfo(node_id="n1", ip="10.0.0.1", head=True, alive=True, triton_slots=1)],
            replicas=[], front_doors=[],
            tritons=[TritonInfo(node_id="n1", node_ip="10.0.0.1", grpc="10.0.0.1:8001", state="ready")],
        )

    async def collect() -> str:
        return ""

    c = TestClient(create_api(pipeline, args, ApiMetrics(), collect, cluster_status=status),
                   raise_server_exceptions=False)
    r = c.get("/v1/cluster")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = c.get("/v1/cluster", headers={"X-API-Key": "sekret"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tritons"][0]["state"] == "ready" and body["nodes"][0]["head"] is True and body["errors"] == []
    assert "/v1/cluster" in c.get("/openapi.json").json()["paths"]


def test_the_cluster_listing_outside_ray_says_what_it_could_not_read(ckpt, monkeypatch):
    import ray

    # The integration session's stack may have connected this pytest process to its Ray: act as if not.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    args = make_args(ckpt)
    pipeline, fake = make_pipeline(args)
    fake.ready = True

    async def collect() -> str:
        return ""

    c = TestClient(create_api(pipeline, args, ApiMetrics(), collect), raise_server_exceptions=False)
    r = c.get("/v1/cluster")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tritons"] == [{"node_id": "", "node_ip": "", "grpc": args.triton_url, "http": "", "metrics": "",
                                "state": "ready", "restarts": 0, "pid": None, "failure": ""}]
    assert any(e.startswith("nodes:") for e in body["errors"])
    assert any(e.startswith("replicas:") for e in body["errors"])


def test_client_module_keeps_its_signatures():
    import inspect

    params = list(inspect.signature(client_mod.TritonClient.infer).parameters)
    assert params == ["self", "model", "inputs", "outputs", "deadline", "request_id", "version"]
    assert list(inspect.signature(client_mod.TritonClient.stream).parameters) == [
        "self", "model", "inputs", "deadline", "request_id"]


def test_a_node_triton_whose_ports_another_node_took_starts_on_fresh_ones(monkeypatch, tmp_path):
    """Two nodes on one machine chose the same free ports: the one that lost the race starts on new ones."""
    import socket

    from serving.procs import PortInUse
    from serving.triton import pernode
    from serving.triton.launcher import TritonSettings

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    started: list[tuple[int, int, int]] = []

    class FakeSupervisor:
        def __init__(self, settings: TritonSettings, log_path=None) -> None:
            self.settings = settings

        def start(self) -> None:
            s = self.settings
            started.append((s.http_port, s.grpc_port, s.metrics_port))
            if taken in started[-1]:
                raise PortInUse(f"port {taken} (Triton HTTP) is in use", [taken])

    monkeypatch.setattr(pernode, "TritonSupervisor", FakeSupervisor)
    node = pernode.NodeTriton.__new__(pernode.NodeTriton)  # the actor body without Ray
    node.node_ip, node.log_path = "127.0.0.1", tmp_path / "t.log"
    node.settings = TritonSettings(host="127.0.0.1", http_port=taken, grpc_port=1, metrics_port=2)
    node.supervisor = FakeSupervisor(node.settings)
    try:
        node._start_on_free_ports()
        assert len(started) == 2 and taken not in started[1] and node.settings.http_port == started[1][0]
        # out of retries, the clash is the error
        node.settings = TritonSettings(host="127.0.0.1", http_port=taken, grpc_port=1, metrics_port=2)
        node.supervisor = FakeSupervisor(node.settings)
        with pytest.raises(PortInUse):
            node._start_on_free_ports(retries=0)
    finally:
        holder.close()
