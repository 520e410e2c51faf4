"""The decoder graphs run by PyTorch (the `torch` target): the family's own modules, same contract as ONNX.

On a GPU the two modules run under autocast (FP16 by default) and the scheduler's NumPy caches
cross to the device each step; on the CPU they run in FP32. The modules are the very ones the ONNX
files are traced from (`export/hf/blip_decoder.py`), built over the checkpoint's weights that
`vtfuse import-hf --target torch` copies into the model's `checkpoint/` folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serving.generation.engine import DecoderShape, read_shape
from serving.model.engines import AUTOCAST_DTYPES


class TorchDecoderEngine:
    """`cross_kv` and `decoder_step` modules on one device."""

    def __init__(self, cross: torch.nn.Module, step: torch.nn.Module, shape: DecoderShape,
                 device: str | None = None, autocast: str = "fp16") -> None:
        self.shape = shape
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cross = cross.to(self.device).eval()
        self.step_module = step.to(self.device).eval()
        self.dtype = AUTOCAST_DTYPES[autocast] if self.device.type == "cuda" else None

    @classmethod
    def from_checkpoint(cls, folder: str | Path, autocast: str = "fp16", threads: int = 1) -> TorchDecoderEngine:
        """The generate model's modules from its `checkpoint/` folder (import.json, config.json, weights)."""
        from serving.families.torch_engine import load_graphs

        torch.set_num_threads(threads)
        graphs = load_graphs(folder)
        return cls(graphs["cross_kv"].module, graphs["decoder_step"].module, read_shape(Path(folder).parent),
                   autocast=autocast)

    def _run(self, module: torch.nn.Module, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        tensors = [torch.from_numpy(np.ascontiguousarray(a)).to(self.device, non_blocking=True) for a in arrays]
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                                                   enabled=self.dtype is not None):
            outs: Any = module(*tensors)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return [o.float().cpu().numpy() for o in outs]

    def cross_kv(self, encoder_states: np.ndarray) -> list[np.ndarray]:
        return self._run(self.cross, [encoder_states.astype(np.float32)])

    def step(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        self_mask: np.ndarray,
        cross_mask: np.ndarray,
        past: Sequence[np.ndarray],
        cross: Sequence[np.ndarray],
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        outs = self._run(self.step_module, [input_ids, position_ids, self_mask, cross_mask, *past, *cross])
        return outs[0], outs[1:]
