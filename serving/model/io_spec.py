"""Tensor names, dtypes and dims of every engine: one source for export, config.pbtxt and clients.

Dims exclude the batch axis (Triton's convention with `max_batch_size` > 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.model.config import FusionConfig

ENGINES = ("image_encoder", "text_encoder", "fusion")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor: Triton name, Triton dtype, dims without the batch axis."""

    name: str
    dtype: str  # Triton TYPE_* without the prefix: UINT8, INT64, FP32, STRING
    dims: tuple[int, ...]

    @property
    def numpy_dtype(self) -> str:
        """The numpy dtype name for this tensor."""
        return {"UINT8": "uint8", "INT64": "int64", "FP32": "float32", "FP16": "float16", "STRING": "object"}[
            self.dtype
        ]


@dataclass(frozen=True)
class EngineSpec:
    """Inputs and outputs of one engine."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def engine_specs(cfg: FusionConfig) -> dict[str, EngineSpec]:
    """The tensor contract of the three engines for a preset."""
    S, P, D, L, E, A = cfg.image_size, cfg.num_patches, cfg.dim, cfg.max_text_len, cfg.embed_dim, cfg.num_answers
    return {
        "image_encoder": EngineSpec(
            "image_encoder",
            (TensorSpec("PIXELS", "UINT8", (S, S, 3)),),
            (TensorSpec("IMAGE_FEATURES", "FP32", (P, D)), TensorSpec("IMAGE_EMBEDDING", "FP32", (E,))),
        ),
        "text_encoder": EngineSpec(
            "text_encoder",
            (TensorSpec("INPUT_IDS", "INT64", (L,)), TensorSpec("ATTENTION_MASK", "INT64", (L,))),
            (TensorSpec("TEXT_FEATURES", "FP32", (L, D)), TensorSpec("TEXT_EMBEDDING", "FP32", (E,))),
        ),
        "fusion": EngineSpec(
            "fusion",
            (
                TensorSpec("IMAGE_FEATURES", "FP32", (P, D)),
                TensorSpec("TEXT_FEATURES", "FP32", (L, D)),
                TensorSpec("ATTENTION_MASK", "INT64", (L,)),
            ),
            (
                TensorSpec("VQA_LOGITS", "FP32", (A,)),
                TensorSpec("ITM_LOGIT", "FP32", (1,)),
                TensorSpec("CROSS_ATTENTION", "FP32", (cfg.fusion_layers, L, P)),
            ),
        ),
    }


def preprocess_spec(cfg: FusionConfig) -> EngineSpec:
    """The `preprocess` Python model: encoded image + text → engine inputs."""
    S, L = cfg.image_size, cfg.max_text_len
    return EngineSpec(
        "preprocess",
        (TensorSpec("IMAGE", "STRING", (1,)), TensorSpec("TEXT", "STRING", (1,))),
        (
            TensorSpec("PIXELS", "UINT8", (S, S, 3)),
            TensorSpec("INPUT_IDS", "INT64", (L,)),
            TensorSpec("ATTENTION_MASK", "INT64", (L,)),
        ),
    )


# `vqa` for direct clients: names fixed by the public contract.
VQA_TENSORS = EngineSpec(
    "vqa",
    (TensorSpec("IMAGE", "STRING", (1,)), TensorSpec("QUESTION", "STRING", (1,))),
    (TensorSpec("ANSWER", "STRING", (1,)), TensorSpec("SCORE", "FP32", (1,))),
)
