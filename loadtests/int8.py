"""Dynamic int8 quantisation of the three engines (weights int8, activations quantised at run time).

This CPU lever trades exactness for speed: levers.py records its parity against fp32, and
`python -m loadtests.bench --int8` measures the whole stack with int8 engines (a repository
copy under build/; the committed repository is untouched).
"""

from __future__ import annotations

import logging
from pathlib import Path

from loadtests import flops
from loadtests.common import REPO_ROOT

INT8_DIR = REPO_ROOT / "build" / "bench" / "int8"


def quantize(repo: Path, dest: Path) -> dict[str, Path]:
    """Dynamic int8 (weights QInt8, activations quantised at run time) copies of the three engines."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)  # the quantizer logs every tensor it skips at INFO
    try:
        for e, src in flops.repository_onnx(repo).items():
            out[e] = dest / f"{e}.onnx"
            quantize_dynamic(src, out[e], weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        root.setLevel(level)
    return out


def int8_replacements(repo: Path, preset: str) -> dict[str, dict[str, Path]]:
    """`variant_repository` replacements that swap each engine's model.onnx for its int8 copy."""
    paths = quantize(repo, INT8_DIR / preset)
    return {e: {"model.onnx": p} for e, p in paths.items()}
