"""Imported checkpoints at run time: their record, faithful image resizing and tokenizing, the repository list.

`vtfuse import-hf` writes, for each imported model NAME:

- `<repo>/NAME_<role>/` Triton models (one per engine role of the family), each with
  `1/checkpoint/` holding `import.json` (the `ImportRecord`) and the checkpoint's `tokenizer.json`;
- `<repo>/vtfuse_models.json`: every imported model's record, so `vtfuse serve` serves them all.

Preprocessing here reproduces the checkpoint's own `transformers` image processor (PIL backend)
up to the uint8 resized image: RGB conversion (transparency composited on white), the resize
(fixed size, shortest edge, or ViLT's shortest edge with size divisor) with the processor's
resampling filter. Rescaling and mean/std normalisation run inside the engine graph, so only
uint8 pixels cross the wire. Texts go through the checkpoint's own `tokenizer.json`.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

from serving.errors import SchemaViolation
from serving.families import FAMILIES, Family
from serving.generation.spec import GenerationSpec
from serving.model.preprocess import checked_image_op, open_image

REPOSITORY_MODELS = "vtfuse_models.json"
IMPORT_RECORD = "import.json"
TOKENIZER_FILE = "tokenizer.json"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
RESERVED_NAMES = ("tiny", "small", "base", "vqa", "preprocess", "image_encoder", "text_encoder", "fusion")
# ViLT's processor caps the longer edge at shortest_edge × 1333 / 800 (its MAX_LONGER_EDGE / MAX_SHORTER_EDGE).
VILT_LONGER_OVER_SHORTER = 1333 / 800
# Token rows are padded to a multiple of this (not to the model's maximum): fewer padded tokens
# per row, and requests of similar length still share a Triton batch (same shape).
PAD_MULTIPLE = 16


def check_model_name(name: str) -> str:
    """A served model name usable in Triton model names and URLs.

    Raises:
        ValueError: not lower-case letters, digits, `_` or `-` (≤ 40), or a reserved name.
    """
    if not NAME_PATTERN.match(name):
        raise ValueError(
            f"model name {name!r}: use 1-40 lower-case letters, digits, '_' or '-', starting with a letter or digit"
        )
    if name in RESERVED_NAMES:
        raise ValueError(f"model name {name!r} is reserved ({', '.join(RESERVED_NAMES)}): pick another --name")
    return name


@dataclass(frozen=True)
class ImageProcessing:
    """The checkpoint's image processor, as far as it happens before the engine (which rescales and normalises).

    Attributes:
        mode: `fixed` (resize to height × width), `shortest_edge` (keep the aspect ratio), or
            `vilt` (shortest edge, longer edge capped, both rounded down to size_divisor).
        resample: PIL resampling filter number (3 = bicubic).
    """

    mode: str
    height: int = 0
    width: int = 0
    shortest_edge: int = 0
    size_divisor: int = 0
    resample: int = 3
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageProcessing:
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the processor resizes an image of this size to."""
        if not self.do_resize:
            return height, width
        if self.mode == "fixed":
            return self.height, self.width
        if self.mode == "vilt":
            shorter = self.shortest_edge
            longer = int(VILT_LONGER_OVER_SHORTER * shorter)
            scale = shorter / min(height, width)
            if height < width:
                nh, nw = float(shorter), scale * width
            else:
                nh, nw = scale * height, float(shorter)
            if max(nh, nw) > longer:
                s = longer / max(nh, nw)
                nh, nw = s * nh, s * nw
            h, w = int(nh + 0.5), int(nw + 0.5)
            div = max(1, self.size_divisor)
            return h // div * div, w // div * div
        # shortest_edge (transformers' get_resize_output_image_size, default_to_square=False)
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def resize(self, img: Image.Image) -> np.ndarray:
        """An RGB PIL image → (H, W, 3) uint8 as the processor resizes it.

        Raises:
            SchemaViolation: the image is so elongated that a side resizes to 0 pixels (422;
                transformers' processor fails on it too).
        """
        h, w = self.output_size(img.height, img.width)
        if h < 1 or w < 1:
            raise SchemaViolation(
                f"image is {img.width}x{img.height}: too elongated for this model (it would be resized to {w}x{h} "
                "pixels): crop it closer to square"
            )
        if (h, w) != (img.height, img.width):
            img = img.resize((w, h), resample=Image.Resampling(self.resample), reducing_gap=None)
        return np.asarray(img, dtype=np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB as transformers converts it: transparency composited onto a white background."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_for(processing: ImageProcessing, data: bytes, max_pixels: int) -> np.ndarray:
    """Encoded image bytes → the processor's resized (H, W, 3) uint8 pixels (no reduced-scale JPEG decoding).

    Raises:
        UnsupportedMediaType: not a readable PNG, JPEG or WebP image (415).
        PayloadTooLarge: over `max_pixels`, or a decompression bomb (413).
    """

    def decode() -> np.ndarray:
        img = open_image(data, max_pixels)
        img.load()
        return processing.resize(to_rgb(img))

    return checked_image_op(decode)


def tokenize_padded(
    tokenizer: Tokenizer, texts: Sequence[str], max_tokens: int, multiple: int = PAD_MULTIPLE
) -> tuple[np.ndarray, np.ndarray]:
    """Texts → (ids, mask) int64 (N, L), L the longest text rounded up to `multiple` (at most `max_tokens`).

    Padding is masked out, so the engines' outputs equal the unpadded ones (to float rounding).

    Raises:
        SchemaViolation: a text is empty or has more than `max_tokens` tokens (422).
    """
    encs = tokenizer.encode_batch(list(texts))
    lengths = [len(e.ids) for e in encs]
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise SchemaViolation(
                f"text {i} has {n} tokens with the special tokens, over this model's limit of {max_tokens}: shorten it"
            )
        if not texts[i].strip():
            raise SchemaViolation(f"text {i} is empty: send at least one word")
    longest = max(lengths, default=1)
    width = min(max_tokens, int(math.ceil(longest / multiple) * multiple))
    ids = np.zeros((len(encs), width), dtype=np.int64)
    mask = np.zeros((len(encs), width), dtype=np.int64)
    for i, e in enumerate(encs):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = e.attention_mask
    return ids, mask


def load_plain_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.json with any padding or truncation it was saved with turned off (we pad; over-long is a 422)."""
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    return tok


@dataclass(frozen=True)
class ImportRecord:
    """What `vtfuse import-hf` recorded about one imported model (its `import.json`)."""

    name: str
    family: str
    architecture: str
    tasks: tuple[str, ...]
    engines: dict[str, str]  # role → Triton model name
    precision: str
    source: str
    image: ImageProcessing
    max_tokens: int
    embed_dim: int = 0
    labels: tuple[str, ...] = ()
    parity: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    max_batch: dict[str, int] = field(default_factory=dict)  # role → its config.pbtxt max_batch_size
    generation: dict[str, Any] = field(default_factory=dict)  # generative families: GenerationSpec.to_json()

    @property
    def family_spec(self) -> Family:
        return FAMILIES[self.family]

    @property
    def generation_spec(self) -> GenerationSpec | None:
        """A generative model's decoding settings and limits (None for the others)."""
        return GenerationSpec.from_json(self.generation) if self.generation else None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tasks"], d["labels"] = list(self.tasks), list(self.labels)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ImportRecord:
        d = dict(d)
        d["image"] = ImageProcessing.from_dict(d["image"])
        d["tasks"], d["labels"] = tuple(d["tasks"]), tuple(d.get("labels", ()))
        return cls(**d)

    def checkpoint_dir(self, repository: str | Path) -> Path:
        """Folder with this model's import.json and tokenizer.json inside the repository."""
        first = self.engines[self.family_spec.roles[0]]
        return Path(repository) / first / "1" / "checkpoint"


def read_repository_models(repository: str | Path) -> dict[str, ImportRecord]:
    """Every imported model of a repository (empty when none was imported)."""
    path = Path(repository) / REPOSITORY_MODELS
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {name: ImportRecord.from_json(rec) for name, rec in sorted(data.get("models", {}).items())}


def write_repository_models(repository: str | Path, records: dict[str, ImportRecord]) -> Path:
    """Rewrite the repository's list of imported models."""
    path = Path(repository) / REPOSITORY_MODELS
    body = {
        "about": "Models installed by `vtfuse import-hf`; `vtfuse serve` serves each under its name.",
        "models": {n: r.to_json() for n, r in sorted(records.items())},
    }
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path


def catalog(repository: str | Path) -> dict[str, Any]:
    """Every imported model's record and tokenizer.json text: what Triton's `vtfuse_catalog` model returns."""
    models = {}
    for name, record in read_repository_models(repository).items():
        tok = record.checkpoint_dir(repository) / TOKENIZER_FILE
        if tok.exists():
            models[name] = {"record": record.to_json(), "tokenizer": tok.read_text()}
    return {"models": models}


def from_catalog(entry: dict[str, Any]) -> tuple[ImportRecord, Tokenizer]:
    """One `catalog()` entry → its record and tokenizer (padding and truncation off, as load_plain_tokenizer)."""
    tok = Tokenizer.from_str(entry["tokenizer"])
    tok.no_padding()
    tok.no_truncation()
    return ImportRecord.from_json(entry["record"]), tok


def image_from_bytes(data: bytes) -> Image.Image:
    """A PIL image of encoded bytes (tests and parity checks: the same decoding a client's PIL does)."""
    return Image.open(io.BytesIO(data))
