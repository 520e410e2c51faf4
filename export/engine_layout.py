"""How many instances of each CPU engine Triton runs, and with how many intra-op threads: one table.

The native models (`vtfuse export install`: `tiny`, `small`) and imported checkpoints (`vtfuse
import-hf`) read the same rows. Each was measured on this project's 2-core CPU machine behind the
public API (loadtests/README.md, "Closing the gap: levers", and the BLIP-base captioning levers):

- int8 engines: 2 instances × 1 ONNX Runtime thread (levers 12, 39, 40: `small` 1.105× the req/s of
  2 threads, every window higher; two instances of 2 threads each contend for 2 cores);
- fp32 engines: 2 instances × 2 threads (lever 12: 1 thread lost 7 % on `small`);
- a generative model's vision tower: 2 × 1 in fp32 too (lever 47: +11-22 % BLIP-base captions/s at
  c=16 over 1 × 2, the decode loop running beside it);
- a generative model's decoder, inside its decoupled `NAME_generate` model: one instance, 1 thread
  (lever 44: +22 %; a second thread spun against the vision tower).

GPU targets (`torch` on KIND_AUTO, `tensorrt`) keep one instance a device; their threads are the
CPU fallback's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineLayout:
    """One engine's Triton instances (instance_group count) and intra-op threads per instance."""

    instances: int
    threads: int


ENGINE_LAYOUT: dict[str, EngineLayout] = {"int8": EngineLayout(2, 1), "fp32": EngineLayout(2, 2)}
# Parts of a generative model whose work runs beside the decode loop, whatever the precision.
GENERATION_LAYOUT: dict[str, EngineLayout] = {"image_encoder": EngineLayout(2, 1), "decoder": EngineLayout(1, 1)}
# Threads per instance by precision (what `vtfuse export install` writes into a rendered engine config).
ENGINE_THREADS: dict[str, int] = {p: layout.threads for p, layout in ENGINE_LAYOUT.items()}


def engine_layout(precision: str, role: str | None = None, generative: bool = False) -> EngineLayout:
    """The row for an engine: a generative model's vision tower or decoder, else its precision's."""
    if generative and role in GENERATION_LAYOUT:
        return GENERATION_LAYOUT[role]
    if precision not in ENGINE_LAYOUT:
        raise ValueError(f"precision {precision!r}: the engine layout knows {sorted(ENGINE_LAYOUT)}")
    return ENGINE_LAYOUT[precision]
