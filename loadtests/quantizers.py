"""Kinds of int8 for the CPU engines, against each other and against PyTorch's dynamic int8, in-process.

`vs_naive_http_small` sets the served int8 engines against the naive server running PyTorch's
dynamic int8 (`quantize_dynamic` on every Linear). On a CPU without AVX512-VNNI both sides multiply
uint8 × int8 with the same kind of AVX2 kernels, so the served side can win only by what its
quantiser and kernels do better per item, and by batching. This measures that margin on one core
(one intra-op thread, one torch thread: one engine instance, one naive worker):

- PyTorch fp32 and dynamic int8: the preset's model, as the naive server runs it;
- ONNX Runtime fp32 and seven int8 kinds of the three engines: dynamic per tensor (shipped), dynamic
  per channel, dynamic with uint8 weights, static QDQ and static QOperator (calibrated on renders of
  the shapes world, per-channel int8 weights, uint8 activations), and ONNX Runtime's transformer
  fusions (LayerNorm, GELU, attention where its patterns match) before the shipped dynamic int8,
  the shipped kind with attention's activation × activation MatMuls quantised too, and MatMulNBits
  (8-bit weights in blocks of 128, int8 activations: ONNX Runtime's weight-only kernels);
- OpenVINO's CPU runtime, one inference thread, on the fp32 graphs, the shipped int8 graphs and the
  static QDQ ones (OpenVINO runs a QDQ pair as its own int8 FakeQuantize): another runtime's kernels
  for the same graphs;
- items/s per batch size, the median of passes that each time every row in turn; the ratio to
  PyTorch int8 is the median of each pass's ratio;
- parity with ONNX Runtime fp32 on the renders: smallest cosine of the VQA logits and of the embeddings;
- where the shipped int8 item spends its time at batch 1, per op type (ONNX Runtime's profiler).

    python -m loadtests.levers --only quantizers     # → results/levers.json, section `quantizers`
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from export.quantize import OP_TYPES, cosine_min, quiet_quantizer_logs
from loadtests import engine_bench, precision
from loadtests.common import REPO_ROOT, Sample
from loadtests.flops import ENGINES
from serving.model.config import FusionConfig

log = logging.getLogger(__name__)

WORK_DIR = REPO_ROOT / "build" / "quantizers"
ONE_THREAD = engine_bench.SessionSettings(intra_threads=1, spinning=False)
Feeds = dict[str, np.ndarray]
Builder = Callable[[Path, Path, list[Feeds], FusionConfig], None]  # (fp32 graph, int8 graph to write, calibration, cfg)
NAIVE = "torch dynamic int8 (naive server)"


def corpus_inputs(corpus: list[Sample], cfg: FusionConfig, repo: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels and question tokens of the renders, decoded and tokenised as the served path does."""
    from serving.model.preprocess import decode_image, load_tokenizer, tokenize

    tok = load_tokenizer(repo / "fusion" / "1" / "checkpoint" / "tokenizer.json")
    pixels = np.stack([decode_image(s.image, cfg.image_size) for s in corpus])
    ids, mask = tokenize(tok, [s.question for s in corpus], cfg.max_text_len)
    return pixels, ids, mask


def calibration_feeds(fp32: engine_bench.Engines, x: tuple[np.ndarray, ...]) -> dict[str, list[Feeds]]:
    """One feed per render for each engine; the fusion's are the fp32 encoders' outputs."""
    pixels, ids, mask = x
    out = fp32.run(pixels, ids, mask)
    one = [slice(i, i + 1) for i in range(len(pixels))]
    return {
        "image_encoder": [{"PIXELS": pixels[s]} for s in one],
        "text_encoder": [{"INPUT_IDS": ids[s], "ATTENTION_MASK": mask[s]} for s in one],
        "fusion": [{"IMAGE_FEATURES": out["IMAGE_FEATURES"][s], "TEXT_FEATURES": out["TEXT_FEATURES"][s],
                    "ATTENTION_MASK": mask[s]} for s in one],
    }


def _static(fmt: str) -> Builder:
    def build(src: Path, dst: Path, feeds: list[Feeds], cfg: FusionConfig) -> None:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it: Iterator[Feeds] = iter(feeds)

            def get_next(self) -> Feeds | None:
                return next(self.it, None)

        pre = dst.with_suffix(".pre.onnx")
        quant_pre_process(str(src), str(pre))  # shapes inferred, as the static quantiser asks
        quantize_static(str(pre), str(dst), Reader(), quant_format=getattr(QuantFormat, fmt), per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(OP_TYPES))
        pre.unlink()

    return build


def _dynamic(weight_type: str = "QInt8", per_channel: bool = False, const_b_only: bool = True) -> Builder:
    def build(src: Path, dst: Path, _feeds: list[Feeds], _cfg: FusionConfig) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # const_b_only=False also quantises the MatMuls of two activations (attention's QK^T and AV)
        quantize_dynamic(src, dst, weight_type=getattr(QuantType, weight_type), per_channel=per_channel,
                         op_types_to_quantize=list(OP_TYPES), extra_options={"MatMulConstBOnly": const_b_only})

    return build


def _block_int8(src: Path, dst: Path, _feeds: list[Feeds], _cfg: FusionConfig) -> None:
    """MatMulNBits with 8-bit weights in blocks of 128 along K, accuracy level 4 (int8 activations):
    ONNX Runtime's weight-only kernels, the ones its LLM models run."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True, accuracy_level=4, bits=8)
    quantizer = MatMulNBitsQuantizer(onnx.load(src), algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)


def _fused_then_dynamic(src: Path, dst: Path, feeds: list[Feeds], cfg: FusionConfig) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    fused = dst.with_suffix(".fused.onnx")
    kind = "vit" if "PIXELS" in feeds[0] else "bert"
    optimize_model(str(src), model_type=kind, num_heads=cfg.heads, hidden_size=cfg.dim, opt_level=0).save_model_to_file(
        str(fused))
    _dynamic()(fused, dst, feeds, cfg)
    fused.unlink()


# Label → how one engine's int8 graph is made from its fp32 graph (None: the shipped files themselves).
KINDS: dict[str, Builder | None] = {
    "dynamic, int8 weights per tensor (shipped)": None,
    "dynamic, per channel": _dynamic(per_channel=True),
    "dynamic, uint8 weights": _dynamic(weight_type="QUInt8"),
    "static QDQ, per channel": _static("QDQ"),
    "static QOperator, per channel": _static("QOperator"),
    "transformer fusions, then dynamic": _fused_then_dynamic,
    "dynamic, attention MatMuls too": _dynamic(const_b_only=False),
    "MatMulNBits 8-bit, blocks of 128": _block_int8,
}


def build_kinds(preset: str, feeds: dict[str, list[Feeds]], cfg: FusionConfig,
                work_dir: Path = WORK_DIR) -> dict[str, dict[str, Path] | str]:
    """Each kind's three engine files under `work_dir/<preset>/`, or why it could not be made."""
    fp32 = precision.engine_files(preset, "fp32")
    out: dict[str, dict[str, Path] | str] = {}
    for i, (label, build) in enumerate(KINDS.items()):
        if build is None:
            out[label] = precision.engine_files(preset, "int8")
            continue
        folder = work_dir / preset / f"kind{i}"
        folder.mkdir(parents=True, exist_ok=True)
        paths = {e: folder / f"{e}.onnx" for e in ENGINES}
        try:
            with quiet_quantizer_logs():
                for e in ENGINES:
                    build(fp32[e], paths[e], feeds[e], cfg)
        except Exception as err:  # a quantiser that cannot take a graph is a finding, not a crash
            log.warning("   %s: %s", label, err)
            out[label] = f"{type(err).__name__}: {err}"
            continue
        out[label] = paths
    return out


# Row label → which graphs OpenVINO compiles: "fp32", or a KINDS label.
OPENVINO_ROWS = {
    "openvino fp32": "fp32",
    "openvino, the shipped int8 graphs": "dynamic, int8 weights per tensor (shipped)",
    "openvino, the static QDQ graphs": "static QDQ, per channel",
}


def _openvino_item(paths: dict[str, Path]) -> Callable[..., dict[str, np.ndarray]]:
    """The three graphs compiled by OpenVINO's CPU plugin, one inference thread, run in turn as one item."""
    import openvino as ov

    core = ov.Core()
    # fp32 wherever the graph is not int8: on a CPU with bf16 units OpenVINO would otherwise pick bf16.
    props = {"INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
             "INFERENCE_PRECISION_HINT": "f32"}
    compiled = {e: core.compile_model(str(paths[e]), "CPU", props) for e in ENGINES}
    requests = {e: compiled[e].create_infer_request() for e in ENGINES}

    def infer(engine: str, feeds: Feeds) -> list[np.ndarray]:
        out = requests[engine].infer(feeds)  # copies the outputs: the next call does not overwrite them
        return [out[o] for o in compiled[engine].outputs]

    def run(pixels: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        img = infer("image_encoder", {"PIXELS": pixels})
        txt = infer("text_encoder", {"INPUT_IDS": ids, "ATTENTION_MASK": mask})
        fused = infer("fusion", {"IMAGE_FEATURES": img[0], "TEXT_FEATURES": txt[0], "ATTENTION_MASK": mask})
        return dict(zip(engine_bench.OUTPUTS, [*img, *txt, *fused]))

    return run


def _torch_item(preset: str, int8: bool) -> Callable[..., dict[str, np.ndarray]]:
    """The naive server's forward pass (image once, each question, fusion) over a batch."""
    import torch

    from serving.model.checkpoint import resolve_checkpoint

    model = resolve_checkpoint(preset).model.eval()
    if int8:
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)

    @torch.inference_mode()
    def run(pixels: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        m = torch.from_numpy(mask)
        feats, img_emb = model.encode_image(torch.from_numpy(pixels))
        tfeats, txt_emb = model.encode_text(torch.from_numpy(ids), m)
        logits, _, _ = model.fuse(feats, tfeats, m)
        return {"VQA_LOGITS": logits.numpy(), "IMAGE_EMBEDDING": img_emb.numpy(), "TEXT_EMBEDDING": txt_emb.numpy()}

    return run


def _time(runs: dict[str, Callable[..., Any]], x: tuple[np.ndarray, ...], batches: tuple[int, ...],
          min_time_s: float, passes: int) -> dict[str, dict[int, list[float]]]:
    """Items/s of every run per batch size in each of `passes` passes of `min_time_s / passes` each.

    Each pass times every run in turn, so a busy or quiet spell of this shared machine lands on all of
    them alike rather than on the one timed at that moment.
    """
    got: dict[str, dict[int, list[float]]] = {label: {b: [] for b in batches} for label in runs}
    for run in runs.values():
        for b in batches:
            run(*(a[:b] for a in x))  # warm-up: arenas, first-run allocations
    for _ in range(passes):
        for label, run in runs.items():
            for b in batches:
                xb = tuple(a[:b] for a in x)
                times, t_end = [], time.perf_counter() + min_time_s / passes
                while not times or time.perf_counter() < t_end:
                    t = time.perf_counter()
                    run(*xb)
                    times.append(time.perf_counter() - t)
                got[label][b].append(b / statistics.median(times))
    return got


def _centred(a: np.ndarray) -> np.ndarray:
    """Rows flattened and, when longer than 1, centred: logits that shift together are the same answer."""
    rows = a.astype(np.float64).reshape(len(a), -1)
    return rows - rows.mean(-1, keepdims=True) if rows.shape[1] > 1 else rows


def _parity(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, float]:
    return {f"{k.lower()}_cosine_min": round(cosine_min(_centred(ref[k]), _centred(got[k])), 5)
            for k in ("VQA_LOGITS", "IMAGE_EMBEDDING", "TEXT_EMBEDDING")}


def op_profile(paths: dict[str, Path], cfg: FusionConfig, x: tuple[np.ndarray, ...], work_dir: Path = WORK_DIR,
               reps: int = 5) -> dict[str, Any]:
    """Share of an item's kernel time per engine and per op type at batch 1, one thread (ONNX Runtime's profiler)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    eng = engine_bench.Engines(paths, cfg, replace(ONE_THREAD, profile_prefix=str(work_dir / "profile")))
    one = tuple(a[:1] for a in x)
    for _ in range(reps):
        eng.run(*one)
    per_op: Counter[str] = Counter()
    per_engine: Counter[str] = Counter()
    for e, s in eng.sessions.items():
        trace = Path(s.end_profiling())
        for ev in json.loads(trace.read_text()):
            if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
                per_op[ev["args"]["op_name"]] += ev["dur"]
                per_engine[e] += ev["dur"]
        trace.unlink()
    total = sum(per_op.values())
    return {
        "ms_per_item": round(total / reps / 1e3, 2),
        "share_by_engine": {e: round(v / total, 3) for e, v in per_engine.most_common()},
        "share_by_op_type": {k: round(v / total, 3) for k, v in per_op.most_common(12)},
    }


def compare(preset: str, repo: Path, corpus: list[Sample], batches: tuple[int, ...] = (1, 8), min_time_s: float = 6.0,
            passes: int = 3, work_dir: Path = WORK_DIR) -> dict[str, Any]:
    """Every kind's items/s and parity, PyTorch's beside them, and the shipped int8 item's profile."""
    import torch

    cfg = engine_bench.repository_config(repo)
    renders = corpus_inputs(corpus, cfg, repo)
    half = len(corpus) // 2
    calib, x = tuple(a[:half] for a in renders), tuple(a[half:] for a in renders)  # parity on renders not calibrated on
    fp32_paths = precision.engine_files(preset, "fp32")
    fp32 = engine_bench.Engines(fp32_paths, cfg, ONE_THREAD)
    ref = fp32.run(*x)
    kinds = build_kinds(preset, calibration_feeds(fp32, calib), cfg, work_dir)
    runs: dict[str, Callable[..., dict[str, np.ndarray]]] = {
        "torch fp32": _torch_item(preset, False),
        NAIVE: _torch_item(preset, True),
        "onnxruntime fp32": fp32.run,
    }
    errors: dict[str, str] = {}
    for label, paths in kinds.items():
        if isinstance(paths, str):
            errors[label] = paths
        else:
            runs[label] = engine_bench.Engines(paths, cfg, ONE_THREAD).run
    for label, graphs in OPENVINO_ROWS.items():
        paths = fp32_paths if graphs == "fp32" else kinds[graphs]
        if isinstance(paths, str):
            errors[label] = paths
        else:
            runs[label] = _openvino_item(paths)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one naive worker's torch
    try:
        parity = {label: _parity(ref, run(*x)) for label, run in runs.items()}
        passes_got = _time(runs, x, batches, min_time_s, passes)
    finally:
        torch.set_num_threads(threads)
    naive = passes_got[NAIVE]
    rows: dict[str, Any] = {}
    for label in [*runs, *errors]:
        if label in errors:
            rows[label] = {"error": errors[label]}
        else:
            got = passes_got[label]
            rows[label] = {
                "items_per_s": {b: round(statistics.median(v), 2) for b, v in got.items()},
                # each pass's ratio to PyTorch int8 timed in that pass, then the median of those
                "over_torch_int8": {b: round(statistics.median(r / n for r, n in zip(v, naive[b])), 3)
                                    for b, v in got.items()},
                "passes_items_per_s": {b: [round(r, 2) for r in v] for b, v in got.items()},
                "parity": parity[label],
            }
        log.info("   %s %-45s %s", preset, label, rows[label].get("over_torch_int8", rows[label].get("error")))
    shipped = kinds["dynamic, int8 weights per tensor (shipped)"]
    assert not isinstance(shipped, str)
    return {"preset": preset, "threads": 1, "batches": list(batches),
            "renders": {"calibration": half, "timed_and_compared": len(corpus) - half}, "rows": rows,
            "profile_shipped_int8_batch1": op_profile(shipped, cfg, x, work_dir)}
