"""An imported model's engines run by PyTorch (the `torch` target of `vtfuse import-hf`), as Triton loads them.

Each engine is the family's own module (`serving/families/modules/<family>.py`: the same `nn.Module`
the ONNX files are traced from) over the checkpoint's `transformers` weights, which the import copies
into the engine's `1/checkpoint/` folder. On a GPU it runs under FP16 (or BF16) autocast, eagerly or
through `torch.compile`; elsewhere on the CPU in FP32. The import's parity checks of these engines
are in export/hf/torch_engine.py.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serving.families.graphs import EngineGraph
from serving.families.imported import IMPORT_RECORD, ImportRecord
from serving.model.engines import AUTOCAST_DTYPES

MODES = ("eager", "compile")


# config.pbtxt parameters of a torch-target engine (serving/triton/python_models/hf_torch_engine.py reads them).
ENGINE_PARAMETERS = {
    "autocast": "fp16",  # on a GPU; the CPU runs FP32
    "mode": "eager",  # or compile
    # GPU tensors from a caller stay on the GPU.
    "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
}


# What `from_pretrained` reads: the config and the weights (one file, or shards with their index).
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "pytorch_model.bin.index.json")


TORCH_DTYPES = {"UINT8": torch.uint8, "INT64": torch.int64, "FP32": torch.float32}


class HfTorchEngine:
    """One imported engine on one device: `engine(inputs)` → outputs in the graph's order, FP32."""

    def __init__(self, graph: EngineGraph, device: str | torch.device, autocast: str = "fp16",
                 mode: str = "eager") -> None:
        if autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast {autocast!r}: choose one of {', '.join(AUTOCAST_DTYPES)}")
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
        self.role = graph.role
        self.device = torch.device(device)
        self.module = graph.module.to(self.device).eval()
        self.input_names = [t.name for t in graph.inputs]
        self.output_names = [t.name for t in graph.outputs]
        cuda = self.device.type == "cuda"
        self.dtype = AUTOCAST_DTYPES[autocast] if cuda else None  # the CPU runs FP32
        self.mode = mode if cuda else "eager"
        # dynamic=True: one compiled graph serves every batch and token length.
        self.forward: Callable[..., Any] = (
            torch.compile(self.module, dynamic=True) if self.mode == "compile" else self.module
        )

    @torch.inference_mode()
    def __call__(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        inputs = [t.to(self.device, non_blocking=True) for t in inputs]
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            outs = self.forward(*inputs)
        return [o.float() for o in (outs if isinstance(outs, tuple) else (outs,))]

    def run_numpy(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Numpy inputs by name → numpy outputs by name (for parity runs)."""
        outs = self([torch.from_numpy(np.ascontiguousarray(feed[n])) for n in self.input_names])
        return {n: o.cpu().numpy() for n, o in zip(self.output_names, outs)}


def load_graphs(checkpoint_dir: str | Path) -> dict[str, EngineGraph]:
    """Every engine of an installed torch-target model, by role, from its `checkpoint/` folder.

    The folder holds import.json (the family and image processing), the source's config.json
    and its weights, as `vtfuse import-hf --target torch` installed them.
    """
    folder = Path(checkpoint_dir)
    record = ImportRecord.from_json(json.loads((folder / IMPORT_RECORD).read_text()))
    missing = [f for f in ("config.json",) if not (folder / f).exists()]
    if missing or not any(next(folder.glob(p), None) for p in WEIGHT_PATTERNS):
        raise FileNotFoundError(
            f"{folder} lacks the checkpoint's config.json or weights: import it again with "
            f"`vtfuse import-hf SOURCE --name {record.name} --target torch`"
        )
    fam = modules_of(record.family)
    model = fam.load_model(str(folder))
    config = json.loads((folder / "config.json").read_text())
    return {g.role: g for g in fam.graphs(model, config, record.image)}


def modules_of(family: str) -> Any:
    """The PyTorch modules of a family (`serving/families/modules/<family>.py`: `load_model`, `graphs`)."""
    return importlib.import_module(f"serving.families.modules.{family}")
