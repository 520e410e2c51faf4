"""An imported model's engines as traceable PyTorch modules with their tensor contracts (Triton names, dtypes, dims).

The export side traces them to ONNX (`export/hf/`); the `torch` target runs them in Triton's
Python backend (`serving/families/torch_engine.py`), so they live in the runtime package.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from serving.families.imported import ImageProcessing


@dataclass(frozen=True)
class Tensor:
    """One engine tensor: Triton name and dtype, dims without the batch axis (-1: variable)."""

    name: str
    dtype: str  # UINT8, INT64, FP32
    dims: tuple[int, ...]


@dataclass
class EngineGraph:
    """One engine of an imported model: the module to trace, example inputs, and its contract."""

    role: str
    module: nn.Module
    example: tuple[torch.Tensor, ...]
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    max_batch_size: int = 64
    # The Triton model the graph is installed in (default: its own role) and its file there. A decoupled
    # generation model holds two graphs (cross_kv.onnx, decoder_step.onnx) that it runs itself.
    model_role: str = ""
    filename: str = "model.onnx"

    @property
    def triton_role(self) -> str:
        """The role of the Triton model (`NAME_<role>`) this graph belongs to."""
        return self.model_role or self.role

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Batch axis and every -1 dim of each tensor, named for the exporter."""
        axes: dict[str, dict[int, str]] = {}
        for t in (*self.inputs, *self.outputs):
            d = {0: "batch"}
            for i, n in enumerate(t.dims):
                if n < 0:
                    d[i + 1] = f"{t.name.lower()}_{i + 1}"
            axes[t.name] = d
        return axes


class Normalize(nn.Module):
    """uint8 NHWC pixels → the processor's rescaled, normalised float NCHW tensor, inside the graph."""

    def __init__(self, image: ImageProcessing) -> None:
        super().__init__()
        self.scale = image.rescale_factor if image.do_rescale else 1.0
        mean = image.mean if image.do_normalize else (0.0, 0.0, 0.0)
        std = image.std if image.do_normalize else (1.0, 1.0, 1.0)
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # Cast first (uint8 → float32 is exact), then NHWC → NCHW on floats.
        x = pixels.float().permute(0, 3, 1, 2) * self.scale  # (B, 3, H, W)
        return (x - self.mean) / self.std
