"""Python-backend `preprocess` model: encoded image + text → PIXELS, INPUT_IDS, ATTENTION_MASK.

For direct clients that want engine-ready tensors. A bad image or text fails its own
request with a clear message, never the batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from serving.errors import VtfuseError
from serving.model.preprocess import decode_image, load_tokenizer, tokenize
from serving.triton.python_models.common import installed_config, parameters, version_dir


def as_str(value: object) -> str:
    """A STRING tensor element (bytes) as text."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


class PreprocessModel:
    """TritonPythonModel for `preprocess`."""

    def initialize(self, args: dict[str, Any]) -> None:
        import json

        self.cfg = installed_config(args)
        self.tokenizer = load_tokenizer(version_dir(args) / "checkpoint" / "tokenizer.json")
        self.max_pixels = int(parameters(json.loads(args["model_config"])).get("max_pixels", str(4096 * 4096)))

    def _one(self, req: Any) -> Any:
        images = pb_utils.get_input_tensor_by_name(req, "IMAGE").as_numpy().reshape(-1)
        texts = [as_str(t) for t in pb_utils.get_input_tensor_by_name(req, "TEXT").as_numpy().reshape(-1)]
        pixels = np.stack([decode_image(bytes(b), self.cfg.image_size, self.max_pixels) for b in images])
        ids, mask = tokenize(self.tokenizer, texts, self.cfg.max_text_len)
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("PIXELS", pixels),
                pb_utils.Tensor("INPUT_IDS", ids),
                pb_utils.Tensor("ATTENTION_MASK", mask),
            ]
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for req in requests:
            try:
                responses.append(self._one(req))
            except VtfuseError as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{e.code}: {e.message}")))
        return responses
