"""The `libtorch` target: TorchScript engines for the NGC container's native PyTorch backend.

The same graphs the ONNX files come from (export/onnx_export.GRAPHS) are traced with
`torch.jit.trace` at one batch size and gated on fp32 parity against ONNX Runtime at another
(the batch axis must not have been frozen by the trace). This is the PyTorch engine without the
Python backend: Triton's `pytorch_libtorch` backend runs `model.pt` in C++ and keeps tensors in
the server. The embedded `tritonserver` here has no PyTorch backend, so only the NGC container
(or any Triton built with it) serves this target.

Triton's PyTorch backend binds a TorchScript model's tensors by position, and its outputs must be
named `<name>__<index>`. So each engine is installed as `<engine>_libtorch` (tensors `PIXELS__0`,
`IMAGE_FEATURES__0`, `IMAGE_EMBEDDING__1`, ...) behind a one-step ensemble named `<engine>` that maps
them back to the tensor contract (`PIXELS`, `IMAGE_FEATURES`, ...): `vqa`, the Serve layer and
direct clients call the same names on every target. Dynamic batching runs in `<engine>_libtorch`;
the response cache, where the committed config enables it, on the ensemble. The configs are
export/render_repo.py's (`libtorch_config`, `engine_ensemble_config`); this module makes and
checks the files.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.check import FP32_TOLERANCE, compare, ort_session, random_inputs, run_session
from export.errors import ParityError
from export.onnx_export import GRAPHS, ExportSettings, example_inputs
from serving.model.checkpoint import Checkpoint
from serving.model.io_spec import ENGINES, engine_specs

log = logging.getLogger(__name__)

LIBTORCH_DIR = "libtorch"  # under the stage-1 folder, beside int8/
PARITY_BATCH = 5  # not ExportSettings.example_batch: a frozen batch axis fails here


def trace_engine(ckpt: Checkpoint, engine: str, path: Path) -> Path:
    """`torch.jit.trace` of one engine's graph (CPU, fp32) saved to `path`."""
    spec = engine_specs(ckpt.config)[engine]
    graph = GRAPHS[engine](ckpt.model.cpu()).eval()
    args = example_inputs(spec, ExportSettings().example_batch)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns that unpacking a (2, B, nh, S, hs) tensor into k, v "might" be shape
        # dependent: it is not (always 2). The parity check below runs another batch size.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(graph, args, check_trace=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    traced.save(str(path))
    return path


def check_parity(ckpt: Checkpoint, traced: dict[str, Path], onnx_dir: Path, seed: int = 0) -> dict[str, Any]:
    """Each traced engine, loaded back as Triton loads it, against ONNX Runtime's fp32 engine.

    Raises:
        ParityError: an output is out of the fp32 tolerance (its `figures` hold the report).
    """
    rng = np.random.default_rng(seed)
    engines: dict[str, Any] = {}
    for engine, path in traced.items():
        spec = engine_specs(ckpt.config)[engine]
        feeds = random_inputs(spec, ckpt.config, PARITY_BATCH, rng)
        ref = run_session(ort_session(onnx_dir / f"{engine}.onnx"), feeds)
        module = torch.jit.load(str(path), map_location="cpu").eval()
        with torch.no_grad():
            outs = module(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs))
        engines[engine] = {t.name: compare(ref[t.name], o.numpy(), FP32_TOLERANCE) for t, o in zip(spec.outputs, outs)}
    report = {"torch": torch.__version__, "batch": PARITY_BATCH, "seed": seed, "tolerance": asdict(FP32_TOLERANCE),
              "engines": engines}
    bad = [(e, o, f) for e, outs in engines.items() for o, f in outs.items() if not f["ok"]]
    report["ok"] = not bad
    if bad:
        raise ParityError(
            "the TorchScript engines differ from ONNX Runtime: "
            + "; ".join(f"{e}.{o}: max_abs {f['max_abs']:.3g}, max_rel {f['max_rel']:.3g}" for e, o, f in bad),
            engine=bad[0][0], output=bad[0][1], figures=report,
        )
    log.info("TorchScript engines match ONNX Runtime at batch %d", PARITY_BATCH)
    return report


def build_engines(ckpt: Checkpoint, onnx_dir: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """Trace the three engines into `onnx_dir/libtorch/` (next to the ONNX files) and check their parity.

    Returns:
        ({engine: traced file}, parity report).
    """
    folder = Path(onnx_dir) / LIBTORCH_DIR
    traced = {e: trace_engine(ckpt, e, folder / f"{e}.pt") for e in ENGINES}
    return traced, check_parity(ckpt, traced, Path(onnx_dir))
