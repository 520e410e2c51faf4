"""Streaming from a generation model straight from Triton with `tritonclient`'s streaming API (for direct clients).

The decoupled generate models (`caption` for tiny, `NAME_generate` for an imported BLIP) answer over
Triton's gRPC stream: one response per token with `"stream": true` in PARAMETERS, then a final one
holding the whole result. Direct clients send the encoded image file and the prompt as text; the model
resizes and tokenizes them itself.

    from serving.triton.generate_client import stream_caption

    for event in stream_caption("127.0.0.1:8001", "caption", open("scene.png", "rb").read(),
                                params={"max_new_tokens": 12}):
        print(event["delta"], end="", flush=True)   # the last event also has "text", "token_ids", …

It needs only `tritonclient[grpc]` and NumPy.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from typing import Any

import numpy as np


def _inputs(image: bytes, prompt: str | list[str] | None, params: dict[str, Any]) -> list[Any]:
    import tritonclient.grpc as grpcclient

    def text(name: str, values: list[str | bytes]) -> Any:
        arr = np.array([v if isinstance(v, bytes) else v.encode() for v in values], dtype=np.object_)
        t = grpcclient.InferInput(name, list(arr.shape), "BYTES")
        t.set_data_from_numpy(arr)
        return t

    inputs = [text("IMAGE", [image]), text("PARAMETERS", [json.dumps(params)])]
    if prompt is not None:
        inputs.append(text("PROMPT", [prompt] if isinstance(prompt, str) else list(prompt)))
    return inputs


def stream_caption(
    url: str, model: str, image: bytes, prompt: str | None = None, params: dict[str, Any] | None = None,
    timeout_s: float = 120.0,
) -> Iterator[dict[str, Any]]:
    """Each token as it is generated (`{"token_id", "delta"}`), then `{"delta": "", "text", "token_ids", …}`.

    Raises:
        RuntimeError: the model refused the request (its message: `vtfuse:<code>: …`).
    """
    import tritonclient.grpc as grpcclient

    events: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    try:
        client.async_stream_infer(model, _inputs(image, prompt, {**(params or {}), "stream": True}),
                                  enable_empty_final_response=True)
        while True:
            result, error = events.get(timeout=timeout_s)
            if error is not None:
                raise RuntimeError(str(error))
            response = result.get_response()
            final = response.parameters["triton_final_response"].bool_param
            if not response.outputs:  # an empty final flag: nothing more
                return
            reason = result.as_numpy("FINISH_REASON")[0].decode()
            if reason:
                yield {"delta": "", "text": result.as_numpy("TEXT")[0].decode(),
                       "token_ids": [int(t) for t in result.as_numpy("TOKEN_IDS")[0] if t >= 0],
                       "finish_reason": reason, "score": float(result.as_numpy("SCORE")[0])}
            else:
                yield {"token_id": int(result.as_numpy("TOKEN_IDS")[0, 0]),
                       "delta": result.as_numpy("TEXT")[0].decode()}
            if final:
                return
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
