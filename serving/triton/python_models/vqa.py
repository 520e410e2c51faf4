"""Python-backend BLS model `vqa`: IMAGE + QUESTION bytes → ANSWER + SCORE for direct clients.

It has its own dynamic batching. Each batch of requests is decoded and tokenized here
(in-process, sparing an IPC round trip per request through `preprocess`), then sent as
ONE request per engine: `image_encoder` and `text_encoder` concurrently, then `fusion`.
The engines batch these again across `vqa` instances. Engine outputs that only feed the next
engine are passed on as they came back (on the GPU when the engines run there); the logits,
read here with numpy, are asked for in CPU memory. Every answer comes from the model's
VQA head; a request whose image or question is bad gets its own error, the rest proceed.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from serving.errors import VtfuseError
from serving.model.preprocess import decode_image, load_tokenizer, tokenize
from serving.triton.python_models.common import installed_answers, installed_config, parameters, version_dir
from serving.triton.python_models.preprocess import as_str


def invalid(message: str) -> Any:
    """A per-request INVALID_ARG error (HTTP 400 / gRPC INVALID_ARGUMENT at the client)."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    err = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(error=err)


def cpu_memory() -> Any:
    """Ask a BLS call for outputs in CPU memory (None on a Python backend without the option)."""
    preferred = getattr(pb_utils, "PreferredMemory", None)
    kind = getattr(pb_utils, "TRITONSERVER_MEMORY_CPU", None)
    return None if preferred is None or kind is None else preferred(kind, 0)


def to_numpy(tensor: Any) -> np.ndarray:
    """A BLS output as numpy, wherever it lives (GPU memory goes through DLPack and PyTorch)."""
    if tensor.is_cpu():
        return tensor.as_numpy()
    from torch.utils.dlpack import from_dlpack  # only GPU engines hand back GPU memory, and they bring torch

    return from_dlpack(tensor.to_dlpack()).cpu().numpy()


async def infer(model: str, inputs: list[Any], outputs: list[str], *, on_cpu: bool) -> dict[str, Any]:
    """One BLS call; its outputs as Triton tensors, left where the engine put them unless `on_cpu`.

    Outputs that only go on to the next engine stay on its device (no GPU → CPU → GPU round
    trip when the engines run on a GPU); outputs read here with numpy ask for CPU memory.
    """
    kwargs = {"preferred_memory": cpu_memory()} if on_cpu and cpu_memory() is not None else {}
    req = pb_utils.InferenceRequest(model_name=model, inputs=inputs, requested_output_names=outputs, **kwargs)
    r = await req.async_exec()
    if r.has_error():
        raise RuntimeError(f"{model}: {r.error().message()}")
    return {o: pb_utils.get_output_tensor_by_name(r, o) for o in outputs}


async def vqa_logits(pixels: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """image_encoder and text_encoder concurrently, then fusion on their outputs → VQA logits (numpy)."""
    img, txt = await asyncio.gather(
        infer(  # both outputs: Triton's response cache keys image_encoder by the pixels alone
            "image_encoder", [pb_utils.Tensor("PIXELS", pixels)], ["IMAGE_FEATURES", "IMAGE_EMBEDDING"], on_cpu=False
        ),
        infer(
            "text_encoder",
            [pb_utils.Tensor("INPUT_IDS", ids), pb_utils.Tensor("ATTENTION_MASK", mask)],
            ["TEXT_FEATURES"],
            on_cpu=False,
        ),
    )
    # The feature tensors are handed on as they came back (same names as fusion's inputs).
    fused = await infer(
        "fusion",
        [img["IMAGE_FEATURES"], txt["TEXT_FEATURES"], pb_utils.Tensor("ATTENTION_MASK", mask)],
        ["VQA_LOGITS"],
        on_cpu=True,
    )
    return to_numpy(fused["VQA_LOGITS"])


class VqaModel:
    """TritonPythonModel for `vqa`."""

    def initialize(self, args: dict[str, Any]) -> None:
        self.cfg = installed_config(args)
        self.answers = np.array(installed_answers(args), dtype=object)
        self.tokenizer = load_tokenizer(version_dir(args) / "checkpoint" / "tokenizer.json")
        params = parameters(json.loads(args["model_config"]))
        self.max_pixels = int(params.get("max_pixels", str(4096 * 4096)))
        self.engine_max_batch = int(params.get("engine_max_batch", "64"))

    def _decode(self, req: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image_t = pb_utils.get_input_tensor_by_name(req, "IMAGE")
        question_t = pb_utils.get_input_tensor_by_name(req, "QUESTION")
        if image_t is None or question_t is None:
            raise VtfuseError("vqa needs both IMAGE and QUESTION inputs")
        images = image_t.as_numpy().reshape(-1)
        questions = [as_str(q) for q in question_t.as_numpy().reshape(-1)]
        if len(images) != len(questions):
            raise VtfuseError(f"{len(images)} images but {len(questions)} questions: send one of each per row")
        pixels = np.stack([decode_image(bytes(b), self.cfg.image_size, self.max_pixels) for b in images])
        ids, mask = tokenize(self.tokenizer, questions, self.cfg.max_text_len)
        return pixels, ids, mask

    async def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        good: list[tuple[int, int]] = []  # (request index, rows)
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for i, req in enumerate(requests):
            try:
                p = self._decode(req)
            except VtfuseError as e:
                responses[i] = invalid(f"{e.code}: {e.message}" if e.code != "internal" else e.message)
                continue
            good.append((i, p[0].shape[0]))
            parts.append(p)
        if parts:
            pixels, ids, mask = (np.concatenate([p[k] for p in parts]) for k in range(3))
            # One pipeline per chunk of at most engine_max_batch rows, all chunks concurrently.
            step = self.engine_max_batch
            try:
                chunks = await asyncio.gather(
                    *(
                        vqa_logits(pixels[s : s + step], ids[s : s + step], mask[s : s + step])
                        for s in range(0, len(ids), step)
                    )
                )
            except RuntimeError as e:
                for i, _ in good:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
                return responses
            logits = np.concatenate(chunks).astype(np.float64)
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            best = probs.argmax(axis=1)
            start = 0
            for i, n in good:
                sl = slice(start, start + n)
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("ANSWER", self.answers[best[sl]].reshape(n, 1)),
                        pb_utils.Tensor("SCORE", probs[sl][np.arange(n), best[sl]].astype(np.float32).reshape(n, 1)),
                    ]
                )
                start += n
        return responses
