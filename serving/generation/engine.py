"""The decoder engines' contract: cross-attention K/V once per sequence, then one token per row per step.

Every generative model vtfuse serves (imported BLIP captioning and VQA, `tiny`'s caption
decoder) is exported as two graphs with these tensors, so one scheduler drives them all:

`cross_kv` (run once per sequence, when it joins):
    ENCODER_STATES float32 (n, S, D_enc) → CROSS_K_<l>, CROSS_V_<l> float32 (n, heads, S, head_dim)

`decoder_step` (run once per step for every active row):
    INPUT_IDS int64 (B, 1)          the token each row feeds
    POSITION_IDS int64 (B, 1)       its position (0-based, per row)
    SELF_MASK int64 (B, P + 1)      1 where the row attends: its P cached positions that are real, and the new one
    CROSS_MASK int64 (B, S)         1 where the row's encoder states are real (question padding, batch padding: 0)
    PAST_K_<l>, PAST_V_<l>          float32 (B, heads, P, head_dim): the self-attention cache
    CROSS_K_<l>, CROSS_V_<l>        float32 (B, heads, S, head_dim): from `cross_kv`
  → LOGITS float32 (B, vocab)       the next-token logits of the new position
    NEW_K_<l>, NEW_V_<l>            float32 (B, heads, 1, head_dim): the new position's K/V, for the cache

Positions, masks and caches are per row, so a row's logits do not depend on the other rows.
`DecoderShape` says how many layers and heads a graph has; `OnnxDecoderEngine` runs the two
graphs with ONNX Runtime, binding the cache buffers in place (no copy of the cross K/V per step).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

CROSS_KV_FILE = "cross_kv.onnx"
DECODER_STEP_FILE = "decoder_step.onnx"
SHAPE_FILE = "decoder.json"


@dataclass(frozen=True)
class DecoderShape:
    """Sizes of a decoder the scheduler allocates caches for."""

    layers: int
    heads: int
    head_dim: int
    vocab: int
    encoder_dim: int

    def bytes_per_position(self) -> int:
        """float32 bytes one position of K and V takes across every layer."""
        return 2 * self.layers * self.heads * self.head_dim * 4

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DecoderShape:
        return cls(**{k: int(v) for k, v in d.items()})


def cross_names(layers: int) -> list[str]:
    """The cross-attention K/V names: CROSS_K_0, CROSS_V_0, CROSS_K_1 and so on."""
    return [f"CROSS_{kv}_{i}" for i in range(layers) for kv in ("K", "V")]


def past_names(layers: int) -> list[str]:
    """The self-attention cache names: PAST_K_0, PAST_V_0 and so on."""
    return [f"PAST_{kv}_{i}" for i in range(layers) for kv in ("K", "V")]


def new_names(layers: int) -> list[str]:
    """The new position K/V names: NEW_K_0, NEW_V_0 and so on."""
    return [f"NEW_{kv}_{i}" for i in range(layers) for kv in ("K", "V")]


def step_input_names(layers: int) -> list[str]:
    """decoder_step's inputs in order."""
    return ["INPUT_IDS", "POSITION_IDS", "SELF_MASK", "CROSS_MASK", *past_names(layers), *cross_names(layers)]


def step_output_names(layers: int) -> list[str]:
    """decoder_step's outputs in order."""
    return ["LOGITS", *new_names(layers)]


class DecoderEngine(Protocol):
    """What the scheduler calls: the two graphs of one decoder."""

    shape: DecoderShape

    def cross_kv(self, encoder_states: np.ndarray) -> list[np.ndarray]:
        """(n, S, D_enc) → [K_0, V_0, K_1, …] each (n, heads, S, head_dim)."""
        ...

    def step(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        self_mask: np.ndarray,
        cross_mask: np.ndarray,
        past: Sequence[np.ndarray],
        cross: Sequence[np.ndarray],
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One token per row → (logits (B, vocab), [NEW_K_0, NEW_V_0, …] each (B, heads, 1, head_dim))."""
        ...


def write_shape(folder: Path, shape: DecoderShape) -> Path:
    """decoder.json next to the two graphs."""
    path = Path(folder) / SHAPE_FILE
    path.write_text(json.dumps(shape.to_json(), indent=2) + "\n")
    return path


def read_shape(folder: Path) -> DecoderShape:
    """The decoder.json written by `write_shape`."""
    return DecoderShape.from_json(json.loads((Path(folder) / SHAPE_FILE).read_text()))


class OnnxDecoderEngine:
    """`cross_kv.onnx` and `decoder_step.onnx` of a folder under ONNX Runtime (CPU)."""

    def __init__(self, folder: str | Path, threads: int | None = None, shape: DecoderShape | None = None) -> None:
        import onnxruntime as ort

        folder = Path(folder)
        self.shape = shape or read_shape(folder)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        self.cross_session = ort.InferenceSession(str(folder / CROSS_KV_FILE), opts, providers=providers)
        self.step_session = ort.InferenceSession(str(folder / DECODER_STEP_FILE), opts, providers=providers)
        self._cross_out = cross_names(self.shape.layers)
        self._step_in = step_input_names(self.shape.layers)
        self._step_out = step_output_names(self.shape.layers)

    def cross_kv(self, encoder_states: np.ndarray) -> list[np.ndarray]:
        feed = {"ENCODER_STATES": np.ascontiguousarray(encoder_states, dtype=np.float32)}
        return list(self.cross_session.run(self._cross_out, feed))

    def step(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        self_mask: np.ndarray,
        cross_mask: np.ndarray,
        past: Sequence[np.ndarray],
        cross: Sequence[np.ndarray],
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        # IOBinding over the arrays as they are: ONNX Runtime reads the (large) cross K/V in place.
        binding = self.step_session.io_binding()
        arrays = [input_ids, position_ids, self_mask, cross_mask, *past, *cross]
        for name, arr in zip(self._step_in, arrays):
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        for name in self._step_out:
            binding.bind_output(name, "cpu")
        self.step_session.run_with_iobinding(binding)
        outs = binding.copy_outputs_to_cpu()
        return outs[0], list(outs[1:])
