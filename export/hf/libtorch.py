"""An imported model's engines as TorchScript: the `libtorch` target of `vtfuse import-hf`.

Each engine's module (the one its ONNX file is traced from) is traced with `torch.jit.trace` on
the family's example inputs, saved, loaded back as Triton's PyTorch backend loads it, and held
to the same fp32 gate as the ONNX engines against the `transformers` forward, on every parity
case. The cases hold several batch sizes, text lengths and (ViLT) image sides, so a trace that
froze a variable axis fails the gate and nothing is installed.

Installed as the native model's libtorch target is (export/libtorch.py): `NAME_<role>_libtorch`
runs `1/model.pt` on Triton's `pytorch_libtorch` backend with tensors named `<name>__<index>`,
and the one-step ensemble `NAME_<role>` in front of it keeps the engine's own tensor names, so
the API calls an imported model the same way on every target. Only a Triton built with the
PyTorch backend (the NGC container) serves it; the embedded server here does not.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.hf.graphs import EngineGraph, ParityCase

LIBTORCH_DIR = "libtorch"  # in the import's work folder, beside the ONNX files


def trace_graphs(graphs: list[EngineGraph], folder: Path) -> dict[str, Path]:
    """`torch.jit.trace` of each engine (CPU, fp32) to `folder/<role>.pt`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for g in graphs:
        with torch.no_grad(), warnings.catch_warnings():
            # transformers' Python-level shape checks make the tracer warn; the parity cases,
            # at other shapes than the example, are what decides whether the trace holds.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(g.module.cpu().eval(), g.example, check_trace=False)
        paths[g.role] = folder / f"{g.role}.pt"
        traced.save(str(paths[g.role]))
    return paths


def run_cases(paths: dict[str, Path], graphs: list[EngineGraph], cases: list[ParityCase]) -> list[dict[str, Any]]:
    """Each case's outputs from the saved TorchScript files, loaded back as Triton loads them."""
    modules = {role: torch.jit.load(str(p), map_location="cpu").eval() for role, p in paths.items()}
    names = {g.role: ([t.name for t in g.inputs], [t.name for t in g.outputs]) for g in graphs}
    out = []
    for case in cases:
        ins, outs = names[case.role]
        with torch.no_grad():
            result = modules[case.role](*(torch.from_numpy(np.ascontiguousarray(case.feed[n])) for n in ins))
        result = result if isinstance(result, tuple) else (result,)
        out.append({n: r.numpy() for n, r in zip(outs, result)})
    return out


def build(graphs: list[EngineGraph], cases: list[ParityCase], work: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """Trace every engine into `work/libtorch/` and hold the files to the fp32 gate.

    Returns:
        ({role: model.pt path}, the fp32 report of export.hf.parity, with "ok" and "failures").
    """
    from export.hf import parity

    paths = trace_graphs(graphs, work / LIBTORCH_DIR)
    report = parity.fp32_report(cases, run_cases(paths, graphs, cases))
    report["torch"] = torch.__version__
    return paths, report
