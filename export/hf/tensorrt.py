"""TensorRT plans of an imported model's engines (`vtfuse import-hf --target tensorrt`), judged as users see them.

Each engine's optimization profile covers its batch axis and every other variable axis: token
length from 1 to the model's limit (optimum: two padding multiples), and for ViLT the image
sides the processor can produce (from one size-divisor step up to the longer-edge cap; optimum
the square shortest-edge image). Plans are FP16 and built with `export.engine.build_plan` (cached
per GPU and TensorRT version). They are judged against the fp32 ONNX engines on the parity cases
with the family's own `judge` (the ranking of texts, the answers, embedding cosines), as int8 is.

Where TensorRT or a GPU is missing, `build_plans` raises `EngineUnavailable` with the reason:
nothing is installed and the CLI exits 3 (a skip, not a failure).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from export.engine import DEFAULT_CACHE, BatchProfile, Shapes, availability, build_plan, run_plan
from export.hf.graphs import EngineGraph, ParityCase
from serving.families.imported import PAD_MULTIPLE, VILT_LONGER_OVER_SHORTER, ImageProcessing


def _axis_range(name: str, image: ImageProcessing, max_tokens: int) -> tuple[int, int, int]:
    """(min, opt, max) of a variable axis: tokens, or an image side (ViLT)."""
    if name == "PIXELS":  # (H, W) of the resized image: both multiples of size_divisor
        div = max(1, image.size_divisor)
        longer = int(VILT_LONGER_OVER_SHORTER * image.shortest_edge) // div * div
        return div, image.shortest_edge // div * div, longer
    return 1, min(max_tokens, 2 * PAD_MULTIPLE), max_tokens


def input_shapes(graph: EngineGraph, image: ImageProcessing, max_tokens: int) -> Shapes:
    """Full (min, opt, max) shapes of every input of an engine, batch axis first."""
    b = BatchProfile(1, max(1, graph.max_batch_size // 2), graph.max_batch_size)
    shapes: Shapes = {}
    for t in graph.inputs:
        ranges = [(b.min, b.opt, b.max)] + [
            (d, d, d) if d >= 0 else _axis_range(t.name, image, max_tokens) for d in t.dims
        ]
        lo, opt, hi = (tuple(r[k] for r in ranges) for k in range(3))
        shapes[t.name] = (lo, opt, hi)
    return shapes


def build_plans(
    graphs: list[EngineGraph],
    onnx_paths: dict[str, Path],
    image: ImageProcessing,
    max_tokens: int,
    cache_root: str | Path = DEFAULT_CACHE,
) -> tuple[dict[str, Path], dict[str, Any]]:
    """FP16 plans of every engine.

    Returns:
        ({role: plan path}, {"tensorrt", "gpu", "fp16", "profiles"}).

    Raises:
        EngineUnavailable: no TensorRT or no GPU here.
        EngineBuildError: a plan failed to build.
    """
    trt, gpu = availability()
    plans, profiles = {}, {}
    for g in graphs:
        shapes = input_shapes(g, image, max_tokens)
        batch = BatchProfile(1, max(1, g.max_batch_size // 2), g.max_batch_size)
        plans[g.role] = build_plan(onnx_paths[g.role], batch, fp16=True, cache_root=cache_root, shapes=shapes)
        profiles[g.role] = {k: [list(s) for s in v] for k, v in shapes.items()}
    return plans, {"tensorrt": trt.__version__, "gpu": gpu, "fp16": True, "profiles": profiles}


def run_cases(plans: dict[str, Path], cases: list[ParityCase]) -> list[dict[str, Any]]:
    """Each parity case through its engine's plan on the GPU."""
    return [run_plan(plans[c.role], c.feed) for c in cases]
