"""In-process ONNX Runtime benchmark of the three engines per batch size: the ceiling the served stack is held to.

An item is one (image, question) through `image_encoder`, `text_encoder` and `fusion`, run in
sequence at batch B with the real intermediate features, as the served path does. Session
options default to those of the served engines (serving/triton/python_models/engine.py:
full graph optimisation, sequential execution, one inter-op thread) with one intra-op
thread per core and thread spinning off (`IN_PROCESS`); `SessionSettings` varies them for
the levers.

    python -m loadtests.engine_bench --repository build/model_repository-small --batches 1 8 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from loadtests.flops import ENGINES, ort_threads, repository_onnx
from serving.model.config import FusionConfig

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class SessionSettings:
    """ONNX Runtime session options varied by the levers (defaults: the served engines' plus threads = cores)."""

    intra_threads: int = 0  # 0: one per core
    inter_threads: int = 1
    opt_level: str = "all"
    mem_arena: bool = True
    spinning: bool = True
    parallel: bool = False
    profile_prefix: str = ""  # set: ONNX Runtime's profiler writes a trace per session with this prefix

    def options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.graph_optimization_level = OPT_LEVELS[self.opt_level]
        so.intra_op_num_threads = self.intra_threads or ort_threads()
        so.inter_op_num_threads = self.inter_threads
        so.execution_mode = ort.ExecutionMode.ORT_PARALLEL if self.parallel else ort.ExecutionMode.ORT_SEQUENTIAL
        so.enable_cpu_mem_arena = self.mem_arena
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        if self.profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = self.profile_prefix
        return so


# The in-process reference: the served options with thread spinning off. Three sessions run back
# to back, and a spinning idle pool of one steals the cores from the next (measured: loadtests/levers.py).
IN_PROCESS = SessionSettings(spinning=False)


def repository_config(repository: str | Path) -> FusionConfig:
    """The preset installed in a repository (fusion/1/checkpoint/config.json)."""
    return FusionConfig.from_json(Path(repository) / "fusion" / "1" / "checkpoint" / "config.json")


# Every output of one item, in the engines' order: image_encoder's, text_encoder's, fusion's.
OUTPUTS = ("IMAGE_FEATURES", "IMAGE_EMBEDDING", "TEXT_FEATURES", "TEXT_EMBEDDING", "VQA_LOGITS", "ITM_LOGIT",
           "CROSS_ATTENTION")


class Engines:
    """The three engine sessions of one preset, run in sequence as one item batch."""

    def __init__(self, paths: dict[str, Path], cfg: FusionConfig, settings: SessionSettings | None = None):
        settings = settings or IN_PROCESS
        self.cfg = cfg
        self.settings = settings
        self.sessions = {
            e: ort.InferenceSession(str(paths[e]), settings.options(), providers=["CPUExecutionProvider"])
            for e in ENGINES
        }

    def inputs(self, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Random pixels and question-length token ids (about a third of max_text_len), batch `batch`."""
        rng = np.random.default_rng(seed)
        c = self.cfg
        pixels = rng.integers(0, 256, (batch, c.image_size, c.image_size, 3), dtype=np.uint8)
        ids = np.zeros((batch, c.max_text_len), dtype=np.int64)
        n = max(3, c.max_text_len // 3)
        ids[:, :n] = rng.integers(4, c.vocab_size, (batch, n))
        mask = (ids != 0).astype(np.int64)
        return pixels, ids, mask

    def run(self, pixels: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """One item batch through the three engines; every output returned."""
        img = self.sessions["image_encoder"].run(None, {"PIXELS": pixels})
        txt = self.sessions["text_encoder"].run(None, {"INPUT_IDS": ids, "ATTENTION_MASK": mask})
        fused = self.sessions["fusion"].run(
            None, {"IMAGE_FEATURES": img[0], "TEXT_FEATURES": txt[0], "ATTENTION_MASK": mask}
        )
        return dict(zip(OUTPUTS, [*img, *txt, *fused]))

    def time_batch(
        self, batch: int, min_time_s: float = 2.0, min_reps: int = 3, warm_up: bool = True
    ) -> dict[str, Any]:
        """Median seconds per item batch over at least `min_reps` runs and `min_time_s` seconds."""
        x = self.inputs(batch)
        if warm_up:
            self.run(*x)  # arena growth, first-run allocations
        times: list[float] = []
        t_end = time.perf_counter() + min_time_s
        while len(times) < min_reps or time.perf_counter() < t_end:
            t = time.perf_counter()
            self.run(*x)
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        return {"batch": batch, "reps": len(times), "ms_per_batch": med * 1e3, "items_per_s": batch / med}


def served_layout(repository: str | Path) -> tuple[int, int]:
    """(instances, intra-op threads) of the repository's `image_encoder`: how Triton runs each engine."""
    from export.render_repo import load_config

    config = load_config(Path(repository) / "image_encoder" / "config.pbtxt")
    threads = config.parameters["intra_op_threads"].string_value if "intra_op_threads" in config.parameters else "0"
    return config.instance_group[0].count, int(threads)


def repository_precision(repository: str | Path) -> str:
    """`fp32` or `int8`: the engines a repository serves (its manifest; fp32 before precisions were recorded)."""
    manifest = Path(repository) / "fusion" / "1" / "manifest.json"
    return str(json.loads(manifest.read_text()).get("precision", "fp32")) if manifest.exists() else "fp32"


def sweep(
    repository: str | Path,
    batches: tuple[int, ...] = (1, 4, 8, 16, 32, 64),
    settings: SessionSettings = IN_PROCESS,
    min_time_s: float = 2.0,
    passes: int = 3,
    streams: int = 1,
) -> dict[str, Any]:
    """Items/s per batch size of a repository's engines; `best` is the batch with the most items/s."""
    res = sweep_paths(repository_onnx(repository), repository_config(repository), batches, settings, min_time_s, passes,
                      streams)
    return res | {"repository": str(repository), "precision": repository_precision(repository)}


def time_streams(engines: list[Engines], batch: int, min_time_s: float, warm_up: bool = True) -> dict[str, Any]:
    """Items/s of several engine sets each running batches back to back in its own thread, over one window.

    ONNX Runtime releases the GIL while a session runs, so N sets of 1 thread each run as Triton's
    N engine instances of 1 thread do."""
    x = engines[0].inputs(batch)
    if warm_up:
        for eng in engines:
            eng.run(*x)
    done = [0] * len(engines)
    stop = threading.Event()

    def loop(i: int) -> None:
        while not stop.is_set():
            engines[i].run(*x)
            done[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(engines))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(min_time_s)
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0  # includes each set finishing its last batch, which `done` counts
    items_per_s = batch * sum(done) / wall
    # ms_per_batch: wall time per item batch of all sets together (so items/s = batch / it, as for one set).
    return {"batch": batch, "reps": sum(done), "ms_per_batch": batch * 1e3 / items_per_s, "items_per_s": items_per_s}


def sweep_paths(
    paths: dict[str, Path],
    cfg: FusionConfig,
    batches: tuple[int, ...] = (1, 4, 8, 16, 32, 64),
    settings: SessionSettings = IN_PROCESS,
    min_time_s: float = 2.0,
    passes: int = 3,
    streams: int = 1,
) -> dict[str, Any]:
    """Items/s per batch size of three engine files, over `passes` interleaved passes of `min_time_s / passes` each.

    Each batch size's row is the median of its passes. One window per batch let a quiet or busy spell
    of this shared machine land on one batch size: rows moved ±10 % between runs, and `best`, the
    largest of them, was biased upwards by the luckiest window.

    `streams` > 1: that many engine sets run at once, each in its own thread (`time_streams`), as
    Triton runs its engine instances; `settings.intra_threads` is then per set.
    """
    sets = [Engines(paths, cfg, settings) for _ in range(max(1, streams))]
    runs: dict[int, list[dict[str, Any]]] = {b: [] for b in batches}
    passes = max(1, passes)
    for i in range(passes):
        for b in batches:
            if streams > 1:
                runs[b].append(time_streams(sets, b, min_time_s / passes, warm_up=i == 0))
            else:
                runs[b].append(sets[0].time_batch(b, min_time_s / passes, min_reps=1 if passes > 1 else 3,
                                                  warm_up=i == 0))
    rows = []
    for b, got in runs.items():
        ms = statistics.median(r["ms_per_batch"] for r in got)
        rows.append({"batch": b, "reps": sum(r["reps"] for r in got), "ms_per_batch": ms, "items_per_s": b * 1e3 / ms,
                     "passes_items_per_s": [round(r["items_per_s"], 2) for r in got]})
    best = max(rows, key=lambda r: r["items_per_s"])
    return {
        "preset": cfg.name,
        "files": {e: str(p) for e, p in paths.items()},
        "settings": asdict(settings) | {"intra_threads": settings.intra_threads or ort_threads()},
        "streams": max(1, streams),
        "rows": rows,
        "best": best,
    }


def at_batch(result: dict[str, Any], batch: float) -> dict[str, Any]:
    """The row measured at the batch nearest (in log scale) to `batch`."""
    return min(result["rows"], key=lambda r: abs(np.log(r["batch"]) - np.log(max(batch, 1.0))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: one per core)")
    p.add_argument("--min-time", type=float, default=2.0, help="seconds per batch size")
    p.add_argument("--streams", type=int, default=1,
                   help="engine sets run at once, each in its own thread (as Triton's engine instances)")
    args = p.parse_args(argv)
    res = sweep(args.repository, tuple(args.batches), replace(IN_PROCESS, intra_threads=args.threads), args.min_time,
                streams=args.streams)
    json.dump(res, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
