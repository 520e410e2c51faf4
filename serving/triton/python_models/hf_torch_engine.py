"""Python-backend engine model of an imported checkpoint's `torch` target (export/hf/torch_engine.py).

`vtfuse import-hf SOURCE --name NAME --target torch` installs one such model per engine
(`NAME_image_encoder`, ...): the family's PyTorch module over the checkpoint's weights, which
sit in the version folder's `checkpoint/`. An instance on a GPU runs under the `autocast`
precision (FP16 by default), eagerly or compiled (`mode`); anywhere else it runs on the CPU in
FP32. Requests of different shapes (token lengths, ViLT's image sides) run as separate batches.

Config parameters: `role` (the engine), `autocast` (fp16 | bf16 | fp32), `mode` (eager |
compile), `torch_threads` (CPU intra-op threads).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from serving.families.torch_engine import HfTorchEngine, load_graphs
from serving.triton.python_models.common import parameters, version_dir
from serving.triton.python_models.torch_engine import TorchTensorsModel, instance_device

log = logging.getLogger(__name__)


class HfTorchEngineModel(TorchTensorsModel):
    """TritonPythonModel for one engine of an imported model, run by PyTorch."""

    def initialize(self, args: dict[str, Any]) -> None:
        cfg = json.loads(args["model_config"])
        params = parameters(cfg)
        torch.set_num_threads(int(params.get("torch_threads", "1")))
        self.device = instance_device(args)
        graph = load_graphs(version_dir(args) / "checkpoint")[params["role"]]
        self.engine = HfTorchEngine(graph, self.device, autocast=params.get("autocast", "fp16"),
                                    mode=params.get("mode", "eager"))
        self.input_names = [i["name"] for i in cfg["input"]]
        self.output_names = [o["name"] for o in cfg["output"]]
        log.info("%s on %s (%s, %s)", args["model_name"], self.device, self.engine.dtype, self.engine.mode)

    def run(self, batch: dict[str, Any], wanted: set[str]) -> list[Any]:
        outs = dict(zip(self.engine.output_names, self.engine([batch[n] for n in self.engine.input_names])))
        return [outs[n] for n in self.output_names]

    def finalize(self) -> None:
        self.engine = None  # type: ignore[assignment]
