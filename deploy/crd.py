"""Validate custom resources (RayService, ServiceMonitor, PodMonitor) against their CRDs' OpenAPI schemas.

`kubernetes-validate` knows only the built-in kinds. A CustomResourceDefinition carries a
structural OpenAPI v3 schema per served version; this module turns it into a JSON Schema
(Draft 4, the dialect OpenAPI 3.0 extends) and makes it strict the way the API server's
field validation is (`kubectl apply --validate=strict`): a field the schema does not name is
an error unless the schema preserves unknown fields. `x-kubernetes-int-or-string` and
`nullable` are translated; CEL rules (`x-kubernetes-validations`) are not evaluated.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRD_DIR = Path(__file__).resolve().parent / "schemas" / "crds"


class CrdSchemaError(ValueError):
    """A custom resource has no CRD schema here, or a CRD file cannot be read."""


@dataclass(frozen=True)
class CrdSchema:
    """One served version of one CRD, ready to validate objects."""

    api_version: str
    kind: str
    source: Path
    validator: jsonschema.Draft4Validator


def strict_schema(node: Any) -> Any:
    """A copy of an OpenAPI v3 (structural) schema as strict JSON Schema Draft 4."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in node and "additionalProperties" not in node and not preserve:
        out["additionalProperties"] = False
    return out


def load_crd(path: Path) -> list[CrdSchema]:
    """Every served version of the CRD(s) in one file."""
    schemas = []
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for crd in docs:
        if crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served", True):
                continue
            raw = version.get("schema", {}).get("openAPIV3Schema")
            if raw is None:
                raise CrdSchemaError(f"{path.name}: {kind} {version['name']} has no openAPIV3Schema")
            schema = strict_schema(copy.deepcopy(raw))
            jsonschema.Draft4Validator.check_schema(schema)
            schemas.append(
                CrdSchema(f"{group}/{version['name']}", kind, path, jsonschema.Draft4Validator(schema))
            )
    return schemas


class CrdRegistry:
    """The CRD schemas of a folder, by (apiVersion, kind)."""

    def __init__(self, paths: Iterable[Path] | None = None) -> None:
        self.schemas: dict[tuple[str, str], CrdSchema] = {}
        for path in sorted(paths if paths is not None else CRD_DIR.glob("*.yaml")):
            for s in load_crd(path):
                self.schemas[(s.api_version, s.kind)] = s

    def knows(self, obj: dict[str, Any]) -> bool:
        """True when a schema for this object's apiVersion and kind is here."""
        return (obj.get("apiVersion"), obj.get("kind")) in self.schemas

    def validate(self, obj: dict[str, Any]) -> list[str]:
        """Every schema violation of `obj`, as `path: message` lines (empty: valid).

        Raises:
            CrdSchemaError: no CRD schema for this apiVersion and kind.
        """
        key = (obj.get("apiVersion"), obj.get("kind"))
        if key not in self.schemas:
            known = ", ".join(f"{k} {v}" for v, k in sorted(self.schemas))
            raise CrdSchemaError(
                f"no CRD schema for {key[1]} {key[0]} in {CRD_DIR}: copy its CRD there (known: {known})"
            )
        errors = sorted(self.schemas[key].validator.iter_errors(obj), key=lambda e: list(map(str, e.path)))
        return [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors]
