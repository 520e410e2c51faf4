"""Architecture configs: one frozen dataclass, one JSON file per preset (torch-free, for light importers)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
PRESETS = ("tiny", "small", "base")


@dataclass(frozen=True)
class FusionConfig:
    """Architecture of one preset; one JSON file per preset under configs/."""

    name: str
    image_size: int
    stem: str  # "conv": strided conv stem (tiny); "patch": ViT patch embedding
    patch_size: int
    dim: int
    heads: int
    mlp_ratio: int
    vision_layers: int
    text_layers: int
    fusion_layers: int
    embed_dim: int
    max_text_len: int
    vocab_size: int
    num_answers: int
    seed: int = 0
    # The caption decoder (tiny only): 0 layers = none, as for `small` and `base`.
    decoder_layers: int = 0
    decoder_dim: int = 0
    decoder_heads: int = 0

    @property
    def grid(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Image tokens the fusion stack attends to."""
        return self.grid * self.grid

    @property
    def has_decoder(self) -> bool:
        """Whether the preset has a caption decoder."""
        return self.decoder_layers > 0

    @classmethod
    def from_json(cls, path: str | Path) -> FusionConfig:
        """Load a config JSON file."""
        return cls(**json.loads(Path(path).read_text()))

    @classmethod
    def preset(cls, name: str) -> FusionConfig:
        """Load a named preset (`tiny`, `small`, `base`)."""
        path = CONFIG_DIR / f"{name}.json"
        if not path.exists():
            raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
        return cls.from_json(path)

    def to_json(self) -> str:
        """Serialise to JSON."""
        return json.dumps(asdict(self), indent=2)
