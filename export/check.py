"""Stage 2: parity of ONNX Runtime against PyTorch, per engine and output, on random and real inputs.

Two input sets per engine:

- `random`: uniform uint8 pixels, random token ids with random lengths, and (for `fusion`)
  unit-normal features, the scale the towers' final LayerNorm produces;
- `real`: shapes-world scenes rendered at several sizes as PNG/JPEG, decoded by the serving
  path (`decode_image`), real questions and captions through the checkpoint's tokenizer; the
  fusion engine gets PyTorch's own features, so each engine is measured alone. An end-to-end
  chain (ONNX Runtime's features into ONNX Runtime's fusion) adds the VQA top-1 agreement.

A preset with a caption decoder adds its two graphs to both sets, a first step with an empty
cache (`first_step`), and `caption`: greedy captions decoded by the served scheduler over the
ONNX graphs against the plain PyTorch greedy loop, equal token for token (`export/caption.py`).

Figures per output: `max_abs` = max |ort − torch|, and `max_rel` = max_abs / max |torch|
(relative to the output's scale, which stays meaningful where single elements are near 0).
An output passes when `max_abs <= atol` and `max_rel <= rtol`.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from export.errors import ParityError
from export.onnx_export import GRAPHS
from serving.model.checkpoint import Checkpoint
from serving.model.io_spec import ENGINES, EngineSpec, engine_specs
from serving.model.model import FusionConfig
from serving.model.preprocess import decode_image, tokenize
from serving.shapes import world

log = logging.getLogger(__name__)

PARITY_FILE = "parity.json"


@dataclass(frozen=True)
class Tolerance:
    """Largest accepted error of one output: absolute, and relative to the output's max |value|."""

    atol: float
    rtol: float


# fp32 ONNX Runtime vs fp32 PyTorch: the same arithmetic in a different order. Measured on `tiny`
# (random and trained weights) the errors are ~1e-6 abs; 1e-4 leaves room for deeper presets
# and other CPUs while still catching any real graph difference (a wrong op is > 1e-2).
FP32_TOLERANCE = Tolerance(atol=1e-4, rtol=1e-4)
# TensorRT with FP16 kernels (stage 3) vs ONNX Runtime fp32: half precision keeps ~3 decimal
# digits, and errors add up over layers; judged mostly relative to each output's scale.
FP16_TOLERANCE = Tolerance(atol=5e-2, rtol=2e-2)


def compare(reference: np.ndarray, got: np.ndarray, tol: Tolerance) -> dict[str, Any]:
    """Error figures of one output against its reference."""
    if reference.shape != got.shape:
        return {"max_abs": float("inf"), "max_rel": float("inf"), "ok": False, "shape": list(got.shape)}
    ref = reference.astype(np.float64)
    diff = np.abs(got.astype(np.float64) - ref)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return {"max_abs": max_abs, "max_rel": max_rel, "ok": bool(max_abs <= tol.atol and max_rel <= tol.rtol)}


def ort_session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU ONNX Runtime session (threads=None: ONNX Runtime's default, one per core)."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def torch_outputs(ckpt: Checkpoint, engine: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run one engine's PyTorch wrapper (the module that was exported) on numpy feeds."""
    spec = engine_specs(ckpt.config)[engine]
    wrapper = GRAPHS[engine](ckpt.model).eval()
    outs = wrapper(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs))
    return {t.name: o.numpy() for t, o in zip(spec.outputs, outs)}


def run_session(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an ONNX Runtime session; outputs by name."""
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def random_inputs(spec: EngineSpec, cfg: FusionConfig, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random feeds of one engine: pixels, token ids with masks of random length, unit-normal features."""
    lengths = rng.integers(3, cfg.max_text_len + 1, size=batch)
    mask = (np.arange(cfg.max_text_len)[None, :] < lengths[:, None]).astype(np.int64)
    feeds: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        shape = (batch, *t.dims)
        if t.name == "PIXELS":
            feeds[t.name] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        elif t.name == "INPUT_IDS":
            feeds[t.name] = rng.integers(4, cfg.vocab_size, size=shape, dtype=np.int64) * mask
        elif t.name == "ATTENTION_MASK":
            feeds[t.name] = mask
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def real_inputs(ckpt: Checkpoint, n: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Feeds of every engine from `n` rendered scenes and 2n texts (a question and a caption each)."""
    cfg = ckpt.config
    rng = random.Random(seed)
    scenes = [world.random_scene(rng) for _ in range(n)]
    pixels = []
    for s in scenes:
        img = world.render(s, rng.choice([64, 96, 160, 224]), supersample=rng.choice([1, 3]))
        data = world.encode(img, "JPEG", rng.randint(70, 95)) if rng.random() < 0.5 else world.encode(img, "PNG")
        pixels.append(decode_image(data, cfg.image_size))
    texts = [world.sample_question(s, rng).question for s in scenes]
    texts += [world.caption(world.scene_items(s), rng) for s in scenes]
    ids, mask = tokenize(ckpt.tokenizer, texts, cfg.max_text_len)
    image = {"PIXELS": np.stack(pixels)}
    text = {"INPUT_IDS": ids, "ATTENTION_MASK": mask}
    return {"image_encoder": image, "text_encoder": text}


def _check_outputs(
    engine: str, ref: dict[str, np.ndarray], got: dict[str, np.ndarray], tol: Tolerance
) -> dict[str, dict[str, Any]]:
    return {name: compare(ref[name], got[name], tol) for name in ref}


def check_parity(
    ckpt: Checkpoint,
    onnx_dir: str | Path,
    *,
    batch: int = 5,
    n_real: int = 8,
    seed: int = 0,
    tolerance: Tolerance = FP32_TOLERANCE,
    threads: int | None = None,
    raise_on_failure: bool = True,
) -> dict[str, Any]:
    """Compare ONNX Runtime with PyTorch for every engine in `onnx_dir` (`<engine>.onnx`).

    Args:
        ckpt: the checkpoint the ONNX files were exported from.
        onnx_dir: the stage-1 folder.
        batch: batch size of the random inputs (not the traced one, so the dynamic axis is exercised).
        n_real: rendered scenes in the real set (2 texts each).
        seed: seed of both input sets.
        tolerance: accepted error per output.
        threads: ONNX Runtime intra-op threads (None: its default).
        raise_on_failure: raise ParityError when an output is out of tolerance.

    Returns:
        {"tolerance", "batch", "n_real", "onnxruntime", "random": {engine: {output: figures}},
         "real": {...}, "end_to_end": {"vqa_top1_agreement", "itm_prob_max_abs"}, "ok"}; with a caption
        decoder also `cross_kv` and `decoder_step` in `random` and `real`, "first_step" and "caption".

    Raises:
        ParityError: an output is out of tolerance (its `figures` hold the whole report).
    """
    cfg = ckpt.config
    specs = engine_specs(cfg)
    sessions = {e: ort_session(Path(onnx_dir) / f"{e}.onnx", threads) for e in ENGINES}
    rng = np.random.default_rng(seed)
    report: dict[str, Any] = {
        "tolerance": asdict(tolerance),
        "batch": batch,
        "n_real": n_real,
        "onnxruntime": ort.__version__,
        "random": {},
        "real": {},
    }
    for e in ENGINES:
        feeds = random_inputs(specs[e], cfg, batch, rng)
        ref, got = torch_outputs(ckpt, e, feeds), run_session(sessions[e], feeds)
        report["random"][e] = _check_outputs(e, ref, got, tolerance)

    real = real_inputs(ckpt, n_real, seed)
    ref_img = torch_outputs(ckpt, "image_encoder", real["image_encoder"])
    ref_txt = torch_outputs(ckpt, "text_encoder", real["text_encoder"])
    ort_img = run_session(sessions["image_encoder"], real["image_encoder"])
    ort_txt = run_session(sessions["text_encoder"], real["text_encoder"])
    report["real"]["image_encoder"] = _check_outputs("image_encoder", ref_img, ort_img, tolerance)
    report["real"]["text_encoder"] = _check_outputs("text_encoder", ref_txt, ort_txt, tolerance)
    # Each image with its question and its caption: image features repeated for the two texts.
    mask = real["text_encoder"]["ATTENTION_MASK"]
    fusion_feeds = {
        "IMAGE_FEATURES": np.concatenate([ref_img["IMAGE_FEATURES"]] * 2),
        "TEXT_FEATURES": ref_txt["TEXT_FEATURES"],
        "ATTENTION_MASK": mask,
    }
    ref_fused = torch_outputs(ckpt, "fusion", fusion_feeds)
    report["real"]["fusion"] = _check_outputs(
        "fusion", ref_fused, run_session(sessions["fusion"], fusion_feeds), tolerance
    )
    chained = run_session(
        sessions["fusion"],
        {
            "IMAGE_FEATURES": np.concatenate([ort_img["IMAGE_FEATURES"]] * 2),
            "TEXT_FEATURES": ort_txt["TEXT_FEATURES"],
            "ATTENTION_MASK": mask,
        },
    )
    q = slice(0, n_real)  # the questions; captions follow
    agree = ref_fused["VQA_LOGITS"][q].argmax(-1) == chained["VQA_LOGITS"][q].argmax(-1)

    def sigmoid(x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))

    report["end_to_end"] = {
        "vqa_top1_agreement": float(agree.mean()),
        "itm_prob_max_abs": float(np.abs(sigmoid(ref_fused["ITM_LOGIT"]) - sigmoid(chained["ITM_LOGIT"])).max()),
    }
    if cfg.has_decoder:
        from export.caption import check_decoder  # late: export.caption imports this module

        decoder = check_decoder(ckpt, onnx_dir, batch=batch, n_real=n_real, seed=seed, tolerance=tolerance,
                                threads=threads)
        for s in ("random", "real"):
            report[s].update(decoder[s])
        report["first_step"] = decoder["first_step"]
        report["caption"] = decoder["generation"]
    failures = [
        (s, e, o, f)
        for s in ("random", "real", "first_step")
        for e, outs in report.get(s, {}).items()
        for o, f in outs.items()
        if not f["ok"]
    ]
    caption_ok = report.get("caption", {}).get("ok", True)
    report["ok"] = not failures and caption_ok
    for s, e, o, f in failures:
        log.error("parity %s %s.%s: max_abs %.3g max_rel %.3g over %s", s, e, o, f["max_abs"], f["max_rel"], tolerance)
    if not caption_ok and raise_on_failure:
        c = report["caption"]
        raise ParityError(
            f"served greedy captions over the ONNX decoder graphs differ from PyTorch's on {c['n'] - c['equal']} of "
            f"{c['n']} renders; re-export with `vtfuse export onnx` from the same checkpoint",
            engine="decoder_step",
            output="token_ids",
            figures=report,
        )
    if failures and raise_on_failure:
        s, e, o, f = failures[0]
        raise ParityError(
            f"{e}.{o} differs from PyTorch on {s} inputs: max_abs {f['max_abs']:.3g} (atol {tolerance.atol:g}), "
            f"max_rel {f['max_rel']:.3g} (rtol {tolerance.rtol:g}); re-export with `vtfuse export onnx` "
            "from the same checkpoint, or check the graph for an unsupported op",
            engine=e,
            output=o,
            figures=report,
        )
    return report


def summary(report: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """The worst max_abs / max_rel per engine and output over both input sets (for logs and manifests)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for s in ("random", "real", "first_step"):
        for e, outs in report.get(s, {}).items():
            for o, f in outs.items():
                cur = out.setdefault(e, {}).setdefault(o, {"max_abs": 0.0, "max_rel": 0.0})
                cur["max_abs"] = max(cur["max_abs"], f["max_abs"])
                cur["max_rel"] = max(cur["max_rel"], f["max_rel"])
    return out


def write_report(report: dict[str, Any], onnx_dir: str | Path) -> Path:
    """Write `parity.json` beside the ONNX files (stage 4 puts it in every manifest)."""
    p = Path(onnx_dir) / PARITY_FILE
    p.write_text(json.dumps(report, indent=2) + "\n")
    return p
