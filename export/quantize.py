"""Stage 2b (CPU targets): dynamic int8 copies of the three engines, judged by the answers they give.

ONNX Runtime's dynamic quantisation (`quantize_dynamic`): the weights of every MatMul and Gemm
are stored as int8 (QInt8, one scale per tensor) and activations are quantised per batch at run
time, so no calibration set is needed. On CPUs with AVX512-VNNI the int8 GEMMs run ~2.2× the fp32
ones for `small` (loadtests/README.md); engines shrink ~4×.

int8 changes each output by more than any elementwise tolerance meant for fp32 (a logit moves by
up to a few %), so the check compares what a user sees, with the fp32 ONNX engines as the
reference, on fresh renders decoded by the serving path:

- VQA: top-1 agreement with fp32, accuracy against the renders' true answers (int8 may lose at
  most `max_accuracy_drop`), and the smallest cosine of the centred logits to fp32's;
- ITM: for each image, its true caption against a distractor: how often int8 orders the
  pair as fp32 does;
- embeddings: the smallest cosine similarity to fp32 over the set.

- captions (a preset with a caption decoder): greedy captions decoded over the fp32 decoder graphs
  from the int8 `image_encoder`'s features against those from the fp32 one, token for token, and
  how often each names the scene's objects (the served features come from int8 by default; the
  decoder graphs themselves stay fp32).

Agreement is judged only where the checkpoint has learnt the task (fp32 VQA accuracy ≥
`trained_vqa_accuracy`; true caption above the distractor ≥ `trained_itm_rate`): an untrained
one's logits are nearly tied, so rounding flips its (meaningless) answers, and its logit and
embedding cosines are what shows a broken layer.

Writes `<onnx_dir>/int8/<engine>.onnx` and `<onnx_dir>/int8/quantize.json` (settings, figures,
`ok`); stage 4 with `--precision int8` installs these and refuses when `ok` is false.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.caption import checkpoint_files, has_caption_graphs, int8_caption_agreement
from export.check import ort_session, run_session
from export.errors import ParityError
from export.evaluate import fresh_render
from serving.model.config import FusionConfig
from serving.model.io_spec import ENGINES
from serving.model.preprocess import decode_image, load_tokenizer, tokenize
from serving.shapes import world

log = logging.getLogger(__name__)

INT8_DIR = "int8"
QUANTIZE_FILE = "quantize.json"
OP_TYPES = ("MatMul", "Gemm")


@dataclass(frozen=True)
class Int8Criteria:
    """What int8 engines must keep of the fp32 ones' answers on fresh renders.

    Measured on 200 renders: `tiny` (trained) VQA and ITM agreement 1.00, logit cosine 0.9995,
    embedding cosine ≥ 0.9998; `small` (random weights) VQA agreement 0.92 and ITM 0.955 (ties),
    logit cosine 0.996, embedding cosine ≥ 0.999. The bounds leave room for other checkpoints
    while failing a quantisation that breaks a layer (tests/export/test_quantize.py breaks one).
    """

    trained_vqa_accuracy: float = 0.5
    trained_itm_rate: float = 0.75
    min_vqa_agreement: float = 0.97
    max_accuracy_drop: float = 0.02
    min_itm_order_agreement: float = 0.95
    min_embedding_cosine: float = 0.99
    min_logit_cosine: float = 0.99
    trained_caption_accuracy: float = 0.5
    min_caption_agreement: float = 0.97


@contextmanager
def quiet_quantizer_logs() -> Iterator[None]:
    """Only errors from the root logger meanwhile: ONNX Runtime's quantizers log every tensor they skip."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def dynamic_int8(paths: dict[str, Path], dest: Path) -> dict[str, Path]:
    """`dest/<name>.onnx`: ONNX Runtime dynamic int8 (MatMul and Gemm weights, QInt8 per tensor) of each graph."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    with quiet_quantizer_logs():
        for name, src in paths.items():
            out[name] = dest / f"{name}.onnx"
            quantize_dynamic(src, out[name], weight_type=QuantType.QInt8, op_types_to_quantize=list(OP_TYPES))
    return out


def quantize_engines(onnx_dir: Path) -> dict[str, Path]:
    """Write `<onnx_dir>/int8/<engine>.onnx` from the fp32 stage-1 graphs."""
    srcs = {e: onnx_dir / f"{e}.onnx" for e in ENGINES}
    for src in srcs.values():
        if not src.exists():
            raise FileNotFoundError(f"{src} missing: run `vtfuse export onnx` first")
    return dynamic_int8(srcs, onnx_dir / INT8_DIR)


def _scenes(n: int, seed: int) -> tuple[list[world.Scene], list[bytes], list[world.QA], list[str], list[str]]:
    """Fresh renders of scenes with a question, the true caption and a distractor caption each."""
    rng = random.Random(seed)
    scenes = [world.random_scene(rng) for _ in range(n)]
    images = [fresh_render(s, rng) for s in scenes]
    qas = [world.sample_question(s, rng) for s in scenes]
    captions = [world.caption(world.scene_items(s), rng) for s in scenes]
    distractors = [world.distractor_captions(s, rng, 1)[0] for s in scenes]
    return scenes, images, qas, captions, distractors


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest cosine similarity between matching rows of `a` and `b` (last axis)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(-1)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return float((num / np.maximum(den, 1e-12)).min())


class _Chain:
    """The three engines of one precision, run as the served path runs them."""

    def __init__(self, paths: dict[str, Path], threads: int | None) -> None:
        self.sessions = {e: ort_session(paths[e], threads) for e in ENGINES}

    def __call__(self, pixels: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        img = run_session(self.sessions["image_encoder"], {"PIXELS": pixels})
        txt = run_session(self.sessions["text_encoder"], {"INPUT_IDS": ids, "ATTENTION_MASK": mask})
        fused = run_session(
            self.sessions["fusion"],
            {"IMAGE_FEATURES": img["IMAGE_FEATURES"], "TEXT_FEATURES": txt["TEXT_FEATURES"], "ATTENTION_MASK": mask},
        )
        return {**img, **txt, **fused}


def judge_int8(
    onnx_dir: Path,
    n: int = 200,
    seed: int = 4242,
    criteria: Int8Criteria = Int8Criteria(),
    threads: int | None = None,
    chunk: int = 50,
) -> dict[str, Any]:
    """Figures of the int8 engines against the fp32 ones on `n` fresh renders (see the module doc)."""
    ckpt_dir = onnx_dir / "checkpoint"
    cfg = FusionConfig.from_json(ckpt_dir / "config.json")
    tok = load_tokenizer(ckpt_dir / "tokenizer.json")
    answers: list[str] = json.loads((ckpt_dir / "answers.json").read_text())
    fp32 = _Chain({e: onnx_dir / f"{e}.onnx" for e in ENGINES}, threads)
    int8 = _Chain({e: onnx_dir / INT8_DIR / f"{e}.onnx" for e in ENGINES}, threads)
    scenes, images, qas, captions, distractors = _scenes(n, seed)
    pred: dict[str, list[np.ndarray]] = {"fp32": [], "int8": []}
    order: dict[str, list[np.ndarray]] = {"fp32": [], "int8": []}
    cos = {"IMAGE_EMBEDDING": 1.0, "TEXT_EMBEDDING": 1.0}
    logit_cos = 1.0
    max_logit_diff = 0.0
    for i in range(0, n, chunk):
        sl = slice(i, i + chunk)
        px = np.stack([decode_image(b, cfg.image_size) for b in images[sl]])
        k = len(px)
        # Each image three times: with its question, its caption, a distractor.
        texts = [q.question for q in qas[sl]] + captions[sl] + distractors[sl]
        ids, mask = tokenize(tok, texts, cfg.max_text_len)
        pixels = np.concatenate([px] * 3)
        outs = {"fp32": fp32(pixels, ids, mask), "int8": int8(pixels, ids, mask)}
        if i == 0:
            first, first_out = (pixels, ids, mask), outs["int8"]
        for p, o in outs.items():
            pred[p].append(o["VQA_LOGITS"][:k].argmax(-1))
            itm = o["ITM_LOGIT"][:, 0]
            order[p].append(itm[k : 2 * k] > itm[2 * k :])
        for name in cos:
            cos[name] = min(cos[name], cosine_min(outs["fp32"][name], outs["int8"][name]))
        # Centred per row: a shift of every logit changes no answer.
        l32, l8 = (outs[p]["VQA_LOGITS"][:k] for p in ("fp32", "int8"))
        logit_cos = min(logit_cos, cosine_min(l32 - l32.mean(-1, keepdims=True), l8 - l8.mean(-1, keepdims=True)))
        max_logit_diff = max(
            max_logit_diff, float(np.abs(outs["fp32"]["VQA_LOGITS"] - outs["int8"]["VQA_LOGITS"]).max())
        )
    # Activations get one scale per batch: a row's outputs move a little with its batch-mates.
    alone = [int8(*(a[j : j + 1] for a in first)) for j in range(min(8, len(first[0])))]
    figures_batch = min(
        cosine_min(np.concatenate([o[name] for o in alone]), first_out[name][: len(alone)])
        for name in ("IMAGE_EMBEDDING", "TEXT_EMBEDDING")
    )
    truth = np.array([answers.index(q.answer) if q.answer in answers else -1 for q in qas])
    p32, p8 = np.concatenate(pred["fp32"]), np.concatenate(pred["int8"])
    acc32, acc8 = float((p32 == truth).mean()), float((p8 == truth).mean())
    figures: dict[str, Any] = {
        "vqa_agreement": float((p32 == p8).mean()),
        "vqa_accuracy": {"fp32": acc32, "int8": acc8},
        "vqa_accuracy_drop": acc32 - acc8,
        "vqa_logits_max_abs_diff": max_logit_diff,
        "vqa_logits_cosine_min": logit_cos,
        "itm_order_agreement": float((np.concatenate(order["fp32"]) == np.concatenate(order["int8"])).mean()),
        "true_caption_above_distractor": {
            p: float(np.concatenate(order[p]).mean()) for p in ("fp32", "int8")
        },
        "embedding_cosine_min": cos,
        "batch_invariance_cosine_min": figures_batch,
    }
    failures = []
    vqa_trained = acc32 >= criteria.trained_vqa_accuracy
    itm_trained = float(np.concatenate(order["fp32"]).mean()) >= criteria.trained_itm_rate
    figures["judged"] = {"vqa_agreement": vqa_trained, "itm_order_agreement": itm_trained}
    if vqa_trained and figures["vqa_agreement"] < criteria.min_vqa_agreement:
        failures.append(f"VQA agreement {figures['vqa_agreement']:.3f} < {criteria.min_vqa_agreement}")
    if figures["vqa_accuracy_drop"] > criteria.max_accuracy_drop:
        failures.append(f"VQA accuracy {acc32:.3f} → {acc8:.3f} (drop > {criteria.max_accuracy_drop})")
    if itm_trained and figures["itm_order_agreement"] < criteria.min_itm_order_agreement:
        failures.append(
            f"ITM order agreement {figures['itm_order_agreement']:.3f} < {criteria.min_itm_order_agreement}"
        )
    if logit_cos < criteria.min_logit_cosine:
        failures.append(f"VQA logits cosine {logit_cos:.4f} < {criteria.min_logit_cosine}")
    for name, c in cos.items():
        if c < criteria.min_embedding_cosine:
            failures.append(f"{name} cosine {c:.4f} < {criteria.min_embedding_cosine}")
    if has_caption_graphs(onnx_dir):
        failures += _judge_captions(onnx_dir, scenes, images, criteria, threads, figures)
    return {"n": n, "seed": seed, "criteria": asdict(criteria), "figures": figures, "failures": failures,
            "ok": not failures}


def _judge_captions(
    onnx_dir: Path, scenes: list[world.Scene], images: list[bytes], criteria: Int8Criteria, threads: int | None,
    figures: dict[str, Any],
) -> list[str]:
    """`figures["caption"]`: greedy captions from int8 features against fp32 features; the failures it finds."""
    tokenizer, _ = checkpoint_files(onnx_dir)
    agreement = int8_caption_agreement(onnx_dir, images, threads)
    right = {
        p: float(np.mean([world.caption_matches(tokenizer.decode(ids, skip_special_tokens=True), s)
                          for ids, s in zip(agreement["tokens"][p], scenes)]))
        for p in ("fp32", "int8")
    }
    figures["caption"] = {
        "greedy_agreement": agreement["agreement"],
        "equal": agreement["equal"],
        "items_exact": right,
    }
    trained = right["fp32"] >= criteria.trained_caption_accuracy
    figures["judged"]["caption_agreement"] = trained
    if trained and agreement["agreement"] < criteria.min_caption_agreement:
        return [f"caption agreement {agreement['agreement']:.3f} < {criteria.min_caption_agreement}"]
    return []


def quantize(
    onnx_dir: str | Path,
    n: int = 200,
    threads: int | None = None,
    criteria: Int8Criteria = Int8Criteria(),
    raise_on_failure: bool = True,
) -> dict[str, Any]:
    """Quantise a stage-1 folder's engines, judge them, write `int8/quantize.json`.

    Raises:
        ParityError: the int8 engines miss a criterion (the report is written first).
    """
    import onnxruntime as ort

    onnx_dir = Path(onnx_dir)
    paths = quantize_engines(onnx_dir)
    report = {
        "method": "onnxruntime.quantization.quantize_dynamic",
        "weight_type": "QInt8",
        "op_types": list(OP_TYPES),
        "onnxruntime": ort.__version__,
        "bytes": {e: {"fp32": (onnx_dir / f"{e}.onnx").stat().st_size, "int8": p.stat().st_size}
                  for e, p in paths.items()},
        **judge_int8(onnx_dir, n=n, threads=threads, criteria=criteria),
    }
    (onnx_dir / INT8_DIR / QUANTIZE_FILE).write_text(json.dumps(report, indent=2) + "\n")
    f = report["figures"]
    log.info("int8 %s: VQA agreement %.3f, accuracy %.3f → %.3f, ITM order agreement %.3f", onnx_dir,
             f["vqa_agreement"], f["vqa_accuracy"]["fp32"], f["vqa_accuracy"]["int8"], f["itm_order_agreement"])
    if report["failures"] and raise_on_failure:
        raise ParityError(
            f"int8 engines of {onnx_dir} miss: {'; '.join(report['failures'])}; install fp32 (--precision fp32)",
            engine="all", output="answers", figures=report,
        )
    return report


def read_quantize_report(onnx_dir: str | Path) -> dict[str, Any] | None:
    """`int8/quantize.json` of a stage-1 folder, or None before `vtfuse export quantize`."""
    p = Path(onnx_dir) / INT8_DIR / QUANTIZE_FILE
    return json.loads(p.read_text()) if p.exists() else None
