"""Stage 1: export each engine of a checkpoint to ONNX, with io_spec's names and a dynamic batch axis.

Three thin wrappers turn the model's entry points (`encode_image`, `encode_text`, `fuse`) into
graphs. The legacy TorchScript exporter (`dynamo=False`) is used: on this model it gives a
plain, single-file opset-17 graph with `LayerNormalization` nodes that ONNX Runtime and the
TensorRT ONNX parser both take, and it exports in well under a second.

A preset with a caption decoder (`tiny`) also gets its two decoder graphs, `cross_kv.onnx` and
`decoder_step.onnx` (`export/caption.py`).

Output folder (default `build/onnx/<preset>/`)::

    image_encoder.onnx  text_encoder.onnx  fusion.onnx
    cross_kv.onnx  decoder_step.onnx   the caption decoder (presets that have one)
    export.json         settings, versions, source checkpoint and sha256 of each file
    checkpoint/         config.json, tokenizer.json, answers.json (installed beside the engines)
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from export.errors import OnnxExportError
from serving.model.checkpoint import DECODER_WEIGHTS, REPO_ROOT, Checkpoint, random_checkpoint, resolve_checkpoint
from serving.model.io_spec import ENGINES, EngineSpec, engine_specs
from serving.model.model import FusionModel

log = logging.getLogger(__name__)

DEFAULT_ONNX_ROOT = REPO_ROOT / "build" / "onnx"
EXPORT_INFO = "export.json"
CHECKPOINT_FILES = ("config.json", "tokenizer.json", "answers.json")
BATCH_AXIS = "batch"
RANDOM_PREFIX = "random:"
_ONNX_TO_TRITON = {
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.FLOAT16: "FP16",
}


@dataclass(frozen=True)
class ExportSettings:
    """Code-owned export settings, recorded in export.json and every manifest."""

    opset: int = 17
    example_batch: int = 2  # traced batch; the axis is dynamic whatever this is
    exporter: str = "torch.onnx.export (TorchScript, dynamo=False)"


class ImageEncoderGraph(nn.Module):
    """PIXELS uint8 (B, S, S, 3) → IMAGE_FEATURES (B, P, D), IMAGE_EMBEDDING (B, E)."""

    def __init__(self, model: FusionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Cast first, so the graph's first node is Cast(uint8 → float) and the NHWC → NCHW
        # transpose runs on floats: TensorRT takes uint8 only at the network boundary.
        # The values are identical (uint8 → float32 is exact); normalisation stays in the graph.
        return self.model.encode_image(pixels.float())


class TextEncoderGraph(nn.Module):
    """INPUT_IDS, ATTENTION_MASK int64 (B, L) → TEXT_FEATURES (B, L, D), TEXT_EMBEDDING (B, E)."""

    def __init__(self, model: FusionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode_text(ids, mask)


class FusionGraph(nn.Module):
    """IMAGE_FEATURES, TEXT_FEATURES, ATTENTION_MASK → VQA_LOGITS, ITM_LOGIT, CROSS_ATTENTION."""

    def __init__(self, model: FusionModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, image_feats: torch.Tensor, text_feats: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self.model.fuse(image_feats, text_feats, mask)


GRAPHS: dict[str, type[nn.Module]] = {
    "image_encoder": ImageEncoderGraph,
    "text_encoder": TextEncoderGraph,
    "fusion": FusionGraph,
}


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_source(source: str | Path) -> Checkpoint:
    """A checkpoint from a preset name, a folder, or `random:<preset>` (seeded random weights).

    `tiny` is the shipped trained checkpoint; `small`/`base` are seeded random; `random:tiny`
    gives `tiny`'s architecture with seeded random weights (tests, chance baselines).
    """
    s = str(source)
    if s.startswith(RANDOM_PREFIX):
        return random_checkpoint(s[len(RANDOM_PREFIX) :])
    return resolve_checkpoint(s)


def default_onnx_dir(source: str | Path) -> Path:
    """`build/onnx/<preset>/`: the preset name, `random-<preset>`, or a checkpoint folder's name."""
    s = str(source)
    if s.startswith(RANDOM_PREFIX):
        return DEFAULT_ONNX_ROOT / f"random-{s[len(RANDOM_PREFIX) :]}"
    if s in ("tiny", "small", "base"):
        return DEFAULT_ONNX_ROOT / s
    return DEFAULT_ONNX_ROOT / Path(s).resolve().name


def source_info(ckpt: Checkpoint, source: str | Path | None = None) -> dict[str, Any]:
    """Where the weights came from and the sha256 of their `model.safetensors`.

    For seeded random weights (no file) the hash is of the safetensors serialisation of the
    in-memory state dict, which is what `save_checkpoint` would write.
    """
    cfg = ckpt.config
    if ckpt.path is not None and (Path(ckpt.path) / "model.safetensors").exists():
        path = Path(ckpt.path).resolve()
        sha = sha256_file(path / "model.safetensors")
        shown = str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)
        info: dict[str, Any] = {"source": str(source or shown), "path": shown, "model_safetensors_sha256": sha}
        if (path / DECODER_WEIGHTS).exists():
            info["caption_decoder_safetensors_sha256"] = sha256_file(path / DECODER_WEIGHTS)
        return info
    state = {k: v.detach().contiguous() for k, v in ckpt.model.state_dict().items()}
    sha = hashlib.sha256(safetensors_bytes(state)).hexdigest()
    info = {
        "source": str(source or f"{RANDOM_PREFIX}{cfg.name}"),
        "path": None,
        "seed": cfg.seed,
        "model_safetensors_sha256": sha,
    }
    if ckpt.decoder is not None:
        decoder_state = {k: v.detach().contiguous() for k, v in ckpt.decoder.state_dict().items()}
        info["caption_decoder_safetensors_sha256"] = hashlib.sha256(safetensors_bytes(decoder_state)).hexdigest()
    return info


def example_inputs(spec: EngineSpec, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Tracing inputs of the right dtype and shape (values do not matter for a traced graph)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in spec.inputs:
        shape = (batch, *t.dims)
        if t.dtype == "UINT8":
            out.append(torch.randint(0, 256, shape, generator=g, dtype=torch.uint8))
        elif t.dtype == "INT64":
            x = torch.randint(1, 8, shape, generator=g, dtype=torch.int64)
            out.append(torch.ones(shape, dtype=torch.int64) if "MASK" in t.name else x)
        else:
            out.append(torch.randn(shape, generator=g))
    return tuple(out)


def verify_graph(model: onnx.ModelProto, spec: EngineSpec) -> None:
    """Check the graph's inputs/outputs against io_spec: names, order, dtypes, dims, dynamic batch.

    Raises:
        OnnxExportError: on the first mismatch, naming the tensor.
    """
    for kind, got, want in (
        ("input", list(model.graph.input), spec.inputs),
        ("output", list(model.graph.output), spec.outputs),
    ):
        names = [v.name for v in got]
        if names != [t.name for t in want]:
            raise OnnxExportError(f"{spec.name}: graph {kind}s are {names}, io_spec says {[t.name for t in want]}")
        for v, t in zip(got, want):
            tt = v.type.tensor_type
            dtype = _ONNX_TO_TRITON.get(tt.elem_type, str(tt.elem_type))
            if dtype != t.dtype:
                raise OnnxExportError(f"{spec.name}.{t.name}: graph dtype {dtype}, io_spec says {t.dtype}")
            dims = tt.shape.dim
            if not dims or dims[0].dim_param != BATCH_AXIS:
                raise OnnxExportError(f"{spec.name}.{t.name}: axis 0 is not the dynamic '{BATCH_AXIS}' axis")
            fixed = tuple(d.dim_value for d in dims[1:])
            if fixed != t.dims:
                raise OnnxExportError(f"{spec.name}.{t.name}: graph dims {fixed}, io_spec says {t.dims}")


def export_engine(
    ckpt: Checkpoint, engine: str, path: str | Path, settings: ExportSettings = ExportSettings()
) -> Path:
    """Export one engine to `path`, run the ONNX checker and verify it against io_spec.

    Raises:
        OnnxExportError: the checker or the io_spec verification failed.
    """
    spec = engine_specs(ckpt.config)[engine]
    wrapper = GRAPHS[engine](ckpt.model).eval()
    args = example_inputs(spec, settings.example_batch)
    names = [t.name for t in (*spec.inputs, *spec.outputs)]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    traced = out.with_name(out.name + ".traced")
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy exporter warns that it is deprecated, and the tracer that unpacking a
        # (2, B, nh, S, hs) tensor into k, v "might" be shape dependent: it is not (always 2).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            wrapper,
            args,
            traced,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_axes={n: {0: BATCH_AXIS} for n in names},
            opset_version=settings.opset,
            do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load(str(traced))
    traced.unlink()
    try:
        onnx.checker.check_model(model, full_check=True)
        # With `dynamic_axes` the exporter names every output axis symbolically; shape inference
        # (with constant propagation) restores the static ones, which io_spec and TensorRT expect.
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise OnnxExportError(f"{engine}: the ONNX checker refused the exported graph: {e}") from e
    verify_graph(model, spec)
    model.doc_string = f"vtfuse {engine} ({ckpt.config.name}): tensor names and dims from serving/model/io_spec.py"
    onnx.save(model, str(out))
    log.info("exported %s to %s (opset %d, %d nodes)", engine, out, settings.opset, len(model.graph.node))
    return out


def _copy_checkpoint_files(ckpt: Checkpoint, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    src = Path(ckpt.path) if ckpt.path is not None else None
    for name in CHECKPOINT_FILES:
        if src is not None and (src / name).exists():
            shutil.copyfile(src / name, dest / name)
        elif name == "config.json":
            (dest / name).write_text(ckpt.config.to_json() + "\n")
        elif name == "tokenizer.json":
            ckpt.tokenizer.save(str(dest / name))
        else:
            (dest / name).write_text(json.dumps(ckpt.answers) + "\n")


def export_onnx(
    ckpt: Checkpoint,
    out_dir: str | Path,
    settings: ExportSettings = ExportSettings(),
    source: str | Path | None = None,
) -> dict[str, Any]:
    """Export all three engines (and a caption decoder's two graphs); write `export.json` and `checkpoint/` beside them.

    Args:
        ckpt: the checkpoint to export.
        out_dir: output folder (e.g. `build/onnx/tiny`).
        settings: opset and exporter settings.
        source: how the checkpoint was named on the command line (recorded only).

    Returns:
        The content of export.json: settings, versions, source and `files` {engine: {path, sha256}}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for engine in ENGINES:
        path = export_engine(ckpt, engine, out / f"{engine}.onnx", settings)
        files[engine] = {"path": path.name, "sha256": sha256_file(path)}
    from export.caption import GRAPH_FILES, export_decoder  # late: export.caption → export.check → this module

    if ckpt.config.has_decoder:
        for graph, path in export_decoder(ckpt, out, settings.opset).items():
            files[graph] = {"path": path.name, "sha256": sha256_file(path)}
    else:  # a folder reused for a preset without a decoder must not offer stale decoder graphs
        for name in GRAPH_FILES.values():
            (out / name).unlink(missing_ok=True)
    _copy_checkpoint_files(ckpt, out / "checkpoint")
    info = {
        "preset": ckpt.config.name,
        "source": source_info(ckpt, source),
        "settings": asdict(settings),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "numpy": np.__version__},
        "files": files,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info


def read_export_info(onnx_dir: str | Path) -> dict[str, Any]:
    """Read `export.json` from a stage-1 folder.

    Raises:
        FileNotFoundError: the folder has not been exported to; the message names the command.
    """
    p = Path(onnx_dir) / EXPORT_INFO
    if not p.exists():
        raise FileNotFoundError(f"no {EXPORT_INFO} in {onnx_dir}: run `vtfuse export onnx` first")
    return json.loads(p.read_text())
