"""Python-backend BLS model `vqa`: IMAGE + QUESTION bytes → ANSWER + SCORE for direct clients.

It has its own dynamic batching. Each batch of requests is decoded and tokenized here
(in-process, sparing an IPC round trip per request through `preprocess`), then sent as
ONE request per engine: `image_encoder` and `text_encoder` concurrently, then `fusion`.
The engines batch these again across `vqa` instances. Every answer comes from the model's
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


async def infer(model: str, inputs: list[Any], outputs: list[str], max_batch: int) -> dict[str, np.ndarray]:
    """One BLS call per chunk of at most `max_batch` rows; outputs concatenated."""
    n = inputs[0].as_numpy().shape[0]
    chunks = []
    for s in range(0, n, max_batch):
        part = [pb_utils.Tensor(t.name(), t.as_numpy()[s : s + max_batch]) for t in inputs]
        req = pb_utils.InferenceRequest(model_name=model, inputs=part, requested_output_names=outputs)
        chunks.append(req.async_exec())
    results = await asyncio.gather(*chunks)
    out: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
    for r in results:
        if r.has_error():
            raise RuntimeError(f"{model}: {r.error().message()}")
        for o in outputs:
            out[o].append(pb_utils.get_output_tensor_by_name(r, o).as_numpy())
    return {o: np.concatenate(v) for o, v in out.items()}


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
            try:
                img, txt = await asyncio.gather(
                    infer(  # both outputs: Triton's response cache keys image_encoder by the pixels alone
                        "image_encoder",
                        [pb_utils.Tensor("PIXELS", pixels)],
                        ["IMAGE_FEATURES", "IMAGE_EMBEDDING"],
                        self.engine_max_batch,
                    ),
                    infer(
                        "text_encoder",
                        [pb_utils.Tensor("INPUT_IDS", ids), pb_utils.Tensor("ATTENTION_MASK", mask)],
                        ["TEXT_FEATURES"],
                        self.engine_max_batch,
                    ),
                )
                fused = await infer(
                    "fusion",
                    [
                        pb_utils.Tensor("IMAGE_FEATURES", img["IMAGE_FEATURES"]),
                        pb_utils.Tensor("TEXT_FEATURES", txt["TEXT_FEATURES"]),
                        pb_utils.Tensor("ATTENTION_MASK", mask),
                    ],
                    ["VQA_LOGITS"],
                    self.engine_max_batch,
                )
            except RuntimeError as e:
                for i, _ in good:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
                return responses
            logits = fused["VQA_LOGITS"].astype(np.float64)
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
