"""A Hugging Face checkpoint to import: its folder, family, image processor settings, tokenizer and token limit."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.errors import ExportError
from serving.families import Family, family_for_architectures
from serving.families.imported import ImageProcessing

log = logging.getLogger(__name__)

# vtfuse reproduces the processors' PIL path (serving/families/imported.py). transformers 5 picks its torchvision
# backend whenever torchvision is importable, whose resize differs slightly: the parity gate would then refuse
# good imports, blaming the engines. Every processor is loaded with this backend.
PROCESSOR_BACKEND = "pil"


class ImportSourceError(ExportError):
    """The source is not a usable checkpoint (missing files, an unsupported processor option)."""


@dataclass
class HfSource:
    """A resolved checkpoint: where it is, its family and what its processor does."""

    folder: Path
    source: str  # what the user passed (a folder or a hub id)
    config: dict[str, Any]
    family: Family


def resolve_source(source: str) -> HfSource:
    """A `save_pretrained` folder, or a hub id resolved through `huggingface_hub` (internet or its cache).

    Raises:
        ImportSourceError: no config.json there, or the hub cannot be reached and the id is not cached.
        UnsupportedArchitecture: config.json's `architectures` names no supported family.
    """
    folder = Path(source).expanduser()
    if not folder.is_dir():
        if folder.exists() or source.startswith((".", "/")) or source.count("/") != 1:
            raise ImportSourceError(
                f"{source} is not a folder: pass a `save_pretrained` folder or a hub id such as "
                "Salesforce/blip-itm-base-coco"
            )
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source))
        except Exception as e:  # no network and not cached, unknown repo, ...
            raise ImportSourceError(
                f"could not fetch {source} from the Hugging Face hub ({type(e).__name__}: {e}): on a machine "
                "without internet, download it elsewhere with `hf download` and pass the folder"
            ) from e
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ImportSourceError(f"{folder} has no config.json: pass a folder written by `save_pretrained`")
    config = json.loads(cfg_path.read_text())
    family = family_for_architectures(config.get("architectures"))
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ImportSourceError(f"{folder} has no model weights (*.safetensors): save the model with save_pretrained")
    return HfSource(folder, source, config, family)


def _resample(value: Any) -> int:
    if isinstance(value, int):
        return value
    return int(getattr(value, "value", value))


def image_processing(src: HfSource) -> ImageProcessing:
    """The checkpoint's image processor settings, read through `transformers` itself.

    Raises:
        ImportSourceError: an option vtfuse does not reproduce (center crop, padding to a fixed size, ...).
    """
    from transformers import AutoImageProcessor

    ip = AutoImageProcessor.from_pretrained(str(src.folder), backend=PROCESSOR_BACKEND)
    keys = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width")
    raw = ip.size if isinstance(ip.size, dict) else {k: getattr(ip.size, k, None) for k in keys}
    size = {k: v for k, v in raw.items() if v is not None}
    if getattr(ip, "do_center_crop", False):
        raise ImportSourceError(f"{type(ip).__name__} with do_center_crop is not supported yet")
    common: dict[str, Any] = {
        "resample": _resample(ip.resample),
        "do_resize": bool(ip.do_resize),
        "do_rescale": bool(ip.do_rescale),
        "rescale_factor": float(ip.rescale_factor),
        "do_normalize": bool(ip.do_normalize),
        "mean": tuple(float(x) for x in _three(ip.image_mean)),
        "std": tuple(float(x) for x in _three(ip.image_std)),
    }
    if src.family.single_stream:  # ViLT: shortest edge, capped longer edge, size divisor, pixel mask
        if "shortest_edge" not in size:
            raise ImportSourceError(f"ViLT image processor without size.shortest_edge ({size}) is not supported")
        return ImageProcessing(
            mode="vilt", shortest_edge=int(size["shortest_edge"]), size_divisor=int(ip.size_divisor or 1), **common
        )
    if "height" in size and "width" in size:
        return ImageProcessing(mode="fixed", height=int(size["height"]), width=int(size["width"]), **common)
    if set(size) == {"shortest_edge"}:
        return ImageProcessing(mode="shortest_edge", shortest_edge=int(size["shortest_edge"]), **common)
    raise ImportSourceError(f"image processor size {size} is not supported: height/width or shortest_edge")


def _three(v: Any) -> tuple[float, float, float]:
    if isinstance(v, (int, float)):
        return (float(v),) * 3  # type: ignore[return-value]
    t = tuple(float(x) for x in v)
    if len(t) != 3:
        raise ImportSourceError(f"image mean/std {v} does not have 3 channels")
    return t  # type: ignore[return-value]


def tokenizer_json(src: HfSource) -> tuple[str, int]:
    """The checkpoint's tokenizer as tokenizer.json text, and the longest text (in tokens) its model takes.

    The limit is the smaller of the tokenizer's `model_max_length` and the text position table.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src.folder))
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ImportSourceError(f"{type(tok).__name__} has no `tokenizers` backend: save a fast tokenizer")
    text_cfg = src.config.get("text_config") or src.config
    positions = int(text_cfg.get("max_position_embeddings") or 512)
    limit = int(getattr(tok, "model_max_length", positions) or positions)
    return backend.to_str(), min(positions, limit if limit < 1_000_000 else positions)


def decode_clean_up(src: HfSource) -> bool:
    """Whether `processor.decode` cleans up tokenization spaces for this tokenizer (transformers 5's rule).

    transformers applies `clean_up_tokenization` when the tokenizer says so, except for BPE models.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src.folder))
    backend = getattr(tok, "backend_tokenizer", None)
    bpe = backend is not None and type(backend.model).__name__ == "BPE"
    return bool(getattr(tok, "clean_up_tokenization_spaces", False)) and not bpe
