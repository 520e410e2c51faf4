"""The tools behind `make deploy-check`: serveConfigV2 rendering, strict schema validation, the Dockerfile checks."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from deploy import check, serve_render
from deploy.crd import CrdRegistry, CrdSchemaError, strict_schema

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"


# --- serveConfigV2 -------------------------------------------------------------------------


def test_committed_serveconfig_patch_is_in_sync():
    assert serve_render.main(["--check"]) == 0, "run `python -m deploy.serve_render`"


def test_merge_deletes_on_null_and_merges_named_lists():
    base = {"a": 1, "applications": [{"name": "x", "args": {"k": 1, "j": 2},
                                      "deployments": [{"name": "D", "num_replicas": 1}]}]}
    out = serve_render.merge(base, {"applications": {"x": {"args": {"k": 9},
                                                           "deployments": {"D": {"num_replicas": None, "auto": 1}}}}})
    assert out == {"a": 1, "applications": [{"name": "x", "args": {"k": 9, "j": 2},
                                             "deployments": [{"name": "D", "auto": 1}]}]}
    assert base["applications"][0]["args"]["k"] == 1, "the source is not modified"


def test_override_of_a_missing_deployment_names_the_fix():
    base = {"applications": [{"name": "x", "deployments": [{"name": "Ingress"}]}]}
    with pytest.raises(serve_render.OverrideError, match=r"\['Ingres'\].*rename the override"):
        serve_render.merge(base, {"applications": {"x": {"deployments": {"Ingres": {"num_replicas": 2}}}}})


def test_stale_patch_is_reported(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "patch.yaml"
    stale.write_text(serve_render.PATCH.read_text().replace("triton:8001", "elsewhere:8001"))
    monkeypatch.setattr(serve_render, "PATCH", stale)
    assert serve_render.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"^-\s+triton_url: elsewhere:8001$", err, re.M)
    assert re.search(r"^\+\s+triton_url: triton:8001$", err, re.M)
    assert "is stale: run `python -m deploy.serve_render`" in err


# --- strict schemas ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_objects():
    return check.render("gpu")


@pytest.fixture(scope="module")
def crds():
    return CrdRegistry()


def _find(objects, kind):
    return copy.deepcopy(next(o for o in objects if o["kind"] == kind))


def test_rendered_overlay_validates(gpu_objects, crds):
    seen, problems = check.validate_objects(gpu_objects, crds)
    assert problems == []
    assert any("RayService/vtfuse (CRD schema" in s for s in seen)
    assert any("Deployment/triton (Kubernetes 1.30.0 strict)" in s for s in seen)


def test_a_misspelt_field_fails_kubernetes_strict_validation(gpu_objects, crds):
    bad = _find(gpu_objects, "Deployment")
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    _, problems = check.validate_objects([bad], crds)
    assert len(problems) == 1 and "readinesProbe" in problems[0]


def test_a_misspelt_field_fails_crd_validation(gpu_objects, crds):
    bad = _find(gpu_objects, "RayService")
    bad["spec"]["serveConfigV3"] = "x"
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    _, problems = check.validate_objects([bad], crds)
    assert any("'serveConfigV3' was unexpected" in p for p in problems)
    assert any("workerGroupSpecs.0.maxReplicas: 'eight' is not of type 'integer'" in p for p in problems)


def test_ray_pod_templates_are_held_to_kubernetes_1_30(gpu_objects, crds):
    bad = _find(gpu_objects, "RayService")
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][0][
        "containerPort"] = "6379"
    _, problems = check.validate_objects([bad], crds)
    assert any("head pod template" in p for p in problems)


def test_unknown_custom_kind_is_an_error(crds):
    obj = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    _, problems = check.validate_objects([obj], crds)
    assert problems and "copy its CRD into deploy/schemas/crds/" in problems[0]
    with pytest.raises(CrdSchemaError, match="copy its CRD there"):
        crds.validate(obj)


def test_int_or_string_and_preserved_fields_translate():
    schema = strict_schema({"type": "object", "properties": {
        "port": {"x-kubernetes-int-or-string": True},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {}}},
        "maybe": {"type": "string", "nullable": True}}})
    assert schema["additionalProperties"] is False
    assert schema["properties"]["port"] == {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    assert "additionalProperties" not in schema["properties"]["free"]
    assert schema["properties"]["maybe"]["type"] == ["string", "null"]


def test_crd_copies_note_their_source():
    readme = (ROOT / "deploy" / "schemas" / "README.md").read_text()
    for crd in (ROOT / "deploy" / "schemas" / "crds").glob("*.yaml"):
        assert f"`crds/{crd.name}`" in readme
        assert yaml.safe_load(crd.read_text())["kind"] == "CustomResourceDefinition"


# --- Dockerfiles ---------------------------------------------------------------------------


def test_committed_dockerfiles_pass_the_project_checks():
    names = {f.name for f in DOCKER.glob("*.Dockerfile")}
    assert names == {"triton.Dockerfile", "triton-torch.Dockerfile", "serve.Dockerfile", "export.Dockerfile"}
    assert {n: check.dockerfile_problems(DOCKER / n) for n in names} == {n: [] for n in names}


HADOLINT = ROOT / "build" / "tools-venv" / "bin" / "hadolint"


@pytest.mark.skipif(not HADOLINT.exists(), reason="hadolint: `make deploy-check` installs it into build/tools-venv")
def test_hadolint_passes_the_dockerfiles_and_catches_what_the_old_lint_did(tmp_path, monkeypatch):
    assert check.step_hadolint(HADOLINT)[0].startswith("hadolint: ")
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest AS build\nRUN pip install numpy\nFROM quay.io/x/ubuntu:22.04\n"
                   "ENV API_KEY=abc123\nRUN apt-get install -y curl\nUSER root\n")
    monkeypatch.setattr(check, "DOCKER_DIR", tmp_path)
    (tmp_path / "hadolint.yaml").write_text((DOCKER / "hadolint.yaml").read_text())
    with pytest.raises(check.CheckFailed) as e:
        check.step_hadolint(HADOLINT)
    found = "\n".join(e.value.lines)
    for code in ("DL3007", "DL3042", "DL3026", "DL3064", "DL3015", "DL3002"):
        assert code in found, code


BAD = """\
FROM ${BASE} AS build
RUN pip wheel --no-cache-dir torch
FROM ubuntu:22.04
COPY no/such/file /app/
COPY tests/ /app/tests/
RUN --mount=type=bind,source=deploy/docker/requirements-triton-torch.txt,target=/r.txt pip install -r /r.txt
USER ray
"""


def test_project_dockerfile_checks_report_what_hadolint_does_not(tmp_path):
    f = tmp_path / "bad.Dockerfile"
    f.write_text(BAD)
    (tmp_path / "bad.Dockerfile.dockerignore").write_text("*\n!serving/\n!deploy/docker/\n")
    problems = "\n".join(check.dockerfile_problems(f))
    for expected in ("FROM ${BASE}: write the pinned image, not an ARG",
                     "no/such/file, which is not in the repository",
                     "tests/, which bad.Dockerfile.dockerignore excludes",
                     "USER ray: use a non-root numeric uid",
                     "bad.Dockerfile:2: installs torch",
                     "requirements-triton-torch.txt lists torch"):
        assert expected in problems, expected
    f.write_text("FROM ubuntu:22.04\n")
    assert "the final stage sets no USER" in "\n".join(check.dockerfile_problems(f))


def test_runtime_images_carry_no_torch_and_the_torch_ones_do():
    for name in ("serve", "triton"):
        reqs = check.requirements(DOCKER / f"requirements-{name}.txt")
        assert not [r for r in reqs if r.startswith("torch")], name
        runs = check.parse_dockerfile((DOCKER / f"{name}.Dockerfile").read_text())
        assert "torch" not in "".join(i.args for i in runs if i.keyword == "RUN"), name
    assert "torch" in check.requirements(DOCKER / "requirements-triton-torch.txt")
    assert "torch" in check.requirements(DOCKER / "requirements-export.txt")


BLOCKED_IMPORTS = """
import sys, types, importlib
blocked = set(sys.argv[1].split(","))
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError("no " + name + " in this image")
sys.meta_path.insert(0, Block())
sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
for m in sys.argv[2:]:
    importlib.import_module(m)
"""


def _imports_without(blocked, modules):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", BLOCKED_IMPORTS, ",".join(blocked), *modules], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_what_the_runtime_images_run_imports_without_torch():
    """The serve image's app (without the embedded Triton's packages either) and the Triton image's models."""
    _imports_without(["torch", "transformers", "onnxruntime", "pytriton", "onnx"],
                     ["serving.app.builder", "serving.app.proxy", "serving.proto.vtfuse_pb2_grpc"])
    models = sorted({line.split("import")[0].replace("from", "").strip()
                     for f in (ROOT / "model_repository").glob("*/1/model.py")
                     for line in f.read_text().splitlines() if line.startswith("from serving.")})
    _imports_without(["torch", "transformers"], models)


def test_the_triton_torch_images_models_import_without_onnx():
    """The triton-torch image has torch, transformers and the `serving` code (not export/), no ONNX stack."""
    _imports_without(["onnxruntime", "onnx", "ray", "pytriton", "tritonclient"],
                     ["serving.triton.python_models.torch_engine", "serving.triton.python_models.hf_torch_engine",
                      "serving.triton.python_models.generate", "serving.generation.torch_engine",
                      "serving.families.modules.blip_retrieval", "serving.families.modules.vilt_vqa",
                      "serving.families.modules.blip_caption", "serving.families.modules.blip_vqa"])
    requirements = check.requirements(DOCKER / "requirements-triton-torch.txt")
    assert {"torch", "transformers"} <= set(requirements)
    dockerfile = (DOCKER / "triton-torch.Dockerfile").read_text()
    assert "COPY --chown=root:root serving/ /opt/vtfuse/serving/" in dockerfile
    assert "export/" not in "".join(line for line in dockerfile.splitlines() if line.startswith("COPY"))


@pytest.mark.parametrize(
    ("path", "excluded"),
    [("serving/cli.py", False), ("serving/__pycache__/cli.cpython-311.pyc", True), ("tests/unit/x.py", True),
     ("model_repository/fusion/config.pbtxt", False), ("model_repository/fusion/1/model.onnx", True),
     ("model_repository/vqa/1/model.py", False), ("model_repository/vqa/1/checkpoint/config.json", True),
     ("checkpoints/tiny/model.safetensors", False), ("checkpoints/small/model.safetensors", True),
     ("deploy/serve_config.yaml", False), ("deploy/k8s/base/kustomization.yaml", True)],
)
def test_dockerignore_sends_only_what_the_images_copy(path, excluded):
    patterns = check.read_ignore(DOCKER / "triton.Dockerfile")
    assert check.ignored(path, patterns) is excluded


def test_images_pin_matching_releases():
    bases = {f.name: [b for b, _, _ in check.stages(check.parse_dockerfile(f.read_text()))]
             for f in DOCKER.glob("*.Dockerfile")}
    triton_tag = bases["triton.Dockerfile"][0].split(":")[1]
    assert bases["triton.Dockerfile"][0] == "nvcr.io/nvidia/tritonserver:24.10-py3", "Triton 2.51, the embedded one"
    assert bases["triton-torch.Dockerfile"][-1] == bases["triton.Dockerfile"][-1]
    assert bases["export.Dockerfile"][0] == f"nvcr.io/nvidia/tensorrt:{triton_tag}", (
        "plans must be built by the TensorRT version the Triton image loads them with"
    )
    assert check.ngc_release() == "24.10"
    ray_pin = re.search(r"^ray==([\w.]+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert bases["serve.Dockerfile"][0] == f"rayproject/ray:{ray_pin}-py311-cpu"


def test_image_requirements_are_project_dependencies():
    pyproject = (ROOT / "pyproject.toml").read_text()
    declared = {re.split(r"[<>=\[]", d)[0].lower() for d in re.findall(r'"([A-Za-z][\w.\-\[\],<>=]*)"', pyproject)}
    for req in DOCKER.glob("requirements-*.txt"):
        for line in req.read_text().splitlines():
            if line and not line.startswith(("#", "-r ")):
                assert re.split(r"[<>=\[]", line)[0].lower() in declared, f"{req.name}: {line}"


SERVE_IMAGE_LEAVES_OUT = {"ray", "nvidia-pytriton", "onnxruntime"}  # base image; the embedded one-machine Triton


def test_serve_image_installs_the_server_extra():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {re.split(r"[<>=\[; ]", r.strip())[0].lower() for r in reqs if r.strip()}

    want = names(project["dependencies"]) | names(project["optional-dependencies"]["server"])
    have = names(check.requirements(DOCKER / "requirements-serve.txt"))
    assert have == want - SERVE_IMAGE_LEAVES_OUT, "keep requirements-serve.txt in step with pyproject's server extra"


def test_export_entrypoint_builds_plans_only_for_tensorrt():
    script = (DOCKER / "export-entrypoint.sh").read_text()
    assert script.startswith("#!/bin/sh") and "set -eu" in script
    assert 'if [ "$target" = "tensorrt" ]; then' in script
    assert "export engine" in script and 'exec python -m serving.cli export "$stage"' in script
    assert 'if [ "$target" = "torch" ]; then stage=all; fi' in script
    assert (DOCKER / "export-entrypoint.sh").stat().st_mode & 0o111, "the entrypoint must be executable"
