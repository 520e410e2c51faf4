"""Reliability and security pieces without servers: the proxy middleware, rate limits, draining, error mapping,
the supervisor's restart logic, Triton's production flags, secrets kept out of reprs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient
from tritonclient.utils import InferenceServerException

from serving.app.cli import proxy_environment
from serving.app.http_api import create_api
from serving.app.metrics import ApiMetrics
from serving.app.pipeline import Admission, preprocess_error
from serving.app.proxy import CALLBACK, ProxyGuard, ProxySettings, middlewares
from serving.app.ratelimit import RateLimiter, caller_id
from serving.app.ray_background import background_environment
from serving.app.settings import AppArgs, Limits
from serving.errors import (
    Overloaded,
    RateLimited,
    ShuttingDown,
    UpstreamError,
    UpstreamUnavailable,
)
from serving.triton.client import TritonClientSettings, channel_args, map_triton_error
from serving.triton.launcher import TritonInstall, TritonSettings, build_command, redact
from serving.triton.supervisor import TritonSupervisor
from tests.unit.app_fakes import make_args, make_checkpoint, make_pipeline

# -- the proxy middleware ------------------------------------------------------------------


JSON = [(b"content-type", b"application/json")]


class FakeProxy:
    """Stands in for Ray's proxy: scripted answers per call, records the bodies it received."""

    def __init__(self, script):
        self.script = list(script)
        self.bodies: list[bytes] = []
        self.calls = 0

    async def __call__(self, scope, receive, send):
        self.calls += 1
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        self.bodies.append(body)
        kind = self.script.pop(0) if self.script else "ok"
        if kind == "ok":
            await send({"type": "http.response.start", "status": 200, "headers": JSON})
            await send({"type": "http.response.body", "body": b'{"answers": []}'})
        elif kind == "dead":  # RayActorError: Ray's proxy sends nothing, uvicorn would say 500
            return
        elif kind == "slow":
            await asyncio.sleep(0.3)
            await send({"type": "http.response.start", "status": 200, "headers": JSON})
            await send({"type": "http.response.body", "body": b"{}"})
        else:  # (status, text/plain body): Ray's own answers
            status, text = kind
            await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": text.encode()})


def guarded(script, **settings):
    fake = FakeProxy(script)
    s = ProxySettings(**{"retry_backoff_s": 0.001, **settings})
    return TestClient(ProxyGuard(fake, s), raise_server_exceptions=True), fake


def test_proxy_replays_a_call_its_replica_dropped():
    c, fake = guarded(["dead", "dead", "ok"])
    r = c.post("/v1/vqa", content=b'{"image": "x"}')
    assert r.status_code == 200 and r.json() == {"answers": []}
    assert fake.calls == 3 and fake.bodies == [b'{"image": "x"}'] * 3


def test_proxy_gives_up_after_its_retries_with_a_json_503():
    c, fake = guarded(["dead", "dead", "dead", "dead"], retries=2)
    r = c.post("/v1/match", content=b"{}")
    assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable"
    assert r.headers["retry-after"] == "1" and fake.calls == 3


def test_proxy_does_not_replay_bodies_over_its_cap():
    c, fake = guarded(["dead", "ok"], retry_max_body=10)
    r = c.post("/v1/vqa", content=b"x" * 100)
    assert r.status_code == 503 and fake.calls == 1


@pytest.mark.parametrize(
    "answer, status, code",
    [
        ((503, "Request dropped due to backpressure (max_queued_requests=2)."), 429, "overloaded"),
        ((429, "Request dropped due to backpressure"), 429, "overloaded"),
        ((503, "Deployment is unavailable"), 503, "upstream_unavailable"),
        ((408, "Request abc timed out after 10s."), 504, "upstream_timeout"),
        ((404, "Path '/v1/vqa' not found. Ping http://h/-/routes for routes."), 503, "upstream_unavailable"),
    ],
)
def test_rays_own_plain_text_answers_become_the_json_error_shape(answer, status, code):
    c, _ = guarded([answer], retries=0)
    r = c.post("/v1/vqa", content=b"{}")
    assert r.status_code == status and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == code
    assert ("retry-after" in r.headers) == (status != 504)


def test_the_applications_own_responses_pass_untouched():
    c, _ = guarded([(404, "<html>no such page</html>")])
    r = c.get("/static/missing.png")  # not the proxy's wording: the app's own 404 stays as it is
    assert r.status_code == 404 and r.text == "<html>no such page</html>"
    c, _ = guarded(["ok"])
    assert c.get("/healthz").json() == {"answers": []}


def test_proxy_admission_refuses_at_once_beyond_its_cap():
    fake = FakeProxy(["slow"] * 8)
    guard = ProxyGuard(fake, ProxySettings(max_inflight=2))

    async def run():
        from httpx import ASGITransport, AsyncClient

        async with AsyncClient(transport=ASGITransport(app=guard), base_url="http://t") as c:
            t0 = time.monotonic()
            rs = await asyncio.gather(*(c.post("/v1/vqa", content=b"{}") for _ in range(6)))
            return rs, time.monotonic() - t0

    rs, _ = asyncio.run(run())
    codes = sorted(r.status_code for r in rs)
    assert codes == [200, 200, 429, 429, 429, 429]
    refused = [r for r in rs if r.status_code == 429]
    assert all(r.json()["error"]["code"] == "overloaded" and r.headers["retry-after"] for r in refused)
    assert fake.calls == 2 and guard.inflight == 0


def test_proxy_settings_and_callback_come_from_the_environment(monkeypatch):
    env = {"VTFUSE_PROXY_MAX_INFLIGHT": "128", "VTFUSE_PROXY_RETRIES": "1", "VTFUSE_PROXY_RETRY_MAX_BODY": "99"}
    assert ProxySettings.from_env(env) == ProxySettings(max_inflight=128, retries=1, retry_max_body=99)
    monkeypatch.setenv("VTFUSE_PROXY_MAX_INFLIGHT", "7")
    (mw,) = middlewares()
    assert mw.cls is ProxyGuard and mw.kwargs["settings"].max_inflight == 7
    module, func = CALLBACK.split(":")
    assert getattr(__import__(module, fromlist=[func]), func) is middlewares


def test_in_a_replica_the_middleware_only_shapes_errors(monkeypatch):
    """Behind HAProxy Ray runs the callback in each replica: HAProxy replays, ApiMiddleware admits."""
    from ray.serve import context

    monkeypatch.setenv("VTFUSE_PROXY_MAX_INFLIGHT", "7")
    monkeypatch.setattr(context, "_get_internal_replica_context", lambda: object())
    (mw,) = middlewares()
    assert mw.kwargs["settings"] == ProxySettings(max_inflight=0, retries=0, stamp_received=False)


def test_the_proxy_stamps_when_it_received_a_task_request_over_any_stamp_the_caller_sent():
    seen = []

    async def app(scope, receive, send):
        seen.append([v for k, v in scope["headers"] if k == b"x-vtfuse-received-at"])
        await send({"type": "http.response.start", "status": 200, "headers": JSON})
        await send({"type": "http.response.body", "body": b"{}"})

    t0 = time.time()
    c = TestClient(ProxyGuard(app, ProxySettings()))
    assert c.post("/v1/vqa", content=b"{}", headers={"x-vtfuse-received-at": "1"}).status_code == 200
    (stamp,) = seen[-1]
    assert t0 - 1 <= int(stamp) / 1000 <= time.time() + 1
    c = TestClient(ProxyGuard(app, ProxySettings(stamp_received=False)))  # in a replica: HAProxy's stamp stays
    c.post("/v1/vqa", content=b"{}", headers={"x-vtfuse-received-at": "1"})
    assert seen[-1] == [b"1"]


def test_serve_sizes_the_proxy_cap_from_the_ingress_replicas(monkeypatch):
    monkeypatch.delenv("VTFUSE_PROXY_MAX_INFLIGHT", raising=False)
    monkeypatch.delenv("VTFUSE_LIMITS_MAX_INFLIGHT", raising=False)
    cfg = {
        "applications": [
            {
                "name": "vtfuse",
                "args": {"limits": {"max_inflight": 48}},
                "deployments": [{"name": "Ingress", "num_replicas": 3}],
            }
        ]
    }
    env = proxy_environment(cfg)
    # Ray's proxy (VTFUSE_FRONT=ray, and the fallback behind HAProxy) runs the middleware with this cap.
    assert {k: env[k] for k in ("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "VTFUSE_PROXY_MAX_INFLIGHT")} == {
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": CALLBACK, "VTFUSE_PROXY_MAX_INFLIGHT": "144"}
    # The front door's own settings come with it: HAProxy unless VTFUSE_FRONT=ray says otherwise.
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == ("0" if os.environ.get("VTFUSE_FRONT") == "ray" else "1")
    # Serve's controller loop every 0.5 s (an idle stack's largest CPU user at Ray's 0.1 s); the environment wins.
    assert env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == os.environ.get("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5")
    assert background_environment({"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1"}) == {
        "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1"}


# -- rate limits, admission, draining ----------------------------------------------------------


def test_token_bucket_allows_the_burst_then_the_rate():
    now = [0.0]
    rl = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    for _ in range(3):
        rl.check("a")
    with pytest.raises(RateLimited) as e:
        rl.check("a")
    assert e.value.http_status == 429 and e.value.code == "rate_limited" and 0 < e.value.retry_after <= 0.5
    rl.check("b")  # callers have their own buckets
    now[0] += 0.5  # one token back at 2/s
    rl.check("a")
    with pytest.raises(RateLimited):
        rl.check("a")


def test_rate_limiter_memory_is_bounded_and_keys_are_not_kept():
    rl = RateLimiter(rate=1.0, burst=1, max_callers=100)
    for i in range(1000):
        rl.check(caller_id(None, f"10.0.{i // 256}.{i % 256}"))
    assert len(rl._buckets) == 100
    cid = caller_id("super-secret-key", "1.2.3.4")
    assert "super-secret-key" not in cid and cid.startswith("key:")
    RateLimiter(rate=0, burst=1).check("anyone")  # 0: no limit


def test_rate_limit_per_key_over_http(tmp_path):
    limits = Limits(rate_limit_rps=0.01, rate_limit_burst=2)
    args = make_args(make_checkpoint(tmp_path / "c"), api_keys=["k1", "k2"], limits=limits)
    pipeline, _ = make_pipeline(args)

    async def collect() -> str:
        return ""

    c = TestClient(create_api(pipeline, args, ApiMetrics(), collect), raise_server_exceptions=False)
    body = {"texts": ["a red circle"]}
    k1 = {"X-API-Key": "k1"}
    assert [c.post("/v1/embed", json=body, headers=k1).status_code for _ in range(2)] == [200, 200]
    r = c.post("/v1/embed", json=body, headers=k1)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited" and int(r.headers["retry-after"]) >= 1
    assert c.post("/v1/embed", json=body, headers={"X-API-Key": "k2"}).status_code == 200
    assert c.post("/v1/embed", json=body, headers={"X-API-Key": "nope"}).status_code == 401  # auth first
    assert c.get("/readyz").status_code == 200  # probes are never limited


def _api(tmp_path, adm: Admission) -> TestClient:
    """The HTTP API over the test checkpoint, admitting through `adm`."""
    args = make_args(make_checkpoint(tmp_path / "c"))
    pipeline, _ = make_pipeline(args)

    async def collect() -> str:
        return ""

    return TestClient(create_api(pipeline, args, ApiMetrics(), collect, adm), raise_server_exceptions=False)


def test_draining_refuses_new_requests_and_readiness_and_waits_for_in_flight(tmp_path):
    adm = Admission(4)
    c = _api(tmp_path, adm)
    body = {"texts": ["a red circle"]}
    assert c.post("/v1/embed", json=body).status_code == 200
    adm.draining = True
    r = c.post("/v1/embed", json=body)
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert r.headers["connection"] == "close" and r.headers["retry-after"] == "1"
    assert c.get("/readyz").status_code == 503 and c.get("/healthz").status_code == 200

    adm2 = Admission(4)
    adm2.enter()

    async def finish_later():
        await asyncio.sleep(0.2)
        adm2.leave()

    async def run():
        t0 = time.monotonic()
        asyncio.get_running_loop().create_task(finish_later())
        idle = await adm2.wait_idle(5)
        return idle, time.monotonic() - t0

    idle, took = asyncio.run(run())
    assert idle and 0.15 < took < 2
    adm2.enter()
    assert asyncio.run(adm2.wait_idle(0.1)) is False


def test_a_draining_replica_admits_what_the_front_door_received_before_the_drain(tmp_path):
    """In flight at SIGTERM counts from the front door: a busy replica may reach such a request late."""
    adm = Admission(4)
    c = _api(tmp_path, adm)
    body = {"texts": ["a red circle"]}
    adm.draining, adm.drain_since = True, time.time()
    before = {"x-vtfuse-received-at": str(int((adm.drain_since - 0.5) * 1000))}
    after = {"x-vtfuse-received-at": str(int((adm.drain_since + 0.5) * 1000))}
    assert c.post("/v1/embed", json=body, headers=before).status_code == 200
    for headers in (after, {}, {"x-vtfuse-received-at": "soon"}):
        r = c.post("/v1/embed", json=body, headers=headers)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", headers
    assert adm.inflight == 0


def test_idle_means_idle_for_the_settle_time():
    """A request still on its way when the last one leaves resets the wait: the replica is not called idle."""
    adm = Admission(4)

    async def run():
        async def late_arrival():
            await asyncio.sleep(0.1)
            adm.enter()
            await asyncio.sleep(0.3)
            adm.leave()

        task = asyncio.get_running_loop().create_task(late_arrival())
        t0 = time.monotonic()
        idle = await adm.wait_idle(5, poll_s=0.02, settle_s=0.25)
        await task
        return idle, time.monotonic() - t0

    idle, took = asyncio.run(run())
    assert idle and took >= 0.4 + 0.25 - 0.05


def test_admission_errors():
    adm = Admission(1)
    adm.enter()
    with pytest.raises(Overloaded):
        adm.enter()
    adm.draining = True
    with pytest.raises(ShuttingDown) as e:
        adm.enter()
    assert e.value.http_status == 503 and e.value.grpc_status == "UNAVAILABLE"


def test_ingress_reconfigure_toggles_draining():
    pytest.importorskip("ray")
    from serving.app.ingress import Ingress

    cls = Ingress.func_or_class  # the user class under the Serve decorator
    obj = cls.__new__(cls)
    obj.admission = Admission(2)
    asyncio.run(obj.reconfigure({"draining": True}))
    assert obj.admission.draining and obj.admission.drain_since is None
    asyncio.run(obj.reconfigure({"draining": True, "drain_since": 1234.5, "drain_wait_s": 0.5}))
    assert obj.admission.drain_since == 1234.5
    asyncio.run(obj.reconfigure({}))
    assert not obj.admission.draining and obj.admission.drain_since is None


# -- Triton errors and the client ------------------------------------------------------------


@pytest.mark.parametrize(
    "status, message, expected",
    [
        ("StatusCode.INTERNAL", "Failed to process the request(s): Stub process is not healthy.", UpstreamUnavailable),
        ("StatusCode.UNKNOWN", "Socket closed", UpstreamUnavailable),
        ("StatusCode.INTERNAL", "Received RST_STREAM with error code 2", UpstreamUnavailable),
        ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", UpstreamUnavailable),
        ("StatusCode.INTERNAL", "onnxruntime: Non-zero status code returned while running Gemm node", UpstreamError),
    ],
)
def test_triton_going_away_mid_request_is_503_not_502(status, message, expected):
    err = map_triton_error(InferenceServerException(msg=message, status=status), "fusion")
    assert type(err) is expected


def test_tls_client_settings_are_secret_safe_and_name_override():
    s = TritonClientSettings(tls=True, tls_client_key="/secret/key.pem", tls_server_name="triton.internal")
    assert "key.pem" not in repr(s)
    assert ("grpc.ssl_target_name_override", "triton.internal") in channel_args(s)
    assert all(k != "grpc.ssl_target_name_override" for k, _ in channel_args(TritonClientSettings()))
    assert ("grpc.max_reconnect_backoff_ms", 2000) in channel_args(TritonClientSettings())


def test_preprocess_errors_map_to_api_errors():
    from ray.exceptions import RayActorError

    assert isinstance(preprocess_error(RayActorError()), UpstreamUnavailable)
    assert isinstance(preprocess_error(asyncio.TimeoutError()), Exception)
    assert preprocess_error(KeyError("bug")) is None


# -- Triton's production flags ----------------------------------------------------------------


INSTALL = TritonInstall(Path("/opt/tritonserver"), None, ())


def test_restricted_apis_and_tls_flags(monkeypatch):
    monkeypatch.setenv("TRITON_ADMIN_KEY", "adm-123")
    s = TritonSettings(restrict_apis=True, grpc_tls_cert=Path("/c.pem"), grpc_tls_key=Path("/k.pem"))
    cmd = build_command(s, INSTALL)
    for api in ("model-repository", "model-config", "shared-memory"):
        assert f"--http-restricted-api={api}:vtfuse-admin=adm-123" in cmd
        assert f"--grpc-restricted-protocol={api}:vtfuse-admin=adm-123" in cmd
    assert "--model-control-mode=none" in cmd
    assert {"--grpc-use-ssl=true", "--grpc-server-cert=/c.pem", "--grpc-server-key=/k.pem"} <= set(cmd)
    assert "adm-123" not in " ".join(redact(cmd))
    mutual = build_command(
        TritonSettings(grpc_tls_cert=Path("/c"), grpc_tls_key=Path("/k"), grpc_tls_root_cert=Path("/ca")), INSTALL
    )
    assert "--grpc-use-ssl-mutual=true" in mutual and "--grpc-root-cert=/ca" in mutual


def test_restricted_apis_without_a_key_are_off_for_everyone(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_ADMIN_KEY", raising=False)
    with caplog.at_level(logging.WARNING):
        a = build_command(TritonSettings(restrict_apis=True), INSTALL)
        b = build_command(TritonSettings(restrict_apis=True), INSTALL)
    keys = {c.rsplit("=", 1)[1] for c in a + b if c.startswith("--http-restricted-api=model-repository")}
    assert len(keys) == 2 and all(len(k) >= 24 for k in keys)  # random, different every start
    assert "off for everyone" in caplog.text and not any(k in caplog.text for k in keys)


def test_api_keys_never_appear_in_reprs_or_dumps_of_the_settings():
    args = AppArgs(api_keys=["sk-live-123"]).with_env({"VTFUSE_LIMITS_MAX_INFLIGHT": "8"})
    assert args.api_key_values() == ["sk-live-123"] and args.limits.max_inflight == 8
    assert "sk-live-123" not in repr(args) and "sk-live-123" not in str(args)
    assert "sk-live-123" not in json.dumps(args.model_dump(mode="json"))
    env = AppArgs().with_env({"VTFUSE_API_KEYS": '["k-env"]'})
    assert env.api_key_values() == ["k-env"]
    assert "sk-live" not in repr(TritonSettings(restricted_value="sk-live"))


# -- the supervisor ---------------------------------------------------------------------------


class FakeServer:
    """A TritonServer stand-in: `alive` until killed or told to die; start() may fail."""

    started: list[FakeServer] = []
    fail_next = 0

    def __init__(self, settings, log_path=None):
        self.settings = settings
        self.code = None
        self.process = type("P", (), {"pid": 1000 + len(FakeServer.started)})()

    def start(self):
        FakeServer.started.append(self)
        return self

    def wait_ready(self, timeout=0):
        if FakeServer.fail_next:
            FakeServer.fail_next -= 1
            from serving.triton.launcher import TritonStartError

            raise TritonStartError("not ready")

    def poll(self):
        return self.code

    def kill(self):
        self.code = -9

    def stop(self):
        self.code = self.code if self.code is not None else 0
        return self.code


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_supervisor_restarts_a_dead_server_and_a_failed_restart(monkeypatch):
    monkeypatch.setattr("serving.triton.supervisor.TritonServer", FakeServer)
    FakeServer.started, FakeServer.fail_next = [], 0
    sup = TritonSupervisor(TritonSettings(), backoff_initial_s=0.01, backoff_max_s=0.05, is_live=lambda h, p: True)
    sup.start()
    try:
        first = sup.server
        first.code = -9  # killed
        assert _wait(lambda: sup.restarts == 1 and sup.server is not first)
        FakeServer.fail_next = 1  # the next restart never becomes ready: it is killed and retried
        sup.server.code = 1
        assert _wait(lambda: sup.restarts == 3 and sup.server.poll() is None)
    finally:
        sup.stop()
    assert sup.server.code == 0 and len(FakeServer.started) == 4


def test_supervisor_kills_and_restarts_a_hung_server(monkeypatch):
    monkeypatch.setattr("serving.triton.supervisor.TritonServer", FakeServer)
    FakeServer.started, FakeServer.fail_next = [], 0
    live = {"ok": True}
    sup = TritonSupervisor(
        TritonSettings(), backoff_initial_s=0.01, probe_every_s=0.02, hang_after_s=0.2, is_live=lambda h, p: live["ok"]
    )
    sup.start()
    try:
        first = sup.server
        time.sleep(0.3)
        assert sup.restarts == 0  # live: left alone
        live["ok"] = False
        assert _wait(lambda: first.code == -9 and sup.restarts >= 1)
        live["ok"] = True
    finally:
        sup.stop()


def test_cli_stop_with_parent_is_a_flag_the_makefile_passes():
    text = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    assert "--stop-with-parent" in text


def test_a_preprocess_call_a_dying_replica_dropped_is_retried(tmp_path):
    from ray.exceptions import RayActorError

    from serving.app.pipeline import RequestContext
    from serving.app.tasks import EmbedTask

    args = make_args(make_checkpoint(tmp_path / "c"))
    pipeline, _ = make_pipeline(args)
    inner, calls = pipeline.preprocess_fn, []

    async def flaky(item):
        calls.append(item.request_id)
        if len(calls) <= 2:
            raise RayActorError()
        return await inner(item)

    pipeline.preprocess_fn = flaky
    task = EmbedTask("tiny", [], ["a red circle"])
    res = asyncio.run(pipeline.run(task, RequestContext("r1", time.monotonic() + 10)))
    assert len(res.text_embeddings) == 1 and calls == ["r1"] * 3

    calls.clear()
    pipeline.preprocess_retries = 1
    with pytest.raises(UpstreamUnavailable):
        asyncio.run(pipeline.run(task, RequestContext("r2", time.monotonic() + 10)))


def test_every_limit_is_a_documented_setting():
    """Each limit has a description (the YAML's reference) and a row in serving/app/README.md's table."""
    readme = (Path(__file__).resolve().parents[2] / "serving" / "app" / "README.md").read_text()
    for name, f in Limits.model_fields.items():
        assert f.description and len(f.description) > 20, name
        assert f"`{name}`" in readme, f"limits.{name} is missing from serving/app/README.md"


def test_stop_signals_force_only_on_a_second_signal_later(monkeypatch):
    """The first signal stops (drain); a copy of it at once does not force; one REPEAT_SIGNAL_S later does."""
    import faulthandler

    from serving.app import cli

    clock = [100.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: clock[0])
    signals = cli.StopSignals(stacks_after_s=3600)
    try:
        signals(15)
        assert signals.stop.is_set() and not signals.force.is_set()
        clock[0] += cli.REPEAT_SIGNAL_S / 2
        signals(2)  # the process group's copy of the same Ctrl-C
        assert not signals.force.is_set()
        clock[0] += cli.REPEAT_SIGNAL_S
        signals(2)
        assert signals.force.is_set()
    finally:
        faulthandler.cancel_dump_traceback_later()


def test_triton_accepts_the_clients_keepalive_pings():
    """The client pings every keepalive_time_ms between calls; Triton must allow that or it sends GOAWAY."""
    import yaml

    from serving.model.checkpoint import REPO_ROOT
    from serving.triton.client import TritonClientSettings
    from serving.triton.launcher import TritonSettings, build_command

    flag = "--grpc-http2-min-recv-ping-interval-without-data="
    local = [a for a in build_command(TritonSettings(), INSTALL) if a.startswith(flag)]
    assert len(local) == 1 and int(local[0].removeprefix(flag)) < TritonClientSettings().keepalive_time_ms
    docs = list(yaml.safe_load_all((REPO_ROOT / "deploy/k8s/base/triton-deployment.yaml").read_text()))
    args = next(c["args"] for d in docs if d and d.get("kind") == "Deployment"
                for c in d["spec"]["template"]["spec"]["containers"] if c["name"] == "triton")
    assert local[0] in args  # the Kubernetes Triton accepts them too
