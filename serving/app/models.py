"""Served models at run time: each name's family, Triton engines, config, tokenizer, answers and preprocessing.

Models come from two places: the app's settings (`models:`, the native `tiny` by default) and
every model `vtfuse import-hf` installed into the repository (its `vtfuse_models.json`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from serving.app.settings import AppArgs, ModelSpec
from serving.families import NATIVE, Family
from serving.families.imported import (
    IMPORT_RECORD,
    TOKENIZER_FILE,
    ImportRecord,
    decode_for,
    load_plain_tokenizer,
    read_repository_models,
    tokenize_padded,
)
from serving.generation.spec import SPEC_FILE, GenerationSpec, read_spec
from serving.model.config import FusionConfig
from serving.model.preprocess import decode_image, load_tokenizer, tokenize

log = logging.getLogger(__name__)


class ModelFilesMissing(RuntimeError):
    """A served model's checkpoint folder lacks config.json, tokenizer.json or answers.json."""


@dataclass(frozen=True)
class ModelRuntime:
    """What the API needs to route to one served model."""

    name: str
    spec: ModelSpec
    config: FusionConfig | None  # the native model's architecture (None for an imported one)
    tokenizer: Tokenizer
    answers: tuple[str, ...]
    family: Family = NATIVE
    record: ImportRecord | None = None  # what import-hf recorded (imported models only)
    manifest: dict | None = None  # the native fusion engine's install manifest (precision, parity), if any
    native_generation: GenerationSpec | None = None  # the native model's caption decoder, when installed

    @property
    def image_size(self) -> int:
        """Side of the square uint8 image the native image encoder takes."""
        return self.config.image_size if self.config is not None else 0

    @property
    def max_tokens(self) -> int:
        """Tokens per text, special tokens included."""
        if self.record is not None:
            return self.record.max_tokens
        assert self.config is not None
        return self.config.max_text_len

    @property
    def grid(self) -> int:
        """Patches per image side (the attention grid)."""
        return self.config.grid if self.config is not None else 0

    @property
    def tasks(self) -> tuple[str, ...]:
        """API tasks this model answers (the native model captions only with its caption decoder installed)."""
        if self.record is not None:
            return self.record.tasks
        return tuple(t for t in self.family.tasks if t != "caption" or self.native_generation is not None)

    @property
    def generation(self) -> GenerationSpec | None:
        """How this model generates (decoder defaults, limits, Triton models), when it does."""
        return self.record.generation_spec if self.record is not None else self.native_generation

    @property
    def version(self) -> str:
        """Triton version of the engines ('' = latest)."""
        return self.spec.version if self.record is None else ""

    def engine(self, role: str) -> str:
        """Triton model name for a role: image_encoder, text_encoder, fusion (or single_stream)."""
        if self.record is not None:
            return self.record.engines[role]
        return {
            "image_encoder": self.spec.image_encoder,
            "text_encoder": self.spec.text_encoder,
            "fusion": self.spec.fusion,
            "generate": self.spec.generate or "",
        }[role]

    def max_batch(self, role: str) -> int | None:
        """Rows one request to a role's engine may carry (its max_batch_size), where the model says."""
        if self.record is not None:
            return self.record.max_batch.get(role)
        return None

    def engines(self) -> tuple[str, ...]:
        """Triton model names of every model it routes to (the native caption decoder's too, when installed)."""
        if self.record is not None:
            return tuple(self.record.engines.values())  # its engines and any model its family brings (`itm`)
        extra = ("generate",) if self.native_generation is not None else ()
        return tuple(self.engine(r) for r in (*self.family.roles, *extra))

    def has(self, role: str) -> bool:
        """Whether this model has a Triton model for `role` (an import from before a role existed has not)."""
        return self.record is not None and role in self.record.engines

    def decode(self, data: bytes, max_pixels: int) -> np.ndarray:
        """Encoded image → the uint8 (H, W, 3) pixels this model's image engine takes."""
        if self.record is not None:
            return decode_for(self.record.image, data, max_pixels)
        return decode_image(data, self.image_size, max_pixels)

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Texts → (ids, mask) int64: native models pad to max_tokens, imported ones to a multiple of 16."""
        if not texts:
            return np.zeros((0, self.max_tokens), np.int64), np.zeros((0, self.max_tokens), np.int64)
        if self.record is not None:
            return tokenize_padded(self.tokenizer, texts, self.max_tokens)
        return tokenize(self.tokenizer, texts, self.max_tokens)


def load_runtime(name: str, spec: ModelSpec, folder: Path, repository: Path | None = None) -> ModelRuntime:
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
    manifest_path = folder.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    return ModelRuntime(
        name,
        spec,
        FusionConfig.from_json(folder / "config.json"),
        load_tokenizer(folder / "tokenizer.json"),
        answers,
        manifest=manifest,
        native_generation=native_generation(spec, repository),
    )


def native_generation(spec: ModelSpec, repository: Path | None) -> GenerationSpec | None:
    """The native model's caption decoder spec from its generate model's checkpoint folder (None when absent)."""
    if not spec.generate or repository is None:
        return None
    folder = repository / spec.generate
    versions = sorted((int(p.name) for p in folder.glob("[0-9]*") if p.name.isdigit()), reverse=True)
    path = folder / str(spec.version or (versions[0] if versions else 1)) / "checkpoint"
    if not (path / SPEC_FILE).exists():
        log.warning("model uses %s for captions, but %s is missing: no caption task", spec.generate, path / SPEC_FILE)
        return None
    return read_spec(path)


def runtime_from_record(record: ImportRecord, tokenizer: Tokenizer) -> ModelRuntime:
    """An imported model's runtime from its record and tokenizer."""
    return ModelRuntime(
        record.name, ModelSpec(), None, tokenizer, record.labels, family=record.family_spec, record=record
    )


def load_imported_runtime(record: ImportRecord, folder: Path) -> ModelRuntime:
    """An imported model's runtime from its checkpoint folder (import.json + tokenizer.json)."""
    missing = [f for f in (IMPORT_RECORD, TOKENIZER_FILE) if not (folder / f).exists()]
    if missing:
        raise ModelFilesMissing(
            f"imported model {record.name!r}: {', '.join(missing)} missing in {folder}: "
            f"import it again (`vtfuse import-hf SOURCE --name {record.name}`)"
        )
    return runtime_from_record(record, load_plain_tokenizer(folder / TOKENIZER_FILE))


def load_runtimes(args: AppArgs) -> dict[str, ModelRuntime]:
    """Every served model: the app's settings' models, then each one imported into the repository."""
    out = {}
    for name, spec in args.models.items():
        folder = args.checkpoint_dir(name)
        out[name] = load_runtime(name, spec, folder, Path(args.repository))
        log.info(
            "model %s: engines %s version %r, checkpoint %s", name, spec.engines(), spec.version or "latest", folder
        )
    for name, record in read_repository_models(args.repository).items():
        if name in out:
            log.warning("imported model %s is shadowed by the settings' model of the same name", name)
            continue
        out[name] = load_imported_runtime(record, record.checkpoint_dir(args.repository))
        log.info("model %s: imported %s (%s), engines %s", name, record.architecture, record.precision,
                 out[name].engines())
    return out


def describe(rt: ModelRuntime) -> dict:
    """One model as `GET /v1/models` and gRPC ListModels list it."""
    if rt.record is not None:
        r = rt.record
        return {
            "name": rt.name,
            "family": r.family,
            "architecture": r.architecture,
            "tasks": list(r.tasks),
            "engines": dict(r.engines),
            "precision": r.precision,
            "source": r.source,
            "parity": r.parity,
        }
    m = rt.manifest or {}
    parity = m.get("parity") or {}
    return {
        "name": rt.name,
        "family": rt.family.name,
        "architecture": f"vtfuse FusionModel ({rt.config.name if rt.config else '?'})",
        "tasks": list(rt.tasks),
        "engines": {role: rt.engine(role) for role in rt.family.roles},
        "precision": m.get("precision", "unknown"),
        "source": str(m.get("source_checkpoint", {}).get("path", "")) if isinstance(m.get("source_checkpoint"), dict)
        else str(m.get("source_checkpoint", "")),
        "parity": {k: parity[k] for k in ("tolerance", "ok", "onnxruntime") if k in parity},
    }
