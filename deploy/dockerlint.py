"""Structural lint of the Dockerfiles in deploy/docker/ (no Docker engine or hadolint here).

Checks what hadolint and a reviewer would: base images pinned to a tag that is not
`latest`; a non-root, numeric USER and a HEALTHCHECK in the final stage; no ADD; pip with
`--no-cache-dir`, apt-get with `--no-install-recommends`; no secret-looking ENV/ARG; and
every file the build copies from the context exists in the repository and is not excluded
by the Dockerfile's own `<name>.Dockerfile.dockerignore`.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = ROOT / "deploy" / "docker"
SECRET_NAME = re.compile(r"(?i)(password|passwd|secret|token|api_?key|access_?key|private_?key)")


@dataclass
class Instruction:
    """One Dockerfile instruction with its continuation lines joined."""

    line: int
    keyword: str
    args: str


@dataclass
class Stage:
    """A FROM and the instructions up to the next FROM."""

    base: str
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)


def parse(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile: comments dropped, backslash continuations joined."""
    out: list[Instruction] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
        buf = ""
    return out


def stages(instructions: list[Instruction]) -> list[Stage]:
    """Split instructions into build stages."""
    result: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            result.append(Stage(words[0], name, ins.line))
        elif result:
            result[-1].instructions.append(ins)
    return result


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    p = pattern.strip().lstrip("/").rstrip("/")
    out, i = "", 0
    while i < len(p):
        if p.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif p.startswith("**", i):
            out += ".*"
            i += 2
        elif p[i] == "*":
            out += "[^/]*"
            i += 1
        elif p[i] == "?":
            out += "[^/]"
            i += 1
        elif p[i] == "[" and "]" in p[i + 1 :]:
            end = p.index("]", i + 1)
            body = p[i + 1 : end]
            out += "[" + ("^" + body[1:] if body.startswith("!") else body) + "]"
            i = end + 1
        else:
            out += re.escape(p[i])
            i += 1
    return re.compile(out + r"\Z")


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or a parent of it wins."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for raw in patterns:
        negate = raw.startswith("!")
        rx = _pattern_regex(raw[1:] if negate else raw)
        if any(rx.match(c) for c in candidates):
            result = not negate
    return result


def read_ignore(dockerfile: Path) -> list[str]:
    """Patterns of `<dockerfile>.dockerignore`, else of the context's .dockerignore."""
    for p in (dockerfile.with_name(dockerfile.name + ".dockerignore"), ROOT / ".dockerignore"):
        if p.exists():
            return [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return []


def _context_sources(ins: Instruction) -> list[str]:
    """Build-context paths an instruction reads: COPY sources (not --from) and RUN bind mounts."""
    words = shlex.split(ins.args)
    if ins.keyword == "COPY":
        if any(w.startswith("--from=") for w in words):
            return []
        return [w for w in words if not w.startswith("--")][:-1]
    if ins.keyword == "RUN":
        found = []
        for w in words:
            if w.startswith("--mount=") and "type=bind" in w:
                opts = dict(kv.split("=", 1) for kv in w[len("--mount=") :].split(",") if "=" in kv)
                if "from" not in opts:
                    found.append(opts.get("source", "."))
        return found
    return []


def lint(dockerfile: Path) -> list[str]:
    """Problems in one Dockerfile, as `name:line: message` (empty: clean)."""
    name = dockerfile.name
    instructions = parse(dockerfile.read_text())
    all_stages = stages(instructions)
    problems: list[str] = []
    if not all_stages:
        return [f"{name}: no FROM"]
    names = {s.name for s in all_stages if s.name}
    for s in all_stages:
        if s.base in names:
            continue
        image = s.base.rsplit("/", 1)[-1]
        if "$" in s.base:
            problems.append(
                f"{name}:{s.line}: FROM {s.base}: write the pinned image, not an ARG (policy scans resolve no ARGs)"
            )
        elif "@sha256:" not in image and (":" not in image or image.endswith(":latest")):
            problems.append(f"{name}:{s.line}: FROM {s.base}: pin a version tag (not latest)")
    final = all_stages[-1]
    users = [i for i in final.instructions if i.keyword == "USER"]
    if not users:
        problems.append(f"{name}: the final stage sets no USER: add a non-root numeric USER uid:gid")
    else:
        user = users[-1].args.split(":")[0]
        if not user.isdigit() or user == "0":
            problems.append(
                f"{name}:{users[-1].line}: USER {users[-1].args}: use a non-root numeric uid (runAsNonRoot verifies it)"
            )
    if not any(i.keyword == "HEALTHCHECK" for i in final.instructions):
        problems.append(f"{name}: the final stage has no HEALTHCHECK (HEALTHCHECK NONE for a run-to-completion image)")
    patterns = read_ignore(dockerfile)
    for ins in instructions:
        where = f"{name}:{ins.line}"
        if ins.keyword == "ADD":
            problems.append(f"{where}: ADD: use COPY (or RUN curl with a checksum for URLs)")
        if ins.keyword in ("ENV", "ARG"):
            for key in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*=", ins.args) or ins.args.split()[:1]:
                if SECRET_NAME.search(key):
                    problems.append(f"{where}: {ins.keyword} {key}: no secrets in images; pass them at run time")
        if ins.keyword == "RUN":
            for cmd in re.split(r"&&|;|\|\|", ins.args):
                if re.search(r"\bpip3? install\b", cmd) and "--no-cache-dir" not in cmd:
                    problems.append(f"{where}: pip install without --no-cache-dir")
                if re.search(r"\bapt-get install\b", cmd) and "--no-install-recommends" not in cmd:
                    problems.append(f"{where}: apt-get install without --no-install-recommends")
        for src in _context_sources(ins):
            if not (ROOT / src).exists():
                problems.append(f"{where}: {ins.keyword} reads {src}, which is not in the repository")
            elif ignored(src, patterns):
                problems.append(f"{where}: {ins.keyword} reads {src}, which {name}.dockerignore excludes")
    return problems


def lint_all(directory: Path = DOCKER_DIR) -> dict[str, list[str]]:
    """Problems of every *.Dockerfile in a folder, by file name."""
    return {p.name: lint(p) for p in sorted(directory.glob("*.Dockerfile"))}
