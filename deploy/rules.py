"""What a rendered overlay must get right to run on a real cluster, beyond schema validity.

Each rule takes the overlay's objects and returns problems (empty: holds), each saying what is
wrong and what to do. `python -m deploy.check` runs them all on every overlay (step "rules"):

- ray-labels: Ray pod templates never set `app.kubernetes.io/name` (KubeRay sets it on its pods
  and selects on it) and carry `vtfuse.io/component`; every selector meant for pods selects
  some pod as it will run (Ray pods with the labels KubeRay adds), and none that selects Ray
  pods uses `app.kubernetes.io/name`.
- kuberay-version: the RayService states the oldest KubeRay it needs
  (`vtfuse.io/kuberay-min-version`) and uses no field newer than that.
- hpa-replicas: a Deployment an HPA scales has no `spec.replicas` (every apply would reset it).
- drain: every serving workload (HPA targets, Ray worker groups) keeps 2 pods at least, a PDB
  lets a drain take one and keeps one, and a hard spread or anti-affinity puts them on different nodes.
- plans: where Triton serves TensorRT, no pod builds plans for itself: a Job builds them once per
  GPU type (`nvidia.com/gpu.product`) into a ReadWriteMany volume, in a folder keyed by GPU
  product and TensorRT version; Triton pods are pinned to that GPU type, mount that folder read-only
  and wait for and verify it first.
- engine-image: the `torch` target runs on a Triton image with torch; the others on one without.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

Obj = dict[str, Any]

MIN_VERSION_ANNOTATION = "vtfuse.io/kuberay-min-version"
PROJECT_LABEL = "vtfuse.io/component"
GPU_PRODUCT = "nvidia.com/gpu.product"
HOSTNAME = "kubernetes.io/hostname"
# The labels KubeRay puts on every Ray pod (over the template's): it selects its pods on them.
KUBERAY_OWNED = ("app.kubernetes.io/name", "app.kubernetes.io/created-by", "ray.io/node-type", "ray.io/group",
                 "ray.io/cluster", "ray.io/is-ray-node", "ray.io/identifier")
# The KubeRay release that introduced each RayService / RayCluster spec field (from its CHANGELOG
# and API docs). A field not listed fails the rule: add it with its version.
KUBERAY_FIELD_SINCE: dict[str, str] = {
    "spec.serveConfigV2": "0.6.0",
    "spec.rayClusterConfig": "0.3.0",
    "spec.serveService": "1.0.0",
    "spec.excludeHeadPodFromServeSvc": "1.1.0",
    "spec.upgradeStrategy": "1.3.0",
    "spec.deploymentUnhealthySecondThreshold": "0.5.0",
    "spec.serviceUnhealthySecondThreshold": "0.5.0",
    "spec.rayClusterConfig.rayVersion": "0.3.0",
    "spec.rayClusterConfig.enableInTreeAutoscaling": "0.3.0",
    "spec.rayClusterConfig.autoscalerOptions": "0.3.0",
    "spec.rayClusterConfig.headGroupSpec": "0.3.0",
    "spec.rayClusterConfig.workerGroupSpecs": "0.3.0",
    "spec.rayClusterConfig.headServiceAnnotations": "0.5.0",
    "spec.rayClusterConfig.suspend": "1.1.0",
    "spec.rayClusterConfig.managedBy": "1.2.0",
    "spec.rayClusterConfig.gcsFaultToleranceOptions": "1.3.0",
}
# TensorRT of the NGC release of the Triton and export images (the plans' loader and builder).
NGC_TENSORRT = {"24.08": "10.3", "24.09": "10.4", "24.10": "10.5", "24.11": "10.6", "24.12": "10.7"}


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def _name(o: Obj) -> str:
    return f"{o.get('kind')}/{o.get('metadata', {}).get('name')}"


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels + matchExpressions, or a Service's map) selects labels."""
    if selector is None:
        return False
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values", [])
        if (op == "In" and labels.get(key) not in values or op == "NotIn" and labels.get(key) in values
                or op == "Exists" and key not in labels or op == "DoesNotExist" and key in labels):
            return False
    return True


def _selector_keys(selector: dict[str, Any]) -> set[str]:
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        return set(selector)
    return set(selector.get("matchLabels") or {}) | {e["key"] for e in selector.get("matchExpressions") or []}


def ray_groups(ray: Obj) -> Iterator[tuple[str, str, Obj, Obj]]:
    """(node type, group name, group spec, pod template) of a RayService's head and worker groups."""
    cluster = ray.get("spec", {}).get("rayClusterConfig", {})
    head = cluster.get("headGroupSpec", {})
    yield "head", "headgroup", head, head.get("template", {})
    for g in cluster.get("workerGroupSpecs", []):
        yield "worker", g.get("groupName", "?"), g, g.get("template", {})


def pods(objects: list[Obj]) -> list[tuple[str, dict[str, str], Obj]]:
    """(where, labels as the pod will carry them, pod spec) of every pod the overlay makes."""
    out = []
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            t = o["spec"]["template"]
            out.append((_name(o), dict(t.get("metadata", {}).get("labels") or {}), t.get("spec", {})))
        elif o["kind"] == "RayService":
            for node_type, group, _, t in ray_groups(o):
                labels = {**(t.get("metadata", {}).get("labels") or {}), "app.kubernetes.io/name": "kuberay",
                          "app.kubernetes.io/created-by": "kuberay-operator", "ray.io/node-type": node_type,
                          "ray.io/group": group, "ray.io/cluster": o["metadata"]["name"], "ray.io/is-ray-node": "yes"}
                out.append((f"{_name(o)} {group}", labels, t.get("spec", {})))
    return out


# --- ray-labels ----------------------------------------------------------------------------


def pod_selectors(objects: list[Obj]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, selector) of every selector that picks pods of this namespace."""
    for o in objects:
        kind, spec = o["kind"], o.get("spec", {})
        if kind == "Service" and spec.get("selector"):
            yield f"{_name(o)} spec.selector", spec["selector"]
        elif kind == "PodDisruptionBudget":
            yield f"{_name(o)} spec.selector", spec.get("selector", {})
        elif kind == "PodMonitor":
            yield f"{_name(o)} spec.selector", spec.get("selector", {})
        elif kind == "NetworkPolicy":
            if _selector_keys(spec.get("podSelector") or {}):
                yield f"{_name(o)} spec.podSelector", spec["podSelector"]
            for i, rule in enumerate(spec.get("ingress") or []):
                for j, peer in enumerate(rule.get("from") or []):
                    if "podSelector" in peer and "namespaceSelector" not in peer:
                        yield f"{_name(o)} ingress[{i}].from[{j}].podSelector", peer["podSelector"]
    for where, _, pod in pods(objects):
        for i, c in enumerate(pod.get("topologySpreadConstraints") or []):
            yield f"{where} topologySpreadConstraints[{i}]", c.get("labelSelector", {})


def rule_ray_labels(objects: list[Obj]) -> list[str]:
    problems = []
    for o in objects:
        if o["kind"] != "RayService":
            continue
        for _, group, _, t in ray_groups(o):
            labels = t.get("metadata", {}).get("labels") or {}
            if "app.kubernetes.io/name" in labels:
                problems.append(f"{_name(o)} {group}: the pod template sets app.kubernetes.io/name, which KubeRay sets "
                                f"on Ray pods and selects on: label them {PROJECT_LABEL} instead")
            if PROJECT_LABEL not in labels:
                problems.append(f"{_name(o)} {group}: the pod template has no {PROJECT_LABEL} label to select it on")
    all_pods = pods(objects)
    for where, selector in pod_selectors(objects):
        chosen = [w for w, labels, _ in all_pods if selects(selector, labels)]
        if not chosen:
            problems.append(f"{where} {selector} selects no pod of the overlay (Ray pods as KubeRay labels them)")
        if any(w.startswith("RayService/") for w in chosen) and "app.kubernetes.io/name" in _selector_keys(selector):
            problems.append(f"{where} selects Ray pods on app.kubernetes.io/name, which KubeRay owns: "
                            f"use {PROJECT_LABEL}")
    services = [o for o in objects if o["kind"] == "Service"]
    for o in objects:
        if o["kind"] == "ServiceMonitor":
            sel = o["spec"].get("selector", {})
            if not any(selects(sel, s["metadata"].get("labels") or {}) for s in services):
                problems.append(f"{_name(o)} spec.selector {sel} selects no Service of the overlay")
    return problems


# --- kuberay-version -----------------------------------------------------------------------


def kuberay_min_version(objects: list[Obj]) -> str | None:
    """The KubeRay version the overlay's RayServices state they need (the highest), None without any."""
    found = [o["metadata"].get("annotations", {}).get(MIN_VERSION_ANNOTATION) for o in objects
             if o["kind"] == "RayService"]
    stated = [v for v in found if v]
    return max(stated, key=_version) if stated else None


def rule_kuberay_version(objects: list[Obj]) -> list[str]:
    problems = []
    for o in objects:
        if o["kind"] != "RayService":
            continue
        stated = o["metadata"].get("annotations", {}).get(MIN_VERSION_ANNOTATION)
        if not stated:
            problems.append(f"{_name(o)}: no {MIN_VERSION_ANNOTATION} annotation: state the oldest KubeRay it needs")
            continue
        spec = o.get("spec", {})
        used = [f"spec.{k}" for k in spec] + [f"spec.rayClusterConfig.{k}" for k in spec.get("rayClusterConfig", {})]
        for path in used:
            since = KUBERAY_FIELD_SINCE.get(path)
            if since is None:
                problems.append(f"{_name(o)}: {path} is not in deploy/rules.py KUBERAY_FIELD_SINCE: add the KubeRay "
                                "version that introduced it")
            elif _version(since) > _version(stated):
                problems.append(f"{_name(o)}: {path} needs KubeRay >= {since}, the annotation "
                                f"{MIN_VERSION_ANNOTATION} says {stated}: raise it (and deploy/README.md)")
    return problems


# --- hpa-replicas and drain ----------------------------------------------------------------


def _hpa_targets(objects: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    for hpa in objects:
        if hpa["kind"] != "HorizontalPodAutoscaler":
            continue
        ref = hpa["spec"]["scaleTargetRef"]
        for o in objects:
            if o["kind"] == ref["kind"] and o["metadata"]["name"] == ref["name"]:
                yield hpa, o


def rule_hpa_replicas(objects: list[Obj]) -> list[str]:
    return [f"{_name(target)} sets spec.replicas while {_name(hpa)} scales it: every apply resets the count; "
            "remove it" for hpa, target in _hpa_targets(objects) if "replicas" in target["spec"]]


def _on_different_nodes(pod: Obj, labels: dict[str, str]) -> bool:
    for c in pod.get("topologySpreadConstraints") or []:
        if (c.get("topologyKey") == HOSTNAME and c.get("whenUnsatisfiable") == "DoNotSchedule"
                and c.get("maxSkew") == 1 and selects(c.get("labelSelector"), labels)):
            return True
    anti = (pod.get("affinity") or {}).get("podAntiAffinity") or {}
    return any(t.get("topologyKey") == HOSTNAME and selects(t.get("labelSelector"), labels)
               for t in anti.get("requiredDuringSchedulingIgnoredDuringExecution") or [])


def _drain_problems(where: str, minimum: int, labels: dict[str, str], pod: Obj, objects: list[Obj]) -> list[str]:
    problems = []
    if minimum < 2:
        problems.append(f"{where}: at least 2 pods (now {minimum}), or a node drain stops the service")
    pdbs = [p for p in objects if p["kind"] == "PodDisruptionBudget" and selects(p["spec"].get("selector"), labels)]
    if not pdbs:
        problems.append(f"{where}: no PodDisruptionBudget selects its pods: add one with maxUnavailable: 1")
    for p in pdbs:
        spec = p["spec"]
        if isinstance(spec.get("maxUnavailable"), int):
            evictable = spec["maxUnavailable"]
        elif isinstance(spec.get("minAvailable"), int):
            evictable = minimum - spec["minAvailable"]
        else:
            problems.append(f"{_name(p)}: use an integer maxUnavailable or minAvailable (percentages round)")
            continue
        if not 1 <= evictable <= minimum - 1:
            problems.append(f"{_name(p)}: at {minimum} pods it lets a drain evict {evictable}: it must evict one "
                            "at least (or drains hang) and keep one serving")
    if not _on_different_nodes(pod, labels):
        problems.append(f"{where}: nothing keeps its pods on different nodes: add a topologySpreadConstraint on "
                        f"{HOSTNAME} with whenUnsatisfiable: DoNotSchedule (or a required podAntiAffinity)")
    return problems


def rule_drain(objects: list[Obj]) -> list[str]:
    problems = []
    for hpa, target in _hpa_targets(objects):
        t = target["spec"]["template"]
        problems += _drain_problems(_name(target), hpa["spec"].get("minReplicas", 1),
                                    t["metadata"].get("labels") or {}, t["spec"], objects)
    by_where = {w: labels for w, labels, _ in pods(objects)}
    for o in objects:
        if o["kind"] != "RayService":
            continue
        for node_type, group, g, t in ray_groups(o):
            if node_type == "worker":
                where = f"{_name(o)} {group}"
                problems += _drain_problems(f"{where} (Ray workers)", g.get("minReplicas", 0), by_where[where],
                                            t.get("spec", {}), objects)
    return problems


# --- plans ---------------------------------------------------------------------------------


def _config_value(objects: list[Obj], ref: dict[str, Any]) -> str | None:
    for o in objects:
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] == ref.get("name"):
            return (o.get("data") or {}).get(ref.get("key"))
    return None


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of args, env values and subPathExpr."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def container_env(c: Obj, objects: list[Obj]) -> dict[str, str]:
    """A container's environment as it will run (ConfigMap references and $(VAR) resolved, in order)."""
    env: dict[str, str] = {}
    for e in c.get("env") or []:
        if "value" in e:
            env[e["name"]] = expand(str(e["value"]), env)
        elif "configMapKeyRef" in (e.get("valueFrom") or {}):
            value = _config_value(objects, e["valueFrom"]["configMapKeyRef"])
            if value is not None:
                env[e["name"]] = value
    return env


def _containers(pod: Obj) -> list[Obj]:
    return list(pod.get("initContainers") or []) + list(pod.get("containers") or [])


def _image_name(c: Obj) -> str:
    return c.get("image", "").rsplit("/", 1)[-1].split("@")[0].split(":")[0]


def _volume(pod: Obj, name: str) -> Obj:
    return next((v for v in pod.get("volumes") or [] if v["name"] == name), {})


def _claim_mount(pod: Obj, c: Obj, claim: str) -> Obj | None:
    for m in c.get("volumeMounts") or []:
        if (_volume(pod, m["name"]).get("persistentVolumeClaim") or {}).get("claimName") == claim:
            return m
    return None


def _under(path: str, mount: str) -> str | None:
    """path relative to a mount point, None outside it."""
    mount = mount.rstrip("/")
    return path[len(mount) + 1:].strip("/") if path.startswith(mount + "/") else None


def _flag(args: list[str], name: str) -> str | None:
    found = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return found[-1] if found else None


def export_targets(objects: list[Obj]) -> dict[str, set[str]]:
    """VTFUSE_EXPORT_TARGET values by the pod that sets them."""
    out: dict[str, set[str]] = {}
    for where, _, pod in pods(objects):
        for c in _containers(pod):
            target = container_env(c, objects).get("VTFUSE_EXPORT_TARGET")
            if target:
                out.setdefault(where, set()).add(target)
    return out


def rule_plans(objects: list[Obj], ngc_release: str | None = None) -> list[str]:
    targets = export_targets(objects)
    problems = []
    tritons = [o for o in objects if o["kind"] == "Deployment" and any(
        _image_name(c).startswith("triton") for c in o["spec"]["template"]["spec"]["containers"])]
    for t in tritons:
        if "tensorrt" in targets.get(_name(t), set()):
            problems.append(f"{_name(t)} builds TensorRT plans in each pod: build them once per GPU type in a Job "
                            "into a shared volume and mount it read-only")
    jobs = [o for o in objects if o["kind"] == "Job" and "tensorrt" in targets.get(_name(o), set())]
    if not jobs:
        return problems
    if not tritons:
        return problems + ["a plan Job but no Triton Deployment to serve its plans"]
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        where = _name(job)
        product = (pod.get("nodeSelector") or {}).get(GPU_PRODUCT)
        if not product:
            problems.append(f"{where}: no nodeSelector {GPU_PRODUCT}: plans must be built on the GPU type they serve")
        exporter: Obj = next((c for c in pod["containers"] if container_env(c, objects).get("VTFUSE_EXPORT_TARGET")),
                             {})
        if _image_name(exporter) != "export":
            problems.append(f"{where}: builds with {exporter.get('image')}, not the export image")
        if "nvidia.com/gpu" not in (exporter.get("resources") or {}).get("limits", {}):
            problems.append(f"{where}: requests no GPU to build plans on")
        env = container_env(exporter, objects)
        plan_dir = env.get("VTFUSE_PLAN_DIR", "")
        claims = [(v["persistentVolumeClaim"]["claimName"], v) for v in pod.get("volumes") or []
                  if "persistentVolumeClaim" in v]
        mount = next(((claim, m) for claim, _ in claims if (m := _claim_mount(pod, exporter, claim))), None)
        if mount is None or not plan_dir:
            problems.append(f"{where}: writes no VTFUSE_PLAN_DIR on a PersistentVolumeClaim (an emptyDir dies with "
                            "the pod)")
            continue
        claim, job_mount = mount
        rel = _under(plan_dir, job_mount["mountPath"])
        if rel is None or job_mount.get("readOnly"):
            problems.append(f"{where}: VTFUSE_PLAN_DIR {plan_dir} is not on its writable mount of {claim}")
            continue
        tensorrt = env.get("VTFUSE_TENSORRT", "")
        if not product or product not in rel.split("/") or not tensorrt or f"trt{tensorrt}" not in rel.split("/"):
            problems.append(f"{where}: the plan folder {rel!r} is not keyed by GPU product ({product}) and "
                            f"TensorRT version (trt{tensorrt})")
        if ngc_release and NGC_TENSORRT.get(ngc_release) and tensorrt != NGC_TENSORRT[ngc_release]:
            problems.append(f"{where}: VTFUSE_TENSORRT is {tensorrt!r}, the images' NGC {ngc_release} ship TensorRT "
                            f"{NGC_TENSORRT[ngc_release]}")
        pvc = next((o for o in objects if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == claim),
                   None)
        if pvc is None:
            problems.append(f"{where}: PersistentVolumeClaim {claim} is not in the overlay")
        elif "ReadWriteMany" not in pvc["spec"].get("accessModes", []):
            problems.append(f"PersistentVolumeClaim/{claim}: Triton pods on every node read it: ReadWriteMany")
        for t in tritons:
            problems += _triton_reads_plans(t, claim, rel, product, objects)
    return problems


def _triton_reads_plans(t: Obj, claim: str, rel: str, product: str | None, objects: list[Obj]) -> list[str]:
    where, pod = _name(t), t["spec"]["template"]["spec"]
    problems = []
    if product and (pod.get("nodeSelector") or {}).get(GPU_PRODUCT) != product:
        problems.append(f"{where}: not pinned to nodeSelector {GPU_PRODUCT}={product}, the GPU type its plans are for")
    triton = next(c for c in pod["containers"] if _image_name(c).startswith("triton"))
    repo = _flag(triton.get("args") or [], "model-repository") or "/models"
    mount: Obj = next((m for m in triton.get("volumeMounts") or [] if m["mountPath"].rstrip("/") == repo.rstrip("/")),
                      {})
    volume = _volume(pod, mount["name"]) if mount else {}
    if (volume.get("persistentVolumeClaim") or {}).get("claimName") != claim:
        problems.append(f"{where}: its model repository {repo} is not the plan volume {claim}")
    else:
        sub = expand(mount.get("subPathExpr") or mount.get("subPath") or "", container_env(triton, objects))
        if sub.strip("/") != f"{rel}/repository":
            problems.append(f"{where}: mounts {claim}:{sub!r} at {repo}, the Job writes {rel}/repository")
        if not (mount.get("readOnly") and volume["persistentVolumeClaim"].get("readOnly")):
            problems.append(f"{where}: mount the plan volume read-only (volumeMount and persistentVolumeClaim)")
    waits = False
    for c in pod.get("initContainers") or []:
        m = _claim_mount(pod, c, claim)
        args = [expand(a, container_env(c, objects)) for a in (c.get("command") or []) + (c.get("args") or [])]
        plan_dir = _flag(args, "plan-dir")
        if m and plan_dir and any("verify-plans" in a for a in args):
            waits = _under(plan_dir, m["mountPath"]) == rel and bool(m.get("readOnly"))
    if not waits:
        problems.append(f"{where}: no init container waits for and verifies {claim}:{rel} (verify-plans.py "
                        "--plan-dir on a read-only mount) before Triton starts")
    return problems


def rule_engine_image(objects: list[Obj]) -> list[str]:
    targets = export_targets(objects)
    problems = []
    for o in objects:
        if o["kind"] != "Deployment":
            continue
        for c in o["spec"]["template"]["spec"]["containers"]:
            name = _image_name(c)
            if not name.startswith("triton"):
                continue
            torch = "torch" in targets.get(_name(o), set())
            if torch and name != "triton-torch":
                problems.append(f"{_name(o)}: the torch target needs the triton-torch image (torch in the Python "
                                f"backend), not {c['image']}")
            if not torch and name != "triton":
                problems.append(f"{_name(o)}: {c['image']} carries torch; its targets ({targets.get(_name(o))}) "
                                "need the triton image")
    return problems


RULES: dict[str, Callable[[list[Obj]], list[str]]] = {
    "ray-labels": rule_ray_labels,
    "kuberay-version": rule_kuberay_version,
    "hpa-replicas": rule_hpa_replicas,
    "drain": rule_drain,
    "plans": rule_plans,
    "engine-image": rule_engine_image,
}


def check(objects: list[Obj], ngc_release: str | None = None) -> dict[str, list[str]]:
    """Problems of every rule, by rule name."""
    out = {name: fn(objects) for name, fn in RULES.items()}
    out["plans"] = rule_plans(objects, ngc_release)
    return out
