"""Python-backend engine models: one exported engine on a dynamic batch (ONNX Runtime here; PyTorch in torch_engine.py).

Triton's dynamic batcher hands `execute` several requests; their inputs are concatenated
on the batch axis, run in one session call, and the outputs split back per request.
Triton itself has already checked each request's names, dtypes and shapes against
config.pbtxt, so a malformed request never reaches a batch. A request whose *values* the
engine cannot take (token ids outside the vocabulary, say) would fail the whole session
call: then each request of the batch runs alone, and only the bad one gets an error.
"""

from __future__ import annotations

import abc
import json
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import triton_python_backend_utils as pb_utils

from serving.triton.python_models.common import parameters, version_dir

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)


def make_session(path: str, intra_threads: int, inter_threads: int = 1, spinning: bool = False) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with full graph optimisation and bounded thread pools.

    Spinning is off by default: several engine processes share the cores, and idle threads
    that spin steal them from the engine that has work (measured: tiny at batch 32 went
    from 344 to 787 items/s with spinning off, loadtests/results/levers.json).
    """
    import onnxruntime as ort  # here, not at the top: the PyTorch engine models share this module without it

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = intra_threads
    so.inter_op_num_threads = inter_threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])


class BatchedEngineModel(abc.ABC):
    """The batching half of an engine model: group requests by shape, run each group as one batch.

    Subclasses say how to read an input tensor, join and run a batch, and hand an output back.
    """

    input_names: list[str]
    output_names: list[str]

    def read(self, tensor: Any) -> Any:
        """A request's input tensor as the array the engine takes."""
        return tensor.as_numpy()

    def concat(self, arrays: list[Any]) -> Any:
        return np.concatenate(arrays)

    @abc.abstractmethod
    def run(self, batch: dict[str, Any], wanted: set[str]) -> list[Any]:
        """The engine on one batch: every output in `output_names` order (None allowed for one nobody wants)."""

    @abc.abstractmethod
    def output_tensor(self, name: str, value: Any) -> Any:
        """One request's slice of an output as a Triton tensor."""

    def execute(self, requests: list[Any]) -> list[Any]:
        feeds = [
            {n: self.read(pb_utils.get_input_tensor_by_name(req, n)) for n in self.input_names} for req in requests
        ]
        # Engines with variable axes (an imported model's token length or image size): Triton
        # may hand over requests of different shapes; each shape group runs as one batch.
        groups: dict[tuple, list[int]] = {}
        for i, feed in enumerate(feeds):
            groups.setdefault(tuple(tuple(feed[n].shape[1:]) for n in self.input_names), []).append(i)
        responses: list[Any] = [None] * len(requests)
        for idx in groups.values():
            for i, resp in zip(idx, self._run_batch([requests[i] for i in idx], [feeds[i] for i in idx])):
                responses[i] = resp
        return responses

    @staticmethod
    def _wanted(req: Any, all_names: list[str]) -> set[str]:
        return set(req.requested_output_names()) or set(all_names)

    def _run_batch(self, requests: list[Any], feeds: list[dict[str, Any]]) -> list[Any]:
        sizes = [f[self.input_names[0]].shape[0] for f in feeds]
        batch = {n: self.concat([f[n] for f in feeds]) if len(feeds) > 1 else feeds[0][n] for n in self.input_names}
        wanted = set().union(*(self._wanted(r, self.output_names) for r in requests))
        try:
            outs = self.run(batch, wanted)
        except Exception as e:
            if len(requests) == 1:
                return [self._error(e)]
            # Some request's values broke the batch: run each alone so only that one fails.
            log.warning("a batch of %d failed (%s): running its requests one by one", len(requests), e)
            return [self._alone(req, feed) for req, feed in zip(requests, feeds)]
        responses, start = [], 0
        for req, n in zip(requests, sizes):
            responses.append(self._response(req, [None if o is None else o[start : start + n] for o in outs]))
            start += n
        return responses

    def _response(self, req: Any, outs: list[Any]) -> Any:
        wanted = self._wanted(req, self.output_names)
        tensors = [
            self.output_tensor(name, out)
            for name, out in zip(self.output_names, outs)
            if name in wanted and out is not None
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _alone(self, req: Any, feed: dict[str, Any]) -> Any:
        try:
            return self._response(req, self.run(feed, self._wanted(req, self.output_names)))
        except Exception as e:
            return self._error(e)

    @staticmethod
    def _error(e: Exception) -> Any:
        """A per-request INVALID_ARG error: the engine could not take this request's values."""
        code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
        msg = f"the engine refused this request's values: {e}"[:1000]
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError(msg, code) if code is not None else pb_utils.TritonError(msg)
        )


class OnnxEngineModel(BatchedEngineModel):
    """TritonPythonModel for `image_encoder`, `text_encoder` and `fusion` on the embedded server."""

    def initialize(self, args: dict[str, Any]) -> None:
        cfg = json.loads(args["model_config"])
        params = parameters(cfg)
        path = version_dir(args) / params.get("onnx_file", "model.onnx")
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `vtfuse export all --target embedded` first")
        self.session = make_session(
            str(path),
            int(params.get("intra_op_threads", "1")),
            spinning=params.get("allow_spinning", "0") == "1",
        )
        self.input_names = [i["name"] for i in cfg["input"]]
        self.output_names = [o["name"] for o in cfg["output"]]
        self.output_dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in cfg["output"]}

    def run(self, batch: dict[str, Any], wanted: set[str]) -> list[Any]:
        return self.session.run(self.output_names, batch)

    def output_tensor(self, name: str, value: Any) -> Any:
        return pb_utils.Tensor(name, np.ascontiguousarray(value, dtype=self.output_dtypes[name]))

    def finalize(self) -> None:
        self.session = None
