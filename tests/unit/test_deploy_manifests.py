"""The rendered Kubernetes overlays: what a cluster operator relies on, checked on `kubectl kustomize` output."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy import check, rules, serve_render

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = check.overlays()
RAY_PIN = re.search(r"^ray==([\w.]+)$", (ROOT / "constraints.txt").read_text(), re.M)


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict[str, Any]]]:
    return request.param, check.render(request.param)


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def triton_pod(objects) -> dict[str, Any]:
    return one(objects, "Deployment", "triton")["spec"]["template"]["spec"]


def container(pod: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    items = pod["initContainers" if init else "containers"]
    return next(c for c in items if c["name"] == name)


def flag(args: list[str], name: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return values[-1] if values else None


def pod_specs(objects) -> list[tuple[str, dict[str, Any]]]:
    """Every pod spec in the overlay: Deployments and the RayService's head and worker groups."""
    out = [(f"Deployment/{o['metadata']['name']}", o["spec"]["template"]["spec"])
           for o in objects if o["kind"] == "Deployment"]
    for o in objects:
        if o["kind"] == "RayService":
            out += [(f"RayService/{group}", t["spec"]) for group, t in check.ray_pod_templates(o)]
    return out


def test_every_overlay_exists():
    assert {"cpu", "gpu", "gpu-torch"} <= set(OVERLAYS)


def test_every_kind_a_cluster_needs_is_there(rendered):
    _, objects = rendered
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "RayService", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "NetworkPolicy", "ServiceMonitor", "PodMonitor", "ConfigMap"} <= kinds
    assert all(o["metadata"].get("namespace") == "vtfuse" for o in objects if o["kind"] != "Namespace")


def test_triton_probes_and_drain(rendered):
    _, objects = rendered
    pod = triton_pod(objects)
    triton = container(pod, "triton")
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    startup = triton["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/ready"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "models get at least 5 minutes to load"
    exit_timeout = int(flag(triton["args"], "exit-timeout-secs"))
    pre_stop = triton["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > exit_timeout + pre_stop


def test_triton_model_control_off_and_admin_apis_restricted(rendered):
    _, objects = rendered
    triton = container(triton_pod(objects), "triton")
    args = triton["args"]
    assert flag(args, "model-control-mode") == "none"
    assert flag(args, "model-repository") == "/models"
    for option in ("http-restricted-api", "grpc-restricted-protocol"):
        apis, _, key = flag(args, option).partition(":")
        assert {"model-repository", "model-config", "shared-memory"} <= set(apis.split(","))
        assert key == "vtfuse-admin=$(TRITON_ADMIN_KEY)"
    env = {e["name"]: e for e in triton["env"]}
    assert env["TRITON_ADMIN_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "triton-admin", "key": "key"}
    mounts = {m["mountPath"]: m for m in triton["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    assert "/dev/shm" in mounts, "the Python backend needs more than the runtime's 64 MiB /dev/shm"


TARGET = {"cpu": "onnxruntime", "gpu-torch": "torch"}


def test_model_repository_comes_from_the_export_init_container_or_the_plan_volume(rendered):
    overlay, objects = rendered
    pod = triton_pod(objects)
    inits = {c["name"] for c in pod.get("initContainers", [])}
    if overlay == "gpu":
        assert inits == {"plans"}, "no plan is built in a Triton pod"
        mount = next(m for m in container(pod, "triton")["volumeMounts"] if m["mountPath"] == "/models")
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["persistentVolumeClaim"] == {"claimName": "trt-plans", "readOnly": True}
        assert mount["subPathExpr"].endswith("/repository") and mount["readOnly"] is True
        return
    export = container(pod, "export", init=True)
    env = {e["name"]: e.get("value") for e in export["env"]}
    assert env["VTFUSE_REPO"] == "/models"
    assert env["VTFUSE_EXPORT_TARGET"] == TARGET[overlay]
    assert {"models", "plan-cache"} <= {m["name"] for m in export["volumeMounts"]}
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == "models")


def test_gpu_overlay_builds_plans_once_per_gpu_type_in_a_job(rendered):
    overlay, objects = rendered
    jobs = [o for o in objects if o["kind"] == "Job"]
    if overlay != "gpu":
        assert jobs == []
        return
    job = one(objects, "Job", "trt-plans")
    cm = one(objects, "ConfigMap", "trt-plans")["data"]
    assert cm["tensorrt"] == "10.5", "NGC 24.10's TensorRT"
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["nvidia.com/gpu.product"] == cm["gpu-product"] == \
        triton_pod(objects)["nodeSelector"]["nvidia.com/gpu.product"]
    export = container(pod, "export")
    assert export["image"].endswith("/export:0.1.0")
    assert export["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e.get("value") for e in export["env"]}
    assert env["VTFUSE_EXPORT_TARGET"] == "tensorrt"
    assert env["VTFUSE_PLAN_DIR"] == "/plans/$(VTFUSE_GPU_PRODUCT)/trt$(VTFUSE_TENSORRT)/$(VTFUSE_RELEASE)"
    assert one(objects, "PersistentVolumeClaim", "trt-plans")["spec"]["accessModes"] == ["ReadWriteMany"]
    plans = container(triton_pod(objects), "plans", init=True)
    assert plans["command"] == ["python3", "/opt/vtfuse/bin/verify-plans.py"]
    assert flag(plans["args"], "plan-dir") == env["VTFUSE_PLAN_DIR"]
    assert plans["image"].endswith("/triton:0.1.0")


def test_gpu_only_in_the_gpu_overlays(rendered):
    overlay, objects = rendered
    pod = triton_pod(objects)
    triton = container(pod, "triton")
    if overlay.startswith("gpu"):
        assert triton["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert triton["resources"]["requests"]["nvidia.com/gpu"] == "1"
        assert flag(triton["args"], "allow-gpu-metrics") == "true"
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
        if overlay == "gpu-torch":  # the torch repository is rendered on the CPU
            assert "nvidia.com/gpu" not in json.dumps(container(pod, "export", init=True))
    else:
        assert "nvidia.com/gpu" not in json.dumps(objects)


def test_every_pod_meets_the_restricted_pod_security_standard(rendered):
    _, objects = rendered
    ns = one(objects, "Namespace", "vtfuse")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    specs = pod_specs(objects)
    assert len(specs) >= 3  # Triton, Ray head, Ray workers
    for where, pod in specs:
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert psc["runAsUser"] > 0, where
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (where, c["name"])
            assert "limits" in c["resources"] and "memory" in c["resources"]["limits"], (where, c["name"])
            assert not c["image"].endswith(":latest") and ":" in c["image"], (where, c["image"])


def test_services_expose_triton_and_the_api(rendered):
    _, objects = rendered
    svc = one(objects, "Service", "triton")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert svc["spec"]["selector"] == {"vtfuse.io/component": "triton"}
    assert one(objects, "Service", "triton-headless")["spec"]["clusterIP"] == "None"
    ray = one(objects, "RayService", "vtfuse")
    ports = {p["name"]: p["port"] for p in ray["spec"]["serveService"]["spec"]["ports"]}
    assert ports == {"serve": 8080, "grpc": 9000}


def test_hpa_scales_triton_on_queue_signals_the_adapter_serves(rendered):
    _, objects = rendered
    hpa = one(objects, "HorizontalPodAutoscaler", "triton")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "triton"}
    assert all(m["type"] == "Pods" for m in hpa["spec"]["metrics"]), "CPU is the wrong signal for a GPU server"
    names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    adapter = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-adapter-values.yaml").read_text())
    served = {r["name"]["as"] for r in adapter["rules"]["custom"]}
    assert names == served == {"triton_queue_duration_us_per_request", "triton_pending_requests"}
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in one(objects, "Deployment", "triton")["spec"], "the HPA owns the count"
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_disruption_budgets_select_real_pods(rendered):
    _, objects = rendered
    triton_labels = one(objects, "Deployment", "triton")["spec"]["template"]["metadata"]["labels"]
    pdb = one(objects, "PodDisruptionBudget", "triton")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= triton_labels.items()
    workers = [labels for where, labels, _ in rules.pods(objects) if where == "RayService/vtfuse cpu"]
    ray_pdb = one(objects, "PodDisruptionBudget", "vtfuse-serve-workers")
    assert ray_pdb["spec"]["selector"]["matchLabels"].items() <= workers[0].items()


# --- NetworkPolicy: a small evaluator of the policies as the API server defines them ---------


def _selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return True
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        present = e["key"] in labels
        if e["operator"] == "In" and labels.get(e["key"]) not in e["values"]:
            return False
        if e["operator"] == "NotIn" and labels.get(e["key"]) in e["values"]:
            return False
        if e["operator"] == "Exists" and not present or e["operator"] == "DoesNotExist" and present:
            return False
    return True


def allowed(objects, to: dict[str, str], port: int, src: dict[str, str], src_ns: str = "vtfuse") -> bool:
    """Whether ingress from pod `src` (namespace `src_ns`) to a vtfuse pod `to` on `port` is allowed."""
    policies = [p for p in objects if p["kind"] == "NetworkPolicy" and _selects(p["spec"]["podSelector"], to)]
    ingress = [p for p in policies if "Ingress" in p["spec"]["policyTypes"]]
    if not ingress:
        return True
    ns_labels = {"kubernetes.io/metadata.name": src_ns}
    for p in ingress:
        for rule in p["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(q["port"] == port for q in ports):
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                ns_ok = (src_ns == "vtfuse") if "namespaceSelector" not in peer else _selects(
                    peer["namespaceSelector"], ns_labels)
                if ns_ok and _selects(peer.get("podSelector"), src):
                    return True
    return False


TRITON = {"app.kubernetes.io/name": "triton", "vtfuse.io/component": "triton"}
# As KubeRay labels a worker: its own app.kubernetes.io/name over the template's labels.
SERVE = {"vtfuse.io/component": "serve", "app.kubernetes.io/name": "kuberay", "ray.io/node-type": "worker"}
PROMETHEUS = {"app.kubernetes.io/name": "prometheus"}
OTHER = {"app": "something-else"}


def test_network_policies_only_serve_reaches_triton_and_only_prometheus_scrapes(rendered):
    _, objects = rendered
    assert allowed(objects, TRITON, 8001, SERVE)
    assert not allowed(objects, TRITON, 8001, OTHER), "a stranger pod must not reach Triton's gRPC"
    assert not allowed(objects, TRITON, 8001, SERVE, src_ns="default")
    assert not allowed(objects, TRITON, 8001, PROMETHEUS, src_ns="monitoring")
    assert allowed(objects, TRITON, 8002, PROMETHEUS, src_ns="monitoring")
    assert not allowed(objects, TRITON, 8002, SERVE), "metrics only to Prometheus"
    assert not allowed(objects, TRITON, 8002, PROMETHEUS, src_ns="default")
    assert allowed(objects, SERVE, 8090, PROMETHEUS, src_ns="monitoring")
    assert not allowed(objects, SERVE, 8090, OTHER)
    assert allowed(objects, SERVE, 8080, OTHER, src_ns="anywhere") and allowed(objects, SERVE, 9000, OTHER)
    assert allowed(objects, SERVE, 6379, SERVE), "Ray nodes talk to each other"
    assert allowed(objects, SERVE, 8265, {"app.kubernetes.io/name": "kuberay-operator"}, src_ns="ray-system")


# --- Monitoring ----------------------------------------------------------------------------


def test_monitors_select_the_pods_and_ports_that_serve_metrics(rendered):
    _, objects = rendered
    sm = one(objects, "ServiceMonitor", "triton")
    svc = one(objects, "Service", "triton")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
    pm = one(objects, "PodMonitor", "vtfuse-serve")
    ray = one(objects, "RayService", "vtfuse")
    for group, template in check.ray_pod_templates(ray):
        assert pm["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items(), group
        ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        assert ports["metrics"] == 8090, group
    params = [ray["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]]
    params += [g["rayStartParams"] for g in ray["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    assert all(p["metrics-export-port"] == "8090" for p in params), "KubeRay's default 8080 is Serve's HTTP port"
    relabel = pm["spec"]["podMetricsEndpoints"][0]["metricRelabelings"][0]
    assert re.fullmatch(relabel["regex"], "ray_vtfuse_requests_total")


def test_grafana_dashboard_has_the_panels_an_operator_needs(rendered):
    _, objects = rendered
    cm = one(objects, "ConfigMap", "vtfuse-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["vtfuse-dashboard.json"])
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dashboard["panels"]}
    assert "vtfuse_requests_total" in exprs["API throughput"] and "nv_inference_count" in exprs["Triton throughput"]
    assert "histogram_quantile(0.99" in exprs["API latency p50 / p99"]
    assert 'quantile="0.99"' in exprs["Triton request latency p99"]
    assert "nv_inference_queue_duration_us" in exprs["Triton queue time per request"]
    assert "nv_inference_exec_count" in exprs["Average batch size"]
    assert "nv_inference_request_failure" in exprs["Errors"] and 'status=~"4..|5.."' in exprs["Errors"]


# --- RayService / Serve --------------------------------------------------------------------


def test_rayservice_serves_the_app_of_serve_config_yaml(rendered):
    _, objects = rendered
    ray = one(objects, "RayService", "vtfuse")
    deployed = yaml.safe_load(ray["spec"]["serveConfigV2"])
    assert deployed == serve_render.render_config()
    source = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    overrides = yaml.safe_load((DEPLOY / "k8s" / "serve-overrides.yaml").read_text())
    assert [a["name"] for a in deployed["applications"]] == [a["name"] for a in source["applications"]]
    for app, src in zip(deployed["applications"], source["applications"]):
        assert app["import_path"] == src["import_path"] == "serving.app.builder:build_app"
        assert app["route_prefix"] == src["route_prefix"]
        changed = set(overrides["applications"].get(app["name"], {}).get("args", {}))
        for key, value in src.get("args", {}).items():
            if key not in changed:
                assert app["args"][key] == value, key
    assert deployed["grpc_options"] == source["grpc_options"]
    assert deployed["http_options"]["port"] == source["http_options"]["port"] == 8080
    assert deployed["http_options"]["host"] == "0.0.0.0", "a pod must listen beyond loopback"


def test_serve_autoscaling_and_shutdown_fit_the_pods(rendered):
    _, objects = rendered
    ray = one(objects, "RayService", "vtfuse")
    app = yaml.safe_load(ray["spec"]["serveConfigV2"])["applications"][0]
    workers = ray["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert ray["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    assert all(g["maxReplicas"] > g["minReplicas"] >= 1 for g in workers)
    limit = app["args"]["limits"]["max_inflight"]
    for d in app["deployments"]:
        auto = d["autoscaling_config"]
        assert "num_replicas" not in d, "Serve refuses num_replicas together with autoscaling_config"
        assert auto["max_replicas"] > auto["min_replicas"] >= 1
        if d["name"] == "Ingress":
            assert auto["target_ongoing_requests"] < limit <= d["max_ongoing_requests"]
        grace = d.get("graceful_shutdown_timeout_s", 20)
        assert all(g["template"]["spec"]["terminationGracePeriodSeconds"] > grace for g in workers)
    assert ray["spec"]["rayClusterConfig"]["rayVersion"] == RAY_PIN.group(1)


def test_images_come_from_the_overlay_registry(rendered):
    overlay, objects = rendered
    images = set(re.findall(r'"image": "([^"]+)"', json.dumps(objects)))
    triton = "triton-torch" if overlay == "gpu-torch" else "triton"
    assert images == {f"registry.example.com/vtfuse/{n}:0.1.0" for n in (triton, "export", "serve")}
