"""An imported model's engines run by PyTorch: the `torch` target of `vtfuse import-hf`.

Each engine is the family's own module (export/hf/<family>.py: the same `nn.Module` the ONNX
files are traced from) over the checkpoint's `transformers` weights, which the import copies
into the engine's `1/checkpoint/` folder. Triton's Python backend runs it
(serving/triton/python_models/hf_torch_engine.py): on a GPU under FP16 (or BF16) autocast,
eagerly or through `torch.compile`; elsewhere on the CPU in FP32. Imported engines have
variable axes (token length; ViLT's image sides), so the native engines' CUDA graphs per batch
bucket do not apply here.

Parity (`check_parity`) holds the CPU FP32 engines to the fp32 gate against the `transformers`
forward, exactly as the ONNX engines are held; where CUDA is present, the GPU engines under
autocast are judged against them as a user sees the answers (the family's `judge`, as for int8).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from export.hf.graphs import EngineGraph, ParityCase, UserView
from serving.families.torch_engine import (  # noqa: F401 - the engines the torch target installs, as Triton loads them
    ENGINE_PARAMETERS,
    MODES,
    WEIGHT_PATTERNS,
    HfTorchEngine,
    load_graphs,
)


def copy_weights(source: Path, dest: Path) -> list[Path]:
    """The source checkpoint's weight files into `dest` (what `load_graphs` reads back)."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for pattern in WEIGHT_PATTERNS:
        for f in sorted(source.glob(pattern)):
            if not (dest / f.name).exists():
                shutil.copyfile(f, dest / f.name)
                copied.append(dest / f.name)
    if not any(p.suffix in (".safetensors", ".bin") for p in copied):
        raise FileNotFoundError(f"{source} holds no weights (*.safetensors or *.bin)")
    return copied


def _run(graphs: list[EngineGraph], cases: list[ParityCase], device: str, autocast: str) -> list[dict[str, Any]]:
    engines = {g.role: HfTorchEngine(g, device, autocast=autocast) for g in graphs}
    return [engines[c.role].run_numpy(c.feed) for c in cases]


def check_parity(
    graphs: list[EngineGraph], cases: list[ParityCase], judge: Callable[..., UserView], autocast: str = "fp16"
) -> dict[str, Any]:
    """The torch engines on the parity cases, on the CPU and, where present, on CUDA.

    CPU FP32 is held to the fp32 gate against transformers; CUDA under autocast is judged
    against the CPU engines as a user sees the answers (`judge`).

    Returns:
        {"cpu_fp32": fp32 report, "cuda": {"gpu", "autocast", "figures", "failures", "ok"} or {"skipped"}, "ok"}.
    """
    from export.hf import parity  # ONNX Runtime's side of the import: not in the triton-torch image

    cpu = _run(graphs, cases, "cpu", "fp32")
    report: dict[str, Any] = {"cpu_fp32": parity.fp32_report(cases, cpu)}
    if torch.cuda.is_available():
        try:
            gpu = _run(graphs, cases, "cuda", autocast)
        finally:
            for g in graphs:
                g.module.cpu()
        view = judge(parity.by_role(cases, cpu), parity.by_role(cases, gpu))
        report["cuda"] = {"gpu": torch.cuda.get_device_name(0), "autocast": autocast, "figures": view.figures,
                          "failures": view.failures, "ok": not view.failures}
    else:
        report["cuda"] = {"skipped": "no CUDA device visible to PyTorch here"}
    report["ok"] = report["cpu_fp32"]["ok"] and report["cuda"].get("ok", True)
    return report
