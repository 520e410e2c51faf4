"""The `torch` target's artefacts: the checkpoint's weights for the PyTorch engines, and their parity.

`--target torch` serves the engines with PyTorch inside Triton's Python backend
(serving/triton/python_models/torch_engine.py): on a GPU under FP16 autocast with CUDA graphs,
elsewhere on the CPU in FP32. It is the engine to fall back to when a TensorRT conversion fails,
and the only GPU engine where TensorRT cannot be installed. Its artefact is the checkpoint
(`checkpoint/model.safetensors`) that the ONNX files of stage 1 were exported from; the sha256
recorded in export.json proves it is the same weights.

Parity is asserted as for the other targets: each `TorchEngine`, exactly as the server runs it,
against ONNX Runtime on the stage-1 fp32 ONNX engine, on random inputs with the FP32 tolerance
on the CPU; where CUDA is present, the GPU engine (autocast, CUDA graphs) too, with the FP16
tolerance that TensorRT plans are held to.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.check import FP16_TOLERANCE, FP32_TOLERANCE, Tolerance, compare, ort_session, random_inputs, run_session
from export.errors import InstallError, ParityError
from export.onnx_export import load_source, safetensors_bytes, sha256_file
from serving.model.checkpoint import Checkpoint
from serving.model.engines import EngineSettings, TorchEngine
from serving.model.io_spec import ENGINES, engine_specs

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"


def source_checkpoint(info: dict[str, Any]) -> Checkpoint:
    """The checkpoint export.json names, checked against the sha256 of the weights that were exported.

    Raises:
        InstallError: the source's weights are not those the ONNX files came from.
    """
    src = info["source"]
    ckpt = load_source(src.get("path") or src["source"])
    state = {k: v.detach().contiguous() for k, v in ckpt.model.state_dict().items()}
    sha = hashlib.sha256(safetensors_bytes(state)).hexdigest()
    file_sha = None
    if ckpt.path is not None and (Path(ckpt.path) / WEIGHTS).exists():
        file_sha = sha256_file(Path(ckpt.path) / WEIGHTS)
    if src["model_safetensors_sha256"] not in (sha, file_sha):
        raise InstallError(
            f"the weights of {src['source']} changed since its ONNX export (sha256 differs): "
            "rerun `vtfuse export all --target torch`"
        )
    return ckpt


def write_weights(ckpt: Checkpoint, dest: Path) -> Path:
    """`dest/model.safetensors` with the checkpoint's weights (what the torch engines load)."""
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in ckpt.model.state_dict().items()}
    save_file(state, str(dest / WEIGHTS))
    return dest / WEIGHTS


def _engine_parity(
    ckpt: Checkpoint, onnx_dir: Path, device: str, settings: EngineSettings, tol: Tolerance, batch: int, seed: int
) -> dict[str, Any]:
    cfg = ckpt.config
    rng = np.random.default_rng(seed)
    report: dict[str, Any] = {}
    for e in ENGINES:
        spec = engine_specs(cfg)[e]
        feeds = random_inputs(spec, cfg, batch, rng)
        ref = run_session(ort_session(onnx_dir / f"{e}.onnx"), feeds)
        engine = TorchEngine(ckpt.model, e, device, settings)
        outs = engine([torch.from_numpy(feeds[t.name]) for t in spec.inputs], need_attention=True)
        report[e] = {
            t.name: compare(ref[t.name], o.cpu().numpy(), tol)  # type: ignore[union-attr]
            for t, o in zip(spec.outputs, outs)
        }
    return report


def check_torch_parity(ckpt: Checkpoint, onnx_dir: str | Path, *, batch: int = 5, seed: int = 0) -> dict[str, Any]:
    """The torch engines against ONNX Runtime's fp32 engines: CPU fp32 always, CUDA fp16 where present.

    Raises:
        ParityError: an output is out of tolerance (its `figures` hold the report).
    """
    onnx_dir = Path(onnx_dir)
    report: dict[str, Any] = {"batch": batch, "seed": seed}
    report["cpu_fp32"] = {
        "tolerance": asdict(FP32_TOLERANCE),
        "engines": _engine_parity(ckpt, onnx_dir, "cpu", EngineSettings(autocast="fp32", mode="eager"),
                                  FP32_TOLERANCE, batch, seed),
    }
    if torch.cuda.is_available():
        report["cuda_fp16"] = {
            "gpu": torch.cuda.get_device_name(0),
            "tolerance": asdict(FP16_TOLERANCE),
            "engines": _engine_parity(ckpt, onnx_dir, "cuda", EngineSettings(max_batch=8), FP16_TOLERANCE,
                                      batch, seed),
        }
        ckpt.model.cpu()
    else:
        report["cuda_fp16"] = {"skipped": "no CUDA device visible to PyTorch here"}
    bad = [
        f"{kind} {e}.{o}: max_abs {f['max_abs']:.3g}, max_rel {f['max_rel']:.3g}"
        for kind in ("cpu_fp32", "cuda_fp16")
        for e, outs in report[kind].get("engines", {}).items()
        for o, f in outs.items()
        if not f["ok"]
    ]
    report["ok"] = not bad
    if bad:
        first = next(
            (k, e, o) for k in ("cpu_fp32", "cuda_fp16") for e, outs in report[k].get("engines", {}).items()
            for o, f in outs.items() if not f["ok"]
        )
        raise ParityError(
            f"the torch engines differ from ONNX Runtime ({first[0]}): " + "; ".join(bad),
            engine=first[1], output=first[2], figures=report,
        )
    log.info("torch engines match ONNX Runtime (%s)", ", ".join(k for k in ("cpu_fp32", "cuda_fp16")
                                                               if "engines" in report[k]))
    return report
