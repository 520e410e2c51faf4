"""deploy/rules.py: each rule holds on every overlay and fails on a manifest that breaks it; verify-plans.py."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest

from deploy import check, rules

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def overlays() -> dict[str, list[dict[str, Any]]]:
    return {name: check.render(name) for name in check.overlays()}


@pytest.fixture
def gpu(overlays):
    return copy.deepcopy(overlays["gpu"])


@pytest.fixture
def torch_overlay(overlays):
    return copy.deepcopy(overlays["gpu-torch"])


def get(objects, kind, name=None):
    return next(o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name))


def triton_pod(objects):
    return get(objects, "Deployment", "triton")["spec"]["template"]["spec"]


def ray_groups(objects):
    return [(g, t) for _, g, _, t in rules.ray_groups(get(objects, "RayService"))]


def fails(objects, rule, pattern):
    problems = rules.check(objects, check.ngc_release())[rule]
    assert any(re.search(pattern, p) for p in problems), problems
    return problems


def test_every_overlay_passes_every_rule(overlays):
    assert set(overlays) == {"cpu", "gpu", "gpu-torch"}
    for name, objects in overlays.items():
        assert rules.check(objects, check.ngc_release()) == {r: [] for r in rules.RULES}, name


def test_deploy_check_runs_the_rules_and_agrees_with_the_readme():
    lines = check.step_rules(check.overlays())
    assert any(line.startswith("gpu: ray-labels ok") for line in lines)


def test_readme_must_state_the_kuberay_version_the_manifests_need(monkeypatch, tmp_path):
    readme = tmp_path / "README.md"
    text = (ROOT / "deploy" / "README.md").read_text()
    readme.write_text(text.replace("KubeRay operator ≥ 1.3", "KubeRay operator ≥ 1.1"))
    monkeypatch.setattr(check, "README", readme)
    with pytest.raises(check.CheckFailed, match=r"README.md states KubeRay operator ≥ 1.1, the RayService needs 1.3.0"):
        check.step_rules(["cpu"])


# --- ray-labels ----------------------------------------------------------------------------


def test_ray_pod_template_must_not_set_app_kubernetes_io_name(gpu):
    for _, t in ray_groups(gpu):
        t["metadata"]["labels"]["app.kubernetes.io/name"] = "vtfuse-serve"
    fails(gpu, "ray-labels", r"cpu: the pod template sets app.kubernetes.io/name")


def test_selecting_ray_pods_on_app_kubernetes_io_name_selects_nothing(gpu):
    get(gpu, "PodMonitor")["spec"]["selector"] = {"matchLabels": {"app.kubernetes.io/name": "vtfuse-serve"}}
    get(gpu, "NetworkPolicy", "serve-api")["spec"]["podSelector"] = {
        "matchLabels": {"app.kubernetes.io/name": "vtfuse-serve"}}
    fails(gpu, "ray-labels", r"PodMonitor/vtfuse-serve spec.selector .* selects no pod")
    fails(gpu, "ray-labels", r"NetworkPolicy/serve-api spec.podSelector .* selects no pod")


def test_selecting_ray_pods_on_kuberays_own_name_is_refused(gpu):
    get(gpu, "PodDisruptionBudget", "vtfuse-serve-workers")["spec"]["selector"]["matchLabels"][
        "app.kubernetes.io/name"] = "kuberay"
    fails(gpu, "ray-labels", r"vtfuse-serve-workers spec.selector selects Ray pods on app.kubernetes.io/name")


def test_a_service_monitor_must_select_a_service(gpu):
    get(gpu, "ServiceMonitor")["spec"]["selector"] = {"matchLabels": {"app.kubernetes.io/name": "tritn"}}
    fails(gpu, "ray-labels", r"ServiceMonitor/triton .* selects no Service")


# --- kuberay-version -----------------------------------------------------------------------


def test_kuberay_version_must_be_stated(gpu):
    del get(gpu, "RayService")["metadata"]["annotations"][rules.MIN_VERSION_ANNOTATION]
    fails(gpu, "kuberay-version", r"no vtfuse.io/kuberay-min-version annotation")


def test_fields_newer_than_the_stated_kuberay_fail(gpu):
    ray = get(gpu, "RayService")
    ray["metadata"]["annotations"][rules.MIN_VERSION_ANNOTATION] = "1.1.0"
    fails(gpu, "kuberay-version", r"spec.upgradeStrategy needs KubeRay >= 1.3.0, .* says 1.1.0")
    ray["spec"]["rayClusterConfig"]["brandNewField"] = {}
    fails(gpu, "kuberay-version", r"brandNewField is not in deploy/rules.py KUBERAY_FIELD_SINCE")


# --- hpa-replicas and drain ----------------------------------------------------------------


def test_replicas_under_an_hpa_fail(gpu):
    get(gpu, "Deployment", "triton")["spec"]["replicas"] = 2
    fails(gpu, "hpa-replicas", r"Deployment/triton sets spec.replicas while HorizontalPodAutoscaler/triton")


def test_one_triton_replica_does_not_survive_a_drain(gpu):
    get(gpu, "HorizontalPodAutoscaler")["spec"]["minReplicas"] = 1
    fails(gpu, "drain", r"Deployment/triton: at least 2 pods \(now 1\)")


def test_a_pdb_that_blocks_drains_or_empties_the_service_fails(gpu):
    pdb = get(gpu, "PodDisruptionBudget", "triton")["spec"]
    del pdb["maxUnavailable"]
    pdb["minAvailable"] = 2
    fails(gpu, "drain", r"PodDisruptionBudget/triton: at 2 pods it lets a drain evict 0")
    pdb.pop("minAvailable")
    pdb["maxUnavailable"] = 2
    fails(gpu, "drain", r"at 2 pods it lets a drain evict 2")


def test_no_pdb_fails(gpu):
    gpu[:] = [o for o in gpu if not (o["kind"] == "PodDisruptionBudget" and o["metadata"]["name"] == "triton")]
    fails(gpu, "drain", r"Deployment/triton: no PodDisruptionBudget selects its pods")


def test_a_soft_spread_does_not_keep_pods_apart(gpu):
    for c in triton_pod(gpu)["topologySpreadConstraints"]:
        c["whenUnsatisfiable"] = "ScheduleAnyway"
    fails(gpu, "drain", r"Deployment/triton: nothing keeps its pods on different nodes")
    term = {"topologyKey": "kubernetes.io/hostname",
            "labelSelector": {"matchLabels": {"vtfuse.io/component": "triton"}}}
    triton_pod(gpu)["affinity"] = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}
    assert rules.rule_drain(gpu) == []


def test_one_ray_worker_does_not_survive_a_drain(gpu):
    get(gpu, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplicas"] = 1
    fails(gpu, "drain", r"RayService/vtfuse cpu \(Ray workers\): at least 2 pods \(now 1\)")


# --- plans ---------------------------------------------------------------------------------


def test_plans_built_in_each_triton_pod_fail(overlays):
    old = copy.deepcopy(overlays["cpu"])
    export = next(c for c in triton_pod(old)["initContainers"] if c["name"] == "export")
    next(e for e in export["env"] if e["name"] == "VTFUSE_EXPORT_TARGET")["value"] = "tensorrt"
    fails(old, "plans", r"Deployment/triton builds TensorRT plans in each pod")


def test_plan_job_must_be_pinned_to_a_gpu_product(gpu):
    del get(gpu, "Job")["spec"]["template"]["spec"]["nodeSelector"][rules.GPU_PRODUCT]
    fails(gpu, "plans", r"Job/trt-plans: no nodeSelector nvidia.com/gpu.product")


def test_plans_on_an_emptydir_fail(gpu):
    pod = get(gpu, "Job")["spec"]["template"]["spec"]
    next(v for v in pod["volumes"] if v["name"] == "plans").clear()
    next(v for v in pod["volumes"] if not v).update({"name": "plans", "emptyDir": {}})
    fails(gpu, "plans", r"writes no VTFUSE_PLAN_DIR on a PersistentVolumeClaim")


def test_plan_folder_must_be_keyed_by_gpu_and_tensorrt(gpu):
    env = get(gpu, "Job")["spec"]["template"]["spec"]["containers"][0]["env"]
    next(e for e in env if e["name"] == "VTFUSE_PLAN_DIR")["value"] = "/plans/$(VTFUSE_RELEASE)"
    fails(gpu, "plans", r"is not keyed by GPU product")


def test_tensorrt_must_be_the_images_one(gpu):
    get(gpu, "ConfigMap", "trt-plans")["data"]["tensorrt"] = "10.3"
    fails(gpu, "plans", r"VTFUSE_TENSORRT is '10.3', the images' NGC 24.10 ship TensorRT 10.5")


def test_plan_volume_must_be_read_write_many(gpu):
    get(gpu, "PersistentVolumeClaim")["spec"]["accessModes"] = ["ReadWriteOnce"]
    fails(gpu, "plans", r"PersistentVolumeClaim/trt-plans: .* ReadWriteMany")


def test_triton_must_mount_the_plans_read_only_from_the_jobs_folder(gpu):
    pod = triton_pod(gpu)
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/models")
    mount["readOnly"] = False
    fails(gpu, "plans", r"mount the plan volume read-only")
    mount["subPathExpr"] = "$(VTFUSE_GPU_PRODUCT)/repository"
    fails(gpu, "plans", r"mounts trt-plans:'NVIDIA-A100-SXM4-80GB/repository' at /models, the Job writes")


def test_triton_must_run_on_the_plans_gpu_type(gpu):
    triton_pod(gpu)["nodeSelector"][rules.GPU_PRODUCT] = "Tesla-T4"
    fails(gpu, "plans", r"Deployment/triton: not pinned to nodeSelector nvidia.com/gpu.product=NVIDIA-A100")


def test_triton_must_wait_for_and_verify_the_plans(gpu):
    triton_pod(gpu)["initContainers"] = []
    fails(gpu, "plans", r"no init container waits for and verifies trt-plans")


# --- engine-image --------------------------------------------------------------------------


def test_torch_target_needs_the_torch_image_and_only_it(torch_overlay, gpu):
    triton_pod(torch_overlay)["containers"][0]["image"] = "registry.example.com/vtfuse/triton:0.1.0"
    fails(torch_overlay, "engine-image", r"the torch target needs the triton-torch image")
    triton_pod(gpu)["containers"][0]["image"] = "registry.example.com/vtfuse/triton-torch:0.1.0"
    fails(gpu, "engine-image", r"carries torch")


# --- verify-plans.py -----------------------------------------------------------------------


def _verify_module():
    spec = importlib.util.spec_from_file_location("verify_plans", ROOT / "deploy" / "docker" / "verify-plans.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plan_dir(tmp_path: Path, gpu: str = "NVIDIA A100-SXM4-80GB", trt: str = "10.5.0.18") -> Path:
    plan_dir = tmp_path / "NVIDIA-A100-SXM4-80GB" / "trt10.5" / "0.1.0"
    manifests = {}
    for model in ("image_encoder", "vqa"):
        vdir = plan_dir / "repository" / model / "1"
        vdir.mkdir(parents=True)
        (vdir / "model.plan").write_bytes(model.encode())
        manifest = {"artefacts": {"model.plan": hashlib.sha256(model.encode()).hexdigest()},
                    "tensorrt": {"gpu": gpu, "version": trt}}
        (vdir / "manifest.json").write_text(json.dumps(manifest))
        manifests[model] = hashlib.sha256((vdir / "manifest.json").read_bytes()).hexdigest()
    (plan_dir / "READY").write_text(json.dumps({"gpu": gpu, "tensorrt": trt, "manifests": manifests}))
    return plan_dir


def _run(verify, plan_dir, gpu="NVIDIA A100-SXM4-80GB", **kw):
    args = [f"--plan-dir={plan_dir}", "--gpu-product=NVIDIA-A100-SXM4-80GB", "--tensorrt=10.5", f"--gpu-name={gpu}",
            "--wait-s=0", "--poll-s=0"]
    return verify.main(args + [f"--{k}={v}" for k, v in kw.items()])


def test_verify_plans_accepts_good_plans(tmp_path, capsys):
    verify = _verify_module()
    assert _run(verify, _plan_dir(tmp_path)) == 0
    assert "ok: 2 models" in capsys.readouterr().out
    assert verify.same_product("NVIDIA A100-SXM4-80GB", "NVIDIA-A100-SXM4-80GB-SHARED")


def test_verify_plans_waits_then_gives_up_without_ready(tmp_path, capsys):
    assert _run(_verify_module(), tmp_path / "nothing") == 2
    assert "is the trt-plans Job for NVIDIA-A100-SXM4-80GB running?" in capsys.readouterr().err


def test_verify_plans_refuses_another_gpu_tensorrt_or_a_changed_file(tmp_path, capsys):
    verify = _verify_module()
    plan_dir = _plan_dir(tmp_path)
    assert _run(verify, plan_dir, gpu="Tesla T4") == 1
    assert "this pod's GPU is a 'Tesla T4'" in capsys.readouterr().err
    (plan_dir / "repository" / "vqa" / "1" / "model.plan").write_bytes(b"other")
    assert _run(verify, plan_dir) == 1
    assert "vqa: model.plan does not match its manifest's sha256" in capsys.readouterr().err
    other = _plan_dir(tmp_path / "b", trt="10.3.0.26")
    assert _run(verify, other) == 1
    assert "built by TensorRT 10.3.0.26, the Triton image loads 10.5" in capsys.readouterr().err


# --- the export entrypoint's Job mode (a fake `python` stands in for the export pipeline) ---

FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$FAKE_LOG"
if [ "$1" = "-m" ]; then
  case "$*" in
    *" export engine "*) exit 0 ;;
    *" export install "*|*" export all "*)
      repo=$(echo "$*" | sed 's/.*--repo \\([^ ]*\\).*/\\1/')
      for m in image_encoder vqa; do
        mkdir -p "$repo/$m/1" && printf '%s' "$m" > "$repo/$m/1/model.plan"
        sum=$(printf '%s' "$m" | sha256sum | cut -d' ' -f1)
        printf '{"artefacts": {"model.plan": "%s"}, "tensorrt": {"gpu": "%s"}}' "$sum" "$FAKE_GPU" \\
          > "$repo/$m/1/manifest.json"
      done
      exit 0 ;;
  esac
  exit 9
fi
exec "$REAL_PYTHON" "$@"
"""


@pytest.fixture
def job_env(tmp_path):
    import os
    import sys

    bin_dir, stubs = tmp_path / "bin", tmp_path / "stubs"
    (stubs / "export").mkdir(parents=True)
    (stubs / "tensorrt.py").write_text('__version__ = "10.5.0.18"\n')
    (stubs / "export" / "__init__.py").write_text("")
    (stubs / "export" / "engine.py").write_text("import os\n\ndef gpu_name():\n    return os.environ['FAKE_GPU']\n")
    bin_dir.mkdir()
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    (tmp_path / "baked" / "tiny").mkdir(parents=True)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(stubs), "REAL_PYTHON": sys.executable,
           "FAKE_LOG": str(tmp_path / "calls.log"), "FAKE_GPU": "NVIDIA A100-SXM4-80GB", "TMPDIR": str(tmp_path),
           "VTFUSE_ONNX_SRC": str(tmp_path / "baked"), "VTFUSE_EXPORT_TARGET": "tensorrt",
           "VTFUSE_GPU_PRODUCT": "NVIDIA-A100-SXM4-80GB", "VTFUSE_RELEASE": "0.1.0",
           "VTFUSE_PLAN_DIR": str(tmp_path / "plans" / "NVIDIA-A100-SXM4-80GB" / "trt10.5" / "0.1.0"),
           "VTFUSE_PLAN_CACHE": str(tmp_path / "plans" / "NVIDIA-A100-SXM4-80GB" / "trt10.5" / "cache")}
    return tmp_path, env


def _entrypoint(env):
    import subprocess

    return subprocess.run(["sh", str(ROOT / "deploy" / "docker" / "export-entrypoint.sh")], env=env,
                          cwd=env["TMPDIR"], capture_output=True, text=True, check=False)


def test_job_mode_writes_a_repository_and_ready_that_verify_plans_accepts(job_env):
    tmp_path, env = job_env
    proc = _entrypoint(env)
    assert proc.returncode == 0, proc.stderr
    plan_dir = Path(env["VTFUSE_PLAN_DIR"])
    ready = json.loads((plan_dir / "READY").read_text())
    assert ready["gpu"] == "NVIDIA A100-SXM4-80GB" and ready["tensorrt"] == "10.5.0.18"
    assert set(ready["manifests"]) == {"image_encoder", "vqa"}
    assert not list(plan_dir.glob(".repository.*")), "the scratch repository is moved into place"
    calls = (tmp_path / "calls.log").read_text()
    assert f"export engine --checkpoint tiny --onnx-dir {tmp_path}/onnx/tiny --cache-dir {env['VTFUSE_PLAN_CACHE']}" \
        in calls
    assert _run(_verify_module(), plan_dir) == 0
    (tmp_path / "calls.log").unlink()
    again = _entrypoint(env)
    assert again.returncode == 0 and "READY exists" in again.stdout
    assert not (tmp_path / "calls.log").exists(), "a plan dir with READY is kept: nothing rebuilt"


def test_job_mode_refuses_a_node_of_another_gpu_type(job_env):
    tmp_path, env = job_env
    proc = _entrypoint({**env, "FAKE_GPU": "Tesla T4"})
    assert proc.returncode != 0
    assert "this node's GPU is 'Tesla T4', the overlay's gpu-product is 'NVIDIA-A100-SXM4-80GB'" in proc.stderr
    assert not (tmp_path / "calls.log").read_text().count("export engine"), "nothing built"


def test_torch_target_renders_the_whole_pipeline_into_the_pod(job_env):
    tmp_path, env = job_env
    env = {k: v for k, v in env.items() if not k.startswith(("VTFUSE_PLAN", "VTFUSE_GPU"))}
    proc = _entrypoint({**env, "VTFUSE_EXPORT_TARGET": "torch", "VTFUSE_REPO": str(tmp_path / "models")})
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "calls.log").read_text()
    assert "export engine" not in calls
    assert f"export all --checkpoint tiny --onnx-dir {tmp_path}/onnx/tiny --target torch --repo {tmp_path}/models" \
        in calls
