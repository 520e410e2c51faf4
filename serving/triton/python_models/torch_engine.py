"""Python-backend engine model of the `torch` target: one engine role run by PyTorch (serving/model/engines.py).

An instance on a GPU (`KIND_GPU`, or `KIND_AUTO` where Triton sees one) runs on that GPU
under FP16 autocast with CUDA graphs per batch bucket; anywhere else it runs on the CPU in
FP32. Inputs on the GPU (a BLS caller handing on another engine's output; the config sets
FORCE_CPU_ONLY_INPUT_TENSORS to "no") are read through DLPack without a copy, and outputs
on the GPU are handed back through DLPack: the next engine reads them where they are.

Config parameters: `autocast` (fp16 | bf16 | fp32), `mode` (cuda_graphs | eager | compile),
`torch_threads` (CPU intra-op threads), `warm_up` ("1": capture every bucket's graph at load),
`role` (the engine, when the model's name is not one of the three).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

from serving.model.checkpoint import load_checkpoint
from serving.model.engines import EngineSettings, TorchEngine
from serving.triton.python_models.common import parameters, version_dir
from serving.triton.python_models.engine import BatchedEngineModel

log = logging.getLogger(__name__)


def instance_device(args: dict[str, Any]) -> str:
    """`cuda:N` for an instance Triton placed on GPU N (when PyTorch sees CUDA), else `cpu`."""
    if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
        return f"cuda:{int(args.get('model_instance_device_id', 0))}"
    return "cpu"


class TorchTensorsModel(BatchedEngineModel):
    """The tensor hand-over of a PyTorch engine model: CPU inputs from numpy, GPU ones and outputs through DLPack."""

    device: str

    def read(self, tensor: Any) -> torch.Tensor:
        if tensor.is_cpu():
            return torch.from_numpy(np.array(tensor.as_numpy()))  # writable: torch warns on read-only memory
        return from_dlpack(tensor.to_dlpack())

    def concat(self, arrays: list[Any]) -> torch.Tensor:
        if not any(a.is_cuda for a in arrays):  # join on the host: one host-to-device copy per batch
            return torch.from_numpy(np.concatenate([a.numpy() for a in arrays]))
        return torch.cat([a.to(self.device) for a in arrays])

    def output_tensor(self, name: str, value: torch.Tensor) -> Any:
        if value.is_cuda:
            return pb_utils.Tensor.from_dlpack(name, to_dlpack(value.contiguous()))
        return pb_utils.Tensor(name, np.ascontiguousarray(value.numpy(), dtype=np.float32))


class TorchEngineModel(TorchTensorsModel):
    """TritonPythonModel for `image_encoder`, `text_encoder` and `fusion` of the `torch` target."""

    def initialize(self, args: dict[str, Any]) -> None:
        cfg = json.loads(args["model_config"])
        params = parameters(cfg)
        ckpt_dir = version_dir(args) / "checkpoint"
        if not (ckpt_dir / "model.safetensors").exists():
            raise FileNotFoundError(f"{ckpt_dir}/model.safetensors is missing: run `vtfuse export all --target torch`")
        torch.set_num_threads(int(params.get("torch_threads", "1")))
        self.device = instance_device(args)
        settings = EngineSettings(
            autocast=params.get("autocast", "fp16"),
            mode=params.get("mode", "cuda_graphs"),
            max_batch=int(cfg.get("max_batch_size", 0)) or 1,
        )
        model = load_checkpoint(ckpt_dir, with_decoder=False).model  # the towers' weights alone are copied
        role = params.get("role", args["model_name"])
        self.engine = TorchEngine(model, role, self.device, settings)
        self.input_names = [i["name"] for i in cfg["input"]]
        self.output_names = [o["name"] for o in cfg["output"]]
        if self.device != "cpu" and params.get("warm_up", "1") == "1":
            self.engine.warm_up()
        log.info("%s on %s (%s, %s)", args["model_name"], self.device, self.engine.dtype, self.engine.mode)

    def run(self, batch: dict[str, Any], wanted: set[str]) -> list[Any]:
        return self.engine([batch[n] for n in self.input_names], need_attention="CROSS_ATTENTION" in wanted)

    def finalize(self) -> None:
        self.engine = None  # type: ignore[assignment]
