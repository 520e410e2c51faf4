"""The tools behind `make deploy-check`: serveConfigV2 rendering, strict schema validation, the Dockerfile lint."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from deploy import check, dockerlint, serve_render
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


def test_committed_dockerfiles_lint_clean():
    results = dockerlint.lint_all()
    assert set(results) == {"triton.Dockerfile", "serve.Dockerfile", "export.Dockerfile"}
    assert results == {name: [] for name in results}


BAD = """\
FROM python:latest AS build
RUN pip install numpy
FROM ubuntu
ENV API_KEY=abc123
ADD https://example.com/x.tgz /x
COPY no/such/file /app/
COPY tests/ /app/tests/
RUN apt-get install -y curl
USER root
"""


def test_dockerlint_reports_each_problem(tmp_path):
    f = tmp_path / "bad.Dockerfile"
    f.write_text(BAD)
    (tmp_path / "bad.Dockerfile.dockerignore").write_text("*\n!serving/\n")
    problems = "\n".join(dockerlint.lint(f))
    for expected in ("FROM python:latest: pin a version tag", "FROM ubuntu: pin a version tag",
                     "pip install without --no-cache-dir", "ENV API_KEY: no secrets", "ADD: use COPY",
                     "no/such/file, which is not in the repository",
                     "tests/, which bad.Dockerfile.dockerignore excludes",
                     "apt-get install without --no-install-recommends", "USER root: use a non-root numeric uid",
                     "no HEALTHCHECK"):
        assert expected in problems, expected


@pytest.mark.parametrize(
    ("path", "excluded"),
    [("serving/cli.py", False), ("serving/__pycache__/cli.cpython-311.pyc", True), ("tests/unit/x.py", True),
     ("model_repository/fusion/config.pbtxt", False), ("model_repository/fusion/1/model.onnx", True),
     ("model_repository/vqa/1/model.py", False), ("model_repository/vqa/1/checkpoint/config.json", True),
     ("checkpoints/tiny/model.safetensors", False), ("checkpoints/small/model.safetensors", True),
     ("deploy/serve_config.yaml", False), ("deploy/k8s/base/kustomization.yaml", True)],
)
def test_dockerignore_sends_only_what_the_images_copy(path, excluded):
    patterns = dockerlint.read_ignore(DOCKER / "triton.Dockerfile")
    assert dockerlint.ignored(path, patterns) is excluded


def test_images_pin_matching_releases():
    bases = {f.name: [s.base for s in dockerlint.stages(dockerlint.parse(f.read_text()))]
             for f in DOCKER.glob("*.Dockerfile")}
    triton_tag = bases["triton.Dockerfile"][0].split(":")[1]
    assert bases["triton.Dockerfile"][0] == "nvcr.io/nvidia/tritonserver:24.10-py3", "Triton 2.51, the embedded one"
    assert bases["export.Dockerfile"][0] == f"nvcr.io/nvidia/tensorrt:{triton_tag}", (
        "plans must be built by the TensorRT version the Triton image loads them with"
    )
    ray_pin = re.search(r"^ray==([\w.]+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert bases["serve.Dockerfile"][0] == f"rayproject/ray:{ray_pin}-py311-cpu"


def test_image_requirements_are_project_dependencies():
    pyproject = (ROOT / "pyproject.toml").read_text()
    declared = {re.split(r"[<>=\[]", d)[0].lower() for d in re.findall(r'"([A-Za-z][\w.\-\[\],<>=]*)"', pyproject)}
    for req in DOCKER.glob("requirements-*.txt"):
        for line in req.read_text().splitlines():
            if line and not line.startswith("#"):
                assert re.split(r"[<>=\[]", line)[0].lower() in declared, f"{req.name}: {line}"


def test_export_entrypoint_builds_plans_only_for_tensorrt():
    script = (DOCKER / "export-entrypoint.sh").read_text()
    assert script.startswith("#!/bin/sh") and "set -eu" in script
    assert 'if [ "$target" = "tensorrt" ]; then' in script
    assert "export engine" in script and 'exec python -m serving.cli export install' in script
    assert (DOCKER / "export-entrypoint.sh").stat().st_mode & 0o111, "the entrypoint must be executable"
