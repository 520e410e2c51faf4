"""Python-backend model `vtfuse_catalog`: the imported models of the repository it is served from, as JSON.

The API needs each imported model's record and tokenizer to route to it. Where the API
replicas read the same repository folder (`vtfuse serve`), they find them there; where they do
not (Kubernetes: Ray pods apart from the Triton pods that hold the repository), they ask this
model. The answer is read from the files at every request, so a model imported later shows up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from serving.families.imported import catalog


class CatalogModel:
    """TritonPythonModel: QUERY (ignored) → CATALOG, one JSON string."""

    def initialize(self, args: dict[str, Any]) -> None:
        self.repository = Path(args["model_repository"]).parent  # <repository>/vtfuse_catalog → <repository>

    def execute(self, requests: list[Any]) -> list[Any]:
        body = json.dumps(catalog(self.repository)).encode()
        out = pb_utils.Tensor("CATALOG", np.array([body], dtype=np.object_))
        return [pb_utils.InferenceResponse(output_tensors=[out]) for _ in requests]

    def finalize(self) -> None:
        pass
