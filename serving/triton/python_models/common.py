"""Shared pieces of the Python-backend models: paths, parameters, the installed checkpoint files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from serving.model.config import FusionConfig


def version_dir(args: dict[str, Any]) -> Path:
    """The model's version folder (<repository>/<model>/<version>)."""
    return Path(args["model_repository"]) / str(args["model_version"])


def parameters(model_config: dict[str, Any]) -> dict[str, str]:
    """config.pbtxt `parameters` as a flat str → str dict."""
    return {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}


def installed_config(args: dict[str, Any]) -> FusionConfig:
    """The FusionConfig that `vtfuse export install` copied into the version folder."""
    path = version_dir(args) / "checkpoint" / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `vtfuse export all --target embedded` first")
    return FusionConfig.from_json(path)


def installed_answers(args: dict[str, Any]) -> list[str]:
    """The answer vocabulary installed with the checkpoint."""
    return list(json.loads((version_dir(args) / "checkpoint" / "answers.json").read_text()))
