"""Python-backend BLS model `NAME_itm` of an imported BLIP retrieval model: one image's features against N texts.

BLIP's ITM pass takes the image's features with every text (the `fusion` engine batches rows of
image features + token ids). Sent from the API, one image × 64 texts would carry the image's
features 64 times (1.8 MB each at BLIP-base). This model takes the image once, as PIXELS (it runs
`NAME_image_encoder` itself, through BLS: its dynamic batching and response cache apply) or as
IMAGE_FEATURES (one row, when the API already has them), repeats the features inside Triton and
runs `NAME_fusion` on the rows in requests of at most the fusion's max_batch_size, concurrently.

Inputs: PIXELS uint8 (1, H, W, 3) or IMAGE_FEATURES float32 (1, T, D); INPUT_IDS, ATTENTION_MASK
int64 (N, L). Output: ITM_LOGITS float32 (N, 2). Parameters: `image_encoder`, `fusion` (Triton
model names), `fusion_max_batch`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from serving.triton.python_models.common import parameters
from serving.triton.python_models.vqa import invalid, to_numpy


class ItmBroadcastModel:
    """TritonPythonModel: image once, texts N times → the fusion engine's ITM logits per text."""

    def initialize(self, args: dict[str, Any]) -> None:
        params = parameters(json.loads(args["model_config"]))
        self.image_encoder = params["image_encoder"]
        self.fusion = params["fusion"]
        self.max_batch = int(params.get("fusion_max_batch", "64"))

    async def _bls(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> np.ndarray:
        """One BLS call; the first output asked for, as numpy."""
        request = pb_utils.InferenceRequest(
            model_name=model, inputs=[pb_utils.Tensor(k, v) for k, v in inputs.items()],
            requested_output_names=outputs,
        )
        response = await request.async_exec()
        if response.has_error():
            raise ValueError(f"{model}: {response.error().message()}")
        return to_numpy(pb_utils.get_output_tensor_by_name(response, outputs[0]))

    async def _one(self, request: Any) -> Any:
        def read(name: str) -> np.ndarray | None:
            t = pb_utils.get_input_tensor_by_name(request, name)
            return None if t is None else t.as_numpy()

        ids, mask = read("INPUT_IDS"), read("ATTENTION_MASK")
        if ids is None or mask is None or ids.shape != mask.shape or ids.ndim != 2:
            return invalid("send INPUT_IDS and ATTENTION_MASK of one shape (texts, tokens)")
        feats = read("IMAGE_FEATURES")
        try:
            if feats is None:
                pixels = read("PIXELS")
                if pixels is None or pixels.shape[0] != 1:
                    return invalid("send one image: PIXELS (1, H, W, 3) or IMAGE_FEATURES (1, T, D)")
                # Both outputs, as every caller asks: the response cache keys the image encoder by its inputs alone.
                feats = await self._bls(self.image_encoder, {"PIXELS": pixels}, ["IMAGE_FEATURES", "IMAGE_EMBEDDING"])
            if feats.shape[0] != 1:
                return invalid(f"IMAGE_FEATURES holds {feats.shape[0]} images: send one")
            n = ids.shape[0]
            parts = [slice(i, min(n, i + self.max_batch)) for i in range(0, n, self.max_batch)]
            outs = await asyncio.gather(*(
                self._bls(self.fusion, {
                    "IMAGE_FEATURES": np.repeat(feats, s.stop - s.start, axis=0),
                    "INPUT_IDS": np.ascontiguousarray(ids[s]), "ATTENTION_MASK": np.ascontiguousarray(mask[s]),
                }, ["ITM_LOGITS"])
                for s in parts
            ))
        except ValueError as e:
            return invalid(str(e))
        logits = np.concatenate(outs).astype(np.float32)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("ITM_LOGITS", logits)])

    async def execute(self, requests: list[Any]) -> list[Any]:
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    def finalize(self) -> None:
        pass
