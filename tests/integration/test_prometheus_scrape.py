"""A real Prometheus, with deploy/prometheus/prometheus.yml, scrapes the real Triton and the real API.

The committed config and rules are loaded as they are; only the targets (the fixtures' free
ports), the intervals (1 s) and the rules path are rewritten. Traffic goes to Triton's `vqa`
over gRPC and to the API's /v1/vqa; Prometheus's HTTP API must then show both targets up and
both counters risen, the HPA's adapter queries and the recording rules must evaluate, and
every Grafana panel's PromQL must be accepted.
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml

from serving.procs import free_port
from tests.helpers import fresh_samples

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ARTIFACTS = ROOT / "tests" / "artifacts"
JOBS = {"triton", "vtfuse-api"}


@dataclass
class Prometheus:
    """A running prometheus binary and its HTTP API."""

    url: str
    process: subprocess.Popen[bytes]

    def api(self, path: str, **params: str) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        """An instant query's vector (or scalar as a one-sample vector)."""
        data = self.api("query", query=promql)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def value(self, promql: str) -> float:
        """The single value of a query, 0.0 when it has no sample yet."""
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else 0.0

    def wait_for(self, what: str, fn, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            got = fn()
            if got:
                return got
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited with {self.process.returncode} while waiting for {what}")
            if time.monotonic() > deadline:
                pytest.fail(f"Prometheus: {what} not seen within {timeout:.0f} s")
            time.sleep(0.5)


def local_config(triton_metrics: str, api: str, rules_dir: Path) -> dict:
    """deploy/prometheus/prometheus.yml with these targets, short intervals and absolute rule paths."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {c["job_name"]: c for c in config["scrape_configs"]}
    assert set(jobs) == JOBS, f"prometheus.yml jobs {sorted(jobs)}: this test and the rules expect {sorted(JOBS)}"
    assert all(c.get("metrics_path", "/metrics") == "/metrics" for c in jobs.values())
    jobs["triton"]["static_configs"][0]["targets"] = [triton_metrics]
    jobs["vtfuse-api"]["static_configs"][0]["targets"] = [api]
    # A 2 s scrape timeout: on a busy 2-core CI machine one /metrics answer can take over 1 s.
    config["global"].update(scrape_interval="2s", scrape_timeout="2s", evaluation_interval="1s")
    config["rule_files"] = [str(rules_dir / Path(p).name) for p in config["rule_files"]]
    return config


@pytest.fixture(scope="module")
def prometheus(triton, serve_app, tmp_path_factory) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus binary: apt-get install prometheus (.ci/run installs it)")
    tmp = tmp_path_factory.mktemp("prometheus")
    metrics = urllib.parse.urlparse(triton.url_metrics).netloc
    api = urllib.parse.urlparse(serve_app.http_url).netloc
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(local_config(metrics, api, PROMETHEUS_DIR / "rules")))
    port = free_port()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with open(ARTIFACTS / "prometheus.log", "wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # own group: stopped below
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", process)
    try:
        prom.wait_for("/-/ready", lambda: _ready(prom.url), timeout=30)
        yield prom
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
        except ProcessLookupError:
            pass


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _targets_up(prom: Prometheus) -> dict[str, dict] | None:
    active = prom.api("targets", state="active")["activeTargets"]
    by_job = {t["labels"]["job"]: t for t in active}
    if set(by_job) == JOBS and all(t["health"] == "up" for t in by_job.values()):
        return by_job
    return None


def _vqa_inputs(image: bytes, question: str):
    a = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    a.set_data_from_numpy(np.array([[image]], dtype=object))
    b = grpcclient.InferInput("QUESTION", [1, 1], "BYTES")
    b.set_data_from_numpy(np.array([[question.encode()]], dtype=object))
    return [a, b]


TRITON_COUNT = 'sum(nv_inference_count{job="triton", model="vqa"})'
API_COUNT = 'sum(vtfuse_requests_total{job="vtfuse-api", route="/v1/vqa", protocol="http", status="200"})'
N_TRITON, N_API = 8, 4


@dataclass(frozen=True)
class Traffic:
    """The counters as Prometheus saw them before the traffic, and the scrape targets."""

    triton_before: float
    api_before: float
    targets: dict[str, dict]


@pytest.fixture(scope="module")
def traffic(prometheus, triton, serve_app) -> Traffic:
    """Once both targets are up: N_TRITON vqa requests straight to Triton (gRPC), N_API to the API."""
    targets = prometheus.wait_for("both targets up", lambda: _targets_up(prometheus), timeout=30)
    before = Traffic(prometheus.value(TRITON_COUNT), prometheus.value(API_COUNT), targets)
    samples = fresh_samples(N_TRITON, seed=4242)
    client = grpcclient.InferenceServerClient(triton.url_grpc)
    for image, qa, _ in samples:
        client.infer("vqa", _vqa_inputs(image, qa.question), client_timeout=60)
    with httpx.Client(base_url=serve_app.http_url, timeout=30) as http:
        for image, qa, _ in samples[:N_API]:
            r = http.post("/v1/vqa", json={"image": base64.b64encode(image).decode(), "questions": [qa.question]})
            assert r.status_code == 200, r.text
    return before


def test_targets_up_and_both_counters_rise(prometheus, triton, serve_app, traffic):
    targets = traffic.targets
    assert targets["triton"]["scrapeUrl"] == triton.url_metrics
    assert targets["vtfuse-api"]["scrapeUrl"] == f"{serve_app.http_url}/metrics"
    assert all(t["lastError"] == "" for t in targets.values())
    assert prometheus.value('sum(up{job=~"triton|vtfuse-api"})') == 2

    prometheus.wait_for(f"nv_inference_count{{model=vqa}} +{N_TRITON}",
                        lambda: prometheus.value(TRITON_COUNT) >= traffic.triton_before + N_TRITON)
    prometheus.wait_for(f"the API's vtfuse_requests_total{{route=/v1/vqa}} +{N_API}",
                        lambda: prometheus.value(API_COUNT) >= traffic.api_before + N_API)
    # The API's requests reached Triton's engines too (the API calls them, not vqa).
    assert prometheus.value('sum(nv_inference_count{job="triton", model="fusion"})') >= N_TRITON + N_API


def test_hpa_adapter_queries_and_recording_rules_evaluate(prometheus, triton, traffic):
    adapter = yaml.safe_load((PROMETHEUS_DIR / "prometheus-adapter-values.yaml").read_text())
    for rule in adapter["rules"]["custom"]:
        # What the adapter sends for one pod, with this Prometheus's labels for "the pod".
        promql = rule["metricsQuery"].replace("<<.LabelMatchers>>", 'job="triton"').replace("<<.GroupBy>>", "instance")
        result = prometheus.wait_for(rule["name"]["as"], lambda q=promql: prometheus.query(q), timeout=20)
        value = float(result[0]["value"][1])
        assert math.isfinite(value) and value >= 0, (rule["name"]["as"], value)

    def evaluated() -> list[dict] | None:
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        return rules if rules and all(r["health"] != "unknown" for r in rules) else None

    rules = prometheus.wait_for("every rule evaluated", evaluated, timeout=20)
    assert len(rules) == 11
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    # A 1-minute rate of fresh traffic: on a busy machine the fixture's traffic can be over a minute old
    # by now, and then the rate is rightly 0 (a CI run saw that).
    client = grpcclient.InferenceServerClient(triton.url_grpc)
    for image, qa, _ in fresh_samples(4, seed=4343):
        client.infer("vqa", _vqa_inputs(image, qa.question), client_timeout=60)
    prometheus.wait_for(
        "vtfuse:triton_inferences:rate1m{model=fusion} > 0",
        lambda: [r for r in prometheus.query('vtfuse:triton_inferences:rate1m{model="fusion"}')
                 if float(r["value"][1]) > 0],
    )
    # Firing, not pending: one slow scrape makes an alert pending; its `for: 1m` is what keeps it from paging.
    firing = [a for a in prometheus.api("alerts")["alerts"]
              if a["labels"]["alertname"] in ("VtfuseTritonDown", "VtfuseApiDown") and a["state"] == "firing"]
    assert firing == []


def test_every_dashboard_query_is_valid_promql(prometheus, traffic):
    dashboard = json.loads((ROOT / "deploy" / "k8s" / "base" / "grafana" / "vtfuse-dashboard.json").read_text())
    answered = {}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            promql = target["expr"].replace("$namespace", ".*").replace("$__rate_interval", "1m")
            answered[panel["title"]] = prometheus.query(promql)  # raises on a PromQL error
    assert answered["Triton throughput"], "nv_inference_count is scraped"
    assert answered["API throughput"], "vtfuse_requests_total is scraped"
