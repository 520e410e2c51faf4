"""Checkpoints on disk: model.safetensors + config.json + tokenizer.json + answers.json in one folder.

A preset with a caption decoder (`tiny`) keeps its weights in `caption_decoder.safetensors`
beside the towers' `model.safetensors`, which stays exactly what the three engines were exported from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from serving.model.config import FusionConfig
from serving.model.model import CaptionDecoder, FusionModel, build_decoder, build_model
from serving.model.tokenizer import build_tokenizer
from serving.paths import DEFAULT_CHECKPOINT, REPO_ROOT
from serving.shapes.world import ANSWERS

__all__ = [
    "DECODER_WEIGHTS",
    "DEFAULT_CHECKPOINT",
    "REPO_ROOT",
    "Checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "save_decoder",
    "random_checkpoint",
    "resolve_checkpoint",
]

DECODER_WEIGHTS = "caption_decoder.safetensors"


@dataclass
class Checkpoint:
    """A model with everything needed to serve it."""

    model: FusionModel
    tokenizer: Tokenizer
    answers: list[str]
    path: Path | None = None
    decoder: CaptionDecoder | None = None  # the caption decoder, for a preset that has one

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
    if ckpt.decoder is not None:
        save_decoder(ckpt.decoder, out)
    (out / "config.json").write_text(ckpt.config.to_json() + "\n")
    ckpt.tokenizer.save(str(out / "tokenizer.json"))
    (out / "answers.json").write_text(json.dumps(ckpt.answers) + "\n")
    return out


def load_checkpoint(path: str | Path = DEFAULT_CHECKPOINT, with_decoder: bool = True) -> Checkpoint:
    """Load a checkpoint folder (the shipped `tiny` by default, or a user's own by path).

    `with_decoder=False` loads the towers alone (the torch target's engines copy only those weights).
    """
    p = Path(path)
    if not (p / "model.safetensors").exists():
        raise FileNotFoundError(
            f"no model.safetensors in {p}: pass a checkpoint folder, or train one with `vtfuse train`"
        )
    cfg = FusionConfig.from_json(p / "config.json")
    model = FusionModel(cfg)
    model.load_state_dict(load_file(str(p / "model.safetensors")), strict=True)
    decoder = None
    if cfg.has_decoder and with_decoder:
        if not (p / DECODER_WEIGHTS).exists():
            raise FileNotFoundError(
                f"{p}/config.json has a caption decoder but {DECODER_WEIGHTS} is missing: train it with `vtfuse train`"
            )
        decoder = CaptionDecoder(cfg)
        decoder.load_state_dict(load_file(str(p / DECODER_WEIGHTS)), strict=True)
        decoder.eval()
    return Checkpoint(
        model.eval(),
        Tokenizer.from_file(str(p / "tokenizer.json")),
        json.loads((p / "answers.json").read_text()),
        p,
        decoder,
    )


def save_decoder(decoder: CaptionDecoder, out_dir: str | Path) -> Path:
    """Write the caption decoder's weights beside a checkpoint's towers."""
    path = Path(out_dir) / DECODER_WEIGHTS
    save_file({k: v.detach().contiguous() for k, v in decoder.state_dict().items()}, str(path))
    return path


def random_checkpoint(preset: str) -> Checkpoint:
    """A preset with seeded random weights (the `small`/`base` benchmark models, or a chance baseline)."""
    cfg = FusionConfig.preset(preset)
    decoder = build_decoder(cfg) if cfg.has_decoder else None
    return Checkpoint(build_model(cfg), build_tokenizer(), list(ANSWERS), decoder=decoder)


def resolve_checkpoint(source: str | Path) -> Checkpoint:
    """A preset name (`tiny` = the shipped trained one) or a checkpoint folder path."""
    s = str(source)
    if s == "tiny":
        return load_checkpoint(DEFAULT_CHECKPOINT)
    if s in ("small", "base"):
        return random_checkpoint(s)
    return load_checkpoint(s)
