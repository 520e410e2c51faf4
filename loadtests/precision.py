"""The engines of one precision (fp32 or dynamic int8) of a preset, for benchmarks that compare the two.

Both come from the preset's stage-1 folder (`build/onnx/<preset>/`, written by `vtfuse export`):
the fp32 graphs and the int8 copies of `vtfuse export quantize` (export/quantize.py, run here
when missing). Benchmarks swap them into copies of a repository under build/bench/; the
repository itself is never touched.
"""

from __future__ import annotations

from pathlib import Path

from export.onnx_export import default_onnx_dir
from export.quantize import INT8_DIR, quantize
from loadtests.flops import ENGINES


def engine_files(preset: str, precision: str) -> dict[str, Path]:
    """`<engine>: path` of the preset's fp32 or int8 graphs."""
    onnx_dir = default_onnx_dir(preset)
    if precision == "int8" and not (onnx_dir / INT8_DIR / "fusion.onnx").exists():
        quantize(onnx_dir)
    folder = onnx_dir / INT8_DIR if precision == "int8" else onnx_dir
    paths = {e: folder / f"{e}.onnx" for e in ENGINES}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing: run `vtfuse export all --checkpoint {preset}`")
    return paths


def replacements(preset: str, precision: str) -> dict[str, dict[str, Path]]:
    """`servers.variant_repository` swaps of each engine's model.onnx for the preset's `precision` graph."""
    return {e: {"model.onnx": p} for e, p in engine_files(preset, precision).items()}
