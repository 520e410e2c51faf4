"""Parity of an imported model's engines with the `transformers` module: the fp32 gate and the inputs it is judged on.

fp32: every output of every engine within `FP32_TOLERANCE` of the module's own forward, in
absolute terms for values up to 1 (embeddings, probabilities, most logits) and relative to the
largest reference value beyond (hidden states and logits of models whose weights make them
large, where float32 rounding alone exceeds 1e-4 absolute). Both figures are recorded.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from export.check import ort_session, run_session
from export.hf.graphs import ParityCase
from serving.families.imported import image_from_bytes
from serving.shapes import world

FP32_TOLERANCE = 1e-4
# Real inputs: shapes-world scenes rendered at several sizes and aspect ratios (ViLT keeps the
# aspect ratio), with captions and questions of that world.
PARITY_IMAGE_SIZES = ((64, 64), (96, 72), (150, 120), (80, 200))
PARITY_TEXTS = (
    "a red circle",
    "a blue square and a green triangle",
    "what color is the circle?",
    "how many squares are there?",
    "is there a yellow triangle?",
    "a yellow circle and a red square and a blue triangle",
)


def parity_images(seed: int = 7) -> list[Any]:
    """Rendered scenes (PIL images, PNG round-tripped) at PARITY_IMAGE_SIZES."""
    rng = random.Random(seed)
    out = []
    for w, h in PARITY_IMAGE_SIZES:
        img = world.render(world.random_scene(rng), side=max(w, h), supersample=2).resize((w, h))
        out.append(image_from_bytes(world.encode(img, "PNG")))
    return out


def run_cases(paths: dict[str, Path], cases: list[ParityCase], threads: int | None = None) -> list[dict[str, Any]]:
    """Each case's engine outputs under ONNX Runtime (one session per engine file)."""
    sessions = {role: ort_session(p, threads) for role, p in paths.items()}
    return [run_session(sessions[c.role], c.feed) for c in cases]


def fp32_report(cases: list[ParityCase], outputs: list[dict[str, Any]], tolerance: float = FP32_TOLERANCE) -> dict:
    """Worst error per engine output against the reference, and whether every one is within tolerance."""
    worst: dict[str, dict[str, dict[str, float]]] = {}
    for case, out in zip(cases, outputs):
        for name, ref in case.expected.items():
            got = np.asarray(out[name], dtype=np.float64).reshape(ref.shape)
            err = float(np.abs(got - ref).max())
            scale = max(1.0, float(np.abs(ref).max()))
            w = worst.setdefault(case.role, {}).setdefault(name, {"max_abs": 0.0, "max_scaled": 0.0, "ref_max": 0.0})
            w["max_abs"] = max(w["max_abs"], err)
            w["max_scaled"] = max(w["max_scaled"], err / scale)
            w["ref_max"] = max(w["ref_max"], float(np.abs(ref).max()))
    failures = [
        f"{role}.{name}: max abs {w['max_abs']:.3g} (scaled {w['max_scaled']:.3g}) > {tolerance}"
        for role, outs in worst.items()
        for name, w in outs.items()
        if w["max_scaled"] > tolerance
    ]
    return {
        "tolerance": tolerance,
        "reference": "transformers forward on the processor's tensors",
        "cases": len(cases),
        "engines": worst,
        "ok": not failures,
        "failures": failures,
    }


def by_role(cases: list[ParityCase], outputs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Outputs grouped per engine role, in case order."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for c, o in zip(cases, outputs):
        grouped.setdefault(c.role, []).append(o)
    return grouped


def generation_agreement(expected: list[list[int]], got: list[list[int]], notes: list[str]) -> dict[str, Any]:
    """Served token sequences against transformers' `generate()`, sequence by sequence (all must be equal)."""
    same = [a == b for a, b in zip(expected, got)]
    failures = [
        f"{note}: transformers {a}, served {b}" for note, a, b, ok in zip(notes, expected, got, same) if not ok
    ][:5]
    return {
        "reference": "transformers generate(), each sequence alone",
        "sequences": len(same),
        "identical": int(sum(same)),
        "agreement": float(sum(same)) / max(1, len(same)),
        "ok": all(same),
        "failures": failures,
    }
