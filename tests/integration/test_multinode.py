"""Two Ray nodes on this machine and `vtfuse serve --ray-address`: a node's Triton, a node killed, a node drained.

One cluster for the module (loadtests/chaos.py `ClusterServe`): a head and a worker, each a
`ray start --block` in a session of its own with its own ports, temp dir and the resource
`vtfuse_triton`, on loopback; then `vtfuse serve --ray-address` on free ports (the head's front door
on its API port, the worker's on `--worker-api-port`). In file order: a Triton and a replica on
each node; right answers to fresh renders through both front doors, each node's Triton doing its
node's work; the worker's Triton SIGKILLed under load (its replicas fail over to the head's, it is
restarted); the worker node SIGKILLed under load (every process of it: raylet, workers, Triton) and
a new one joined in its place; that one drained with `ray drain-node`; and the stop, which removes
the application and its Tritons and leaves the cluster up. Everything is stopped by process group
(never `ray stop`). Figures: build/chaos/multinode-results.json (RELIABILITY.md).
"""

from __future__ import annotations

import base64
import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest

from loadtests import chaos
from tests.helpers import fresh_samples, metric_value, scrape

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

RESULTS: dict[str, Any] = {}


@pytest.fixture(scope="module")
def nodes() -> Iterator[chaos.ClusterServe]:
    cs = chaos.ClusterServe.start(tag="multinode")
    try:
        yield cs
    finally:
        cs.stop()
        (chaos.LOG_DIR / "multinode-results.json").write_text(json.dumps(RESULTS, indent=2) + "\n")


def answers_right(url: str, n: int, seed: int) -> tuple[int, list[str]]:
    """`n` fresh renders, one question each, through `url`: (right answers, anything but a 200)."""
    right, problems = 0, []
    with httpx.Client(base_url=url, timeout=60) as http:
        for img, qa, _ in fresh_samples(n, seed=seed):
            r = http.post("/v1/vqa", json={"image": base64.b64encode(img).decode(), "questions": [qa.question]})
            if r.status_code != 200:
                problems.append(f"{r.status_code} {r.text[:200]}")
                continue
            right += r.json()["answers"][0]["answer"] == qa.answer
    return right, problems


def inference_count(metrics_url: str) -> float:
    return metric_value(scrape(metrics_url), "nv_inference_count")


def test_each_node_runs_a_triton_and_an_api_replica(nodes):
    view = nodes.wait_spread()
    alive = [n for n in view["nodes"] if n["alive"]]
    assert len(alive) == 2 and sum(n["head"] for n in alive) == 1
    assert all(n["triton_slots"] == 1 for n in alive)
    tritons = {t["node_id"]: t for t in view["tritons"]}
    assert set(tritons) == {n["node_id"] for n in alive} and all(t["state"] == "ready" for t in tritons.values())
    assert len({t["grpc"] for t in tritons.values()}) == 2  # the second node's Triton took other ports
    for t in tritons.values():
        assert httpx.get(t["http"] + "/v2/health/ready", timeout=5).status_code == 200
    assert all(v >= 1 for v in chaos.ingress_by_node(view).values()) and len(chaos.ingress_by_node(view)) == 2
    doors = {d["node_id"] for d in view["front_doors"] if d["status"] == "HEALTHY"}
    assert doors == {n["node_id"] for n in alive}
    RESULTS["layout"] = {"replicas_by_node": dict(chaos.ingress_by_node(view)),
                         "tritons": {k: v["grpc"] for k, v in tritons.items()}}


def test_right_answers_through_both_front_doors_from_each_nodes_triton(nodes):
    view = chaos.cluster_view(nodes.head_url)
    head = next(n["node_id"] for n in view["nodes"] if n["head"])
    metrics = {t["node_id"]: t["metrics"] for t in view["tritons"]}
    for url, seed in ((nodes.head_url, 2701), (nodes.worker_url, 2702)):
        before = {nid: inference_count(m) for nid, m in metrics.items()}
        right, problems = answers_right(url, 30, seed)
        assert not problems, problems[:3]
        assert right / 30 >= 0.9, f"{right}/30 right through {url}"
        grew = {nid for nid, m in metrics.items() if inference_count(m) > before[nid]}
        # Serve's proxy prefers its own node's replicas, and a replica calls its own node's Triton.
        own = head if url == nodes.head_url else next(nid for nid in metrics if nid != head)
        assert own in grew, f"{url}: Tritons that ran: {grew}"


def test_a_node_triton_killed_under_load_replicas_fail_over_and_it_comes_back(nodes):
    view = chaos.cluster_view(nodes.head_url)
    head = next(n["node_id"] for n in view["nodes"] if n["head"])
    worker_triton = next(t for t in view["tritons"] if t["node_id"] != head)
    victim = psutil.Process(worker_triton["pid"])
    fault: dict[str, Any] = {}

    def kill() -> None:
        fault["at"] = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        fault["restarted_s"], _ = chaos.wait_view(
            nodes.head_url,
            lambda v: any(t["node_id"] == worker_triton["node_id"] and t["state"] == "ready" and t["pid"] != victim.pid
                          for t in v["tritons"]),
            120,
        )

    outcomes = chaos.load_during(nodes.worker_url, 8, kill)
    figures = {**chaos.tally(outcomes), "restarted_s": fault["restarted_s"], **chaos.summarize(outcomes)}
    RESULTS["triton_kill_failover"] = figures
    assert figures["lost"] == 0 and figures["non_json_errors"] == 0, figures
    # The worker's replicas send their calls to the head's Triton meanwhile: none is refused.
    assert figures["completed"] == figures["sent"], figures


def test_a_node_killed_under_load_loses_no_request_and_capacity_returns_when_it_rejoins(nodes):
    worker = nodes.cluster.workers[0]
    r = chaos.drill_node_kill(nodes.head_url, nodes.cluster, worker, clients=8, rejoin=True)
    RESULTS["node_kill"] = r
    for phase in ("during_loss", "during_rejoin"):
        t = r[phase]
        assert t["lost"] == 0 and t["failed"] == 0, (phase, r)  # every one answered: 200 or a JSON 503/429
    assert r["non_json_errors"] == 0 and r["dropped"] == 0 and r["missing_retry_after"] == 0, r
    assert r["replicas_rescheduled_s"] is not None and r["capacity_back_s"] is not None
    assert r["tritons_after_rejoin"] == 2
    nodes.wait_spread()
    right, problems = answers_right(nodes.worker_url, 10, 2703)  # the new node's front door
    assert not problems and right >= 9, (right, problems[:3])


def test_a_drained_node_loses_no_request(nodes):
    nodes.wait_spread()
    worker = nodes.cluster.workers[0]
    r = chaos.drill_node_drain(nodes.head_url, nodes.cluster, worker, clients=8)
    RESULTS["node_drain"] = r
    assert r["load"]["completed"] == r["load"]["sent"] > 0, r
    assert r["triton_state_while_draining"] in ("draining", "stopped", None), r


def test_stop_removes_the_app_and_its_tritons_and_leaves_the_cluster_up(nodes):
    nodes.cluster.add_worker()
    alive_before = len(nodes.cluster.wait_nodes(2))
    st = nodes.stack
    st.signal(signal.SIGTERM)
    code = st.wait(120)
    assert code == 0, f"vtfuse serve exited with {code}: see {st.log_path}"
    assert len(nodes.cluster.alive_nodes()) == alive_before  # the user's cluster keeps running
    left = [p for node in [nodes.cluster.head, *nodes.cluster.workers] for p in node.processes()
            if p.name() == "tritonserver"]
    deadline = time.monotonic() + 60
    while left and time.monotonic() < deadline:
        time.sleep(1)
        left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"Tritons left running: {[p.pid for p in left]}"
    with pytest.raises(httpx.HTTPError):  # Serve, which it started, is gone with its front doors
        httpx.get(nodes.head_url + "/healthz", timeout=5)


def test_a_head_that_turned_token_auth_on_by_itself_is_joined_without_settings(monkeypatch):
    """`ray start --head` turns token auth on where the user has a token; a driver with RAY_AUTH_MODE unset joins."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    chaos.use_token_auth()  # the user's token exists (the one-machine vtfuse serve makes it)
    monkeypatch.delenv("RAY_AUTH_MODE")
    root = Path(tempfile.mkdtemp(prefix="vta", dir="/tmp"))
    head = chaos.RayNode("auth-head", root / "h").start()
    try:
        chaos.wait_gcs(head.address, 120)
        code = ("import sys, ray; from serving.app.onray import join; join(sys.argv[1]); "
                "print('nodes', len(ray.nodes()))")
        env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
        done = subprocess.run([sys.executable, "-c", code, head.address], env=env, capture_output=True, text=True,
                              timeout=120, cwd=chaos.REPO_ROOT)
        assert done.returncode == 0 and done.stdout.strip().endswith("nodes 1"), done.stderr[-2000:]
    finally:
        head.stop()
        shutil.rmtree(root, ignore_errors=True)
