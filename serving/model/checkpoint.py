"""Checkpoints on disk: model.safetensors + config.json + tokenizer.json + answers.json in one folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from serving.model.config import FusionConfig
from serving.model.model import FusionModel, build_model
from serving.model.tokenizer import build_tokenizer
from serving.paths import DEFAULT_CHECKPOINT, REPO_ROOT
from serving.shapes.world import ANSWERS

__all__ = [
    "DEFAULT_CHECKPOINT",
    "REPO_ROOT",
    "Checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "random_checkpoint",
    "resolve_checkpoint",
]


@dataclass
class Checkpoint:
    """A model with everything needed to serve it."""

    model: FusionModel
    tokenizer: Tokenizer
    answers: list[str]
    path: Path | None = None

    @property
    def config(self) -> FusionConfig:
        """The model's architecture config."""
        return self.model.cfg


def save_checkpoint(ckpt: Checkpoint, out_dir: str | Path) -> Path:
    """Write the four files of a checkpoint folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in ckpt.model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(ckpt.config.to_json() + "\n")
    ckpt.tokenizer.save(str(out / "tokenizer.json"))
    (out / "answers.json").write_text(json.dumps(ckpt.answers) + "\n")
    return out


def load_checkpoint(path: str | Path = DEFAULT_CHECKPOINT) -> Checkpoint:
    """Load a checkpoint folder (the shipped `tiny` by default, or a user's own by path)."""
    p = Path(path)
    if not (p / "model.safetensors").exists():
        raise FileNotFoundError(
            f"no model.safetensors in {p}: pass a checkpoint folder, or train one with `vtfuse train`"
        )
    cfg = FusionConfig.from_json(p / "config.json")
    model = FusionModel(cfg)
    model.load_state_dict(load_file(str(p / "model.safetensors")), strict=True)
    return Checkpoint(
        model.eval(),
        Tokenizer.from_file(str(p / "tokenizer.json")),
        json.loads((p / "answers.json").read_text()),
        p,
    )


def random_checkpoint(preset: str) -> Checkpoint:
    """A preset with seeded random weights (the `small`/`base` benchmark models, or a chance baseline)."""
    model = build_model(FusionConfig.preset(preset))
    return Checkpoint(model, build_tokenizer(), list(ANSWERS))


def resolve_checkpoint(source: str | Path) -> Checkpoint:
    """A preset name (`tiny` = the shipped trained one) or a checkpoint folder path."""
    s = str(source)
    if s == "tiny":
        return load_checkpoint(DEFAULT_CHECKPOINT)
    if s in ("small", "base"):
        return random_checkpoint(s)
    return load_checkpoint(s)
