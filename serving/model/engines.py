"""The three engines as PyTorch callables: the `torch` target's engines, and the GPU benchmark's.

`TorchEngine` runs one role (`image_encoder`, `text_encoder`, `fusion`) with the tensor
contract of serving/model/io_spec.py: inputs and outputs in io_spec order, outputs FP32
whatever the compute precision. On CUDA it runs under FP16 (or BF16) autocast and replays
a CUDA graph captured per batch-size bucket: the batch is padded up to the next bucket, so
a handful of graphs cover every batch the dynamic batcher forms, and each call costs one
graph launch instead of hundreds of kernel launches. On CPU it runs eagerly in FP32.

The fusion role computes the cross-attention weights only when asked: without them its
cross-attention runs PyTorch's fused attention kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from serving.model.io_spec import ENGINES, engine_specs
from serving.model.model import FusionModel

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}
MODES = ("cuda_graphs", "eager", "compile")


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two below `max_batch`, then `max_batch` itself: the batch sizes graphs are captured for."""
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    return [*buckets, max_batch]


@dataclass(frozen=True)
class EngineSettings:
    """How a `TorchEngine` runs: compute precision on CUDA, graph mode, the largest batch."""

    autocast: str = "fp16"  # fp16 | bf16 | fp32; CUDA only (CPU runs fp32)
    mode: str = "cuda_graphs"  # cuda_graphs | eager | compile; CUDA only (CPU runs eager)
    max_batch: int = 256

    def __post_init__(self) -> None:
        if self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast {self.autocast!r}: choose one of {', '.join(AUTOCAST_DTYPES)}")
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: choose one of {', '.join(MODES)}")


def role_forward(model: FusionModel, role: str, need_attention: bool = True) -> Callable[..., tuple]:
    """The engine's forward: io_spec inputs (positional) → io_spec outputs (a tuple; None for one not computed)."""
    if role == "image_encoder":
        return lambda pixels: model.encode_image(pixels.float())
    if role == "text_encoder":
        return lambda ids, mask: model.encode_text(ids, mask)
    if role == "fusion":
        return lambda feats, tfeats, mask: model.fuse(feats.float(), tfeats.float(), mask, need_weights=need_attention)
    raise ValueError(f"unknown engine {role!r}: choose one of {', '.join(ENGINES)}")


class _Graph:
    """One captured CUDA graph: static inputs to copy into, static outputs to read."""

    def __init__(self, fn: Callable[..., tuple], example: list[torch.Tensor], dtype: torch.dtype | None) -> None:
        self.inputs = [t.clone() for t in example]
        self.graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            for _ in range(2):  # warm-up on a side stream, as CUDA graph capture requires
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph), torch.autocast("cuda", dtype=dtype or torch.float32,
                                                          enabled=dtype is not None):
            self.outputs = fn(*self.inputs)

    def __call__(self, inputs: list[torch.Tensor]) -> tuple:
        n = inputs[0].shape[0]
        for static, t in zip(self.inputs, inputs):
            static[:n].copy_(t)
        self.graph.replay()
        # Static outputs are overwritten by the next replay: hand out copies of the live rows.
        return tuple(None if o is None else o[:n].clone() for o in self.outputs)


class TorchEngine:
    """One engine role on one device: `engine(inputs, need_attention)` → outputs in io_spec order (FP32)."""

    def __init__(self, model: FusionModel, role: str, device: str | torch.device, settings: EngineSettings) -> None:
        self.role = role
        self.device = torch.device(device)
        self.settings = settings
        self.model = model.to(self.device).eval()
        spec = engine_specs(model.cfg)[role]
        self.input_specs = spec.inputs
        self.output_names = [t.name for t in spec.outputs]
        cuda = self.device.type == "cuda"
        self.dtype = AUTOCAST_DTYPES[settings.autocast] if cuda else None
        self.mode = settings.mode if cuda else "eager"
        self.buckets = batch_buckets(settings.max_batch)
        self._graphs: dict[tuple[int, bool], _Graph] = {}
        self._forwards = {w: role_forward(self.model, role, w) for w in (True, False)}
        if self.mode == "compile":
            self._forwards = {w: torch.compile(f, dynamic=False) for w, f in self._forwards.items()}

    def example_inputs(self, batch: int) -> list[torch.Tensor]:
        """Valid inputs of `batch` rows on the engine's device (zeros; masks keep position 0, [CLS], on)."""
        out = []
        for t in self.input_specs:
            dtype = {"UINT8": torch.uint8, "INT64": torch.int64, "FP32": torch.float32}[t.dtype]
            x = torch.zeros((batch, *t.dims), dtype=dtype, device=self.device)
            if t.name == "ATTENTION_MASK":
                x[:, 0] = 1
            out.append(x)
        return out

    def bucket(self, n: int) -> int:
        """The smallest captured batch size that holds `n` rows."""
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"batch of {n} rows is over this engine's max_batch {self.settings.max_batch}")

    def warm_up(self) -> None:
        """Capture every bucket's graph now (at model load), not on the first request of each size."""
        for b in self.buckets:
            self(self.example_inputs(b), need_attention=False)

    @torch.inference_mode()
    def __call__(self, inputs: list[torch.Tensor], need_attention: bool = True) -> list[torch.Tensor | None]:
        inputs = [t.to(self.device, non_blocking=True) for t in inputs]
        need_attention = need_attention and self.role == "fusion"  # one graph per bucket for the towers
        if self.mode != "cuda_graphs":
            with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                outs = self._forwards[need_attention](*inputs)
        else:
            key = (self.bucket(inputs[0].shape[0]), need_attention)
            if key not in self._graphs:
                self._graphs[key] = _Graph(self._forwards[need_attention], self.example_inputs(key[0]), self.dtype)
            outs = self._graphs[key](inputs)
        return [None if o is None else o.float() for o in outs]
