"""Served models at run time: each name's Triton engines, architecture config, tokenizer and answer list."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from serving.app.settings import AppArgs, ModelSpec
from serving.model.config import FusionConfig
from serving.model.preprocess import load_tokenizer

log = logging.getLogger(__name__)


class ModelFilesMissing(RuntimeError):
    """A served model's checkpoint folder lacks config.json, tokenizer.json or answers.json."""


@dataclass(frozen=True)
class ModelRuntime:
    """What the API needs to route to one served model."""

    name: str
    spec: ModelSpec
    config: FusionConfig
    tokenizer: Tokenizer
    answers: tuple[str, ...]

    @property
    def image_size(self) -> int:
        """Side of the square uint8 image the image encoder takes."""
        return self.config.image_size

    @property
    def max_tokens(self) -> int:
        """Tokens per text, [CLS] and [SEP] included."""
        return self.config.max_text_len

    @property
    def grid(self) -> int:
        """Patches per image side (the attention grid)."""
        return self.config.grid

    def engine(self, role: str) -> str:
        """Triton model name for a role: image_encoder, text_encoder or fusion."""
        return {
            "image_encoder": self.spec.image_encoder,
            "text_encoder": self.spec.text_encoder,
            "fusion": self.spec.fusion,
        }[role]


def load_runtime(name: str, spec: ModelSpec, folder: Path) -> ModelRuntime:
    """Read a model's config.json, tokenizer.json and answers.json.

    Raises:
        ModelFilesMissing: a file is missing (the message says how to build it).
    """
    missing = [f for f in ("config.json", "tokenizer.json", "answers.json") if not (folder / f).exists()]
    if missing:
        raise ModelFilesMissing(
            f"model {name!r}: {', '.join(missing)} missing in {folder}: build the model repository "
            "(`vtfuse export all --target embedded`) or set models.{name}.checkpoint"
        )
    answers = tuple(json.loads((folder / "answers.json").read_text()))
    return ModelRuntime(
        name, spec, FusionConfig.from_json(folder / "config.json"), load_tokenizer(folder / "tokenizer.json"), answers
    )


def load_runtimes(args: AppArgs) -> dict[str, ModelRuntime]:
    """Every served model of the app's settings."""
    out = {}
    for name, spec in args.models.items():
        folder = args.checkpoint_dir(name)
        out[name] = load_runtime(name, spec, folder)
        log.info(
            "model %s: engines %s version %r, checkpoint %s", name, spec.engines(), spec.version or "latest", folder
        )
    return out
