"""Imported models learnt from Triton's `vtfuse_catalog` when this replica does not share the repository's files.

`vtfuse serve` runs the API next to the repository: imported models are read from its folder.
On Kubernetes the Ray pods do not hold the Triton pods' repository, so a name a request uses
that is not known yet (and `GET /v1/models`) makes the replica ask Triton's `vtfuse_catalog`
model for every imported model's record and tokenizer, at most once per `min_interval_s`.
Anything that goes wrong (no such model on an older repository, Triton not up yet) leaves the
known models as they are: the request then gets its usual 422 `unknown_model`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import Any

import numpy as np

from serving.families.imported import ImportRecord, from_catalog
from serving.triton.client import TritonClientSettings, channel_credentials

log = logging.getLogger(__name__)

CATALOG_MODEL = "vtfuse_catalog"


def fetch_catalog(settings: TritonClientSettings, timeout_s: float = 5.0) -> dict[str, Any]:
    """The `vtfuse_catalog` answer of the Triton at `settings.url` (gRPC, TLS as the API's own channels)."""
    import tritonclient.grpc as grpcclient

    args = [("grpc.ssl_target_name_override", settings.tls_server_name)] if settings.tls_server_name else None
    client = grpcclient.InferenceServerClient(settings.url, creds=channel_credentials(settings), channel_args=args)
    try:
        query = grpcclient.InferInput("QUERY", [1], "BYTES")
        query.set_data_from_numpy(np.array([b""], dtype=np.object_))
        out = client.infer(
            CATALOG_MODEL, [query], outputs=[grpcclient.InferRequestedOutput("CATALOG")], client_timeout=timeout_s
        )
        raw = out.as_numpy("CATALOG").reshape(-1)[0]
        return dict(json.loads(raw.decode() if isinstance(raw, bytes) else raw))
    finally:
        client.close()


class ImportedCatalog:
    """Adds imported models Triton knows to a replica's runtimes, rate-limited, thread-safe."""

    def __init__(
        self,
        settings: TritonClientSettings,
        make_runtime: Callable[[ImportRecord, Any], Any],
        min_interval_s: float = 5.0,
        fetch: Callable[[TritonClientSettings], dict[str, Any]] = fetch_catalog,
    ) -> None:
        self.settings = settings
        self.make_runtime = make_runtime
        self.min_interval_s = min_interval_s
        self.fetch = fetch
        self._last = float("-inf")
        self._lock = threading.Lock()

    def refresh(self, runtimes: MutableMapping[str, Any]) -> list[str]:
        """Ask Triton (unless asked less than `min_interval_s` ago); add the models `runtimes` lacks. Returns them."""
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.min_interval_s:
                return []
            self._last = now
            try:
                entries = self.fetch(self.settings).get("models", {})
            except Exception as e:  # older repository, Triton not up yet, ...
                log.info("imported models from Triton's %s: none learnt (%s)", CATALOG_MODEL, e)
                return []
            added = []
            for name, entry in entries.items():
                if name in runtimes:
                    continue
                record, tokenizer = from_catalog(entry)
                runtimes[name] = self.make_runtime(record, tokenizer)
                added.append(name)
            if added:
                log.info("imported models learnt from Triton's %s: %s", CATALOG_MODEL, ", ".join(added))
            return added
