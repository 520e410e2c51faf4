"""The Triton generate model of a generative model: its config.pbtxt and its version folder.

One decoupled Python-backend model per generative model (`NAME_generate` for an imported BLIP,
`caption` for tiny) runs `serving/triton/python_models/generate.py`: the decode scheduler over the
two decoder graphs (`cross_kv.onnx`, `decoder_step.onnx`, with `decoder.json`) in its version
folder; `checkpoint/` holds `generation.json` and the tokenizer. Its tensors are described in that
module's doc; they are the same for every generative model, so one function writes every config.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from serving.generation.engine import CROSS_KV_FILE, DECODER_STEP_FILE, DecoderShape, write_shape
from serving.generation.spec import GenerationSpec, write_spec

MODEL_PY = (
    '"""Triton Python model: the decode scheduler (serving/triton/python_models/generate.py)."""\n\n'
    "from serving.triton.python_models.generate import GenerateModel as TritonPythonModel  # noqa: F401\n"
)
# Inputs: (name, type, dims); every one optional (the model says which it needs).
INPUTS = (
    ("PIXELS", "TYPE_UINT8", (-1, -1, 3)),
    ("IMAGE", "TYPE_STRING", (1,)),
    ("PROMPT_IDS", "TYPE_INT64", (-1, -1)),
    ("PROMPT_MASK", "TYPE_INT64", (-1, -1)),
    ("PROMPT", "TYPE_STRING", (-1,)),
    ("PARAMETERS", "TYPE_STRING", (1,)),
)
OUTPUTS = (
    ("TOKEN_IDS", "TYPE_INT64", (-1, -1)),
    ("TEXT", "TYPE_STRING", (-1,)),
    ("FINISH_REASON", "TYPE_STRING", (-1,)),
    ("SCORE", "TYPE_FP32", (-1,)),
    ("PROMPT_TOKENS", "TYPE_INT64", (-1,)),
)
# Scheduler settings (config.pbtxt parameters the model reads). 32 rows: BLIP-base captioning at
# concurrency 16-32 on 2 cores; the budget bounds the K/V caches (cross K/V of 577 image tokens is
# ~40 MiB per BLIP-base row in fp32), past it sequences wait; a full queue is a 429.
SCHEDULER_PARAMETERS = {
    "max_rows": "32",
    "memory_budget_mb": "1536",
    "max_waiting": "256",
    "prepare_workers": "4",
    "max_pixels": "16777216",
}


def generate_config(name: str, target: str = "embedded", threads: int = 2) -> mc.ModelConfig:
    """config.pbtxt of a generate model: decoupled, no Triton batching (the model batches itself)."""
    c = mc.ModelConfig(name=name, backend="python", max_batch_size=0)
    c.model_transaction_policy.decoupled = True
    for n, t, dims in INPUTS:
        c.input.append(mc.ModelInput(name=n, data_type=mc.DataType.Value(t), dims=list(dims), optional=True))
    for n, t, dims in OUTPUTS:
        c.output.append(mc.ModelOutput(name=n, data_type=mc.DataType.Value(t), dims=list(dims)))
    group = c.instance_group.add()
    group.count = 1
    group.kind = mc.ModelInstanceGroup.KIND_AUTO if target == "torch" else mc.ModelInstanceGroup.KIND_CPU
    params = dict(SCHEDULER_PARAMETERS)
    if target == "torch":
        params.update(engine="torch", autocast="fp16", torch_threads=str(threads))
    else:
        params.update(engine="onnx", intra_op_threads=str(threads))
    for k, v in params.items():
        c.parameters[k].string_value = v
    return c


def write_version_folder(vdir: Path, cross_kv: Path | None, decoder_step: Path | None, shape: DecoderShape,
                         spec: GenerationSpec, tokenizer_json: Path) -> None:
    """`<model>/<version>/`: the decoder graphs (none for the torch target), decoder.json, model.py, checkpoint/."""
    (vdir / "checkpoint").mkdir(parents=True, exist_ok=True)
    if cross_kv is not None and decoder_step is not None:
        shutil.copyfile(cross_kv, vdir / CROSS_KV_FILE)
        shutil.copyfile(decoder_step, vdir / DECODER_STEP_FILE)
    write_shape(vdir, shape)
    (vdir / "model.py").write_text(MODEL_PY)
    write_spec(vdir / "checkpoint", spec)
    shutil.copyfile(tokenizer_json, vdir / "checkpoint" / "tokenizer.json")
