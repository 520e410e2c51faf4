"""What each extra question costs on a single-stream model (ViLT), against tiny's reused image features.

ViLT puts the image's patches and the question's tokens through one transformer, so nothing
computed for one question serves the next: N questions about one image are N full passes.
This measures it in-process on the engine `vtfuse import-hf` exports (ONNX Runtime, 2 threads,
the in-process reference session options): a ViLT-B/32-shaped random checkpoint (ViltConfig's defaults: 768
wide, 12 layers, patch 32, 40 tokens, 3 129 answers) at a 384 × 512 image (a 3:4 photo after
ViLT's resize), for 1, 2, 4 and 8 questions in one batch. The same sweep on tiny's three
engines (image once, fusion per question) shows what feature reuse saves.

    python -m loadtests.vilt_questions --out loadtests/results/vilt [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from serving.paths import REPO_ROOT

QUESTIONS = (1, 2, 4, 8)


def build_vilt_base(folder: Path, seed: int = 0) -> Path:
    """ViltForQuestionAnswering at ViltConfig's sizes, random weights, with a ViltProcessor."""
    import torch
    from transformers import BertTokenizer, ViltConfig, ViltForQuestionAnswering, ViltImageProcessor, ViltProcessor

    from loadtests.blip_bench import padded_vocab
    from tests.hf.checkpoints import WORDS

    torch.manual_seed(seed)
    base = ViltConfig()
    vocab = padded_vocab(WORDS, base.vocab_size)
    labels = [f"answer{i}" for i in range(3129)]
    cfg = ViltConfig(vocab_size=len(vocab), num_labels=len(labels), id2label=dict(enumerate(labels)),
                     label2id={a: i for i, a in enumerate(labels)})
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    ViltForQuestionAnswering(cfg).eval().save_pretrained(tmp)
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    ViltProcessor(image_processor=ViltImageProcessor(), tokenizer=tok).save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def time_fn(fn: Any, min_time_s: float = 2.0, min_reps: int = 3) -> float:
    """Median seconds of one call (after a warm-up), over at least `min_reps` calls and `min_time_s`."""
    fn()
    times: list[float] = []
    t_end = time.perf_counter() + min_time_s
    while len(times) < min_reps or time.perf_counter() < t_end:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def per_question(seconds: dict[int, float]) -> float:
    """Least-squares slope of latency over the number of questions: the cost of one more question."""
    n = np.array(sorted(seconds), dtype=np.float64)
    t = np.array([seconds[int(k)] for k in n])
    return float(np.polyfit(n, t, 1)[0])


def session(path: Path) -> Any:
    """An ONNX Runtime session with the in-process reference options (loadtests.engine_bench), 2 threads."""
    import onnxruntime as ort

    from loadtests.engine_bench import IN_PROCESS

    opts = IN_PROCESS.options()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def vilt_sweep(onnx_path: Path, side: tuple[int, int], tokens: int, vocab: int, min_time_s: float) -> dict[int, float]:
    sess = session(onnx_path)
    rng = np.random.default_rng(0)
    out = {}
    for n in QUESTIONS:
        feed = {
            "PIXELS": np.repeat(rng.integers(0, 256, (1, side[0], side[1], 3), dtype=np.uint8), n, axis=0),
            "INPUT_IDS": rng.integers(5, vocab, (n, tokens), dtype=np.int64),
            "ATTENTION_MASK": np.ones((n, tokens), dtype=np.int64),
        }
        out[n] = time_fn(lambda feed=feed: sess.run(None, feed), min_time_s)
    return out


def tiny_sweep(repository: Path, min_time_s: float) -> dict[int, float]:
    """tiny's engines as a VQA request runs them: the image once, the questions' text and fusion rows."""
    from serving.model.config import FusionConfig

    cfg = FusionConfig.from_json(repository / "fusion" / "1" / "checkpoint" / "config.json")
    s = {e: session(repository / e / "1" / "model.onnx") for e in ("image_encoder", "text_encoder", "fusion")}
    rng = np.random.default_rng(0)
    out = {}
    for n in QUESTIONS:
        pixels = rng.integers(0, 256, (1, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
        ids = rng.integers(4, 20, (n, cfg.max_text_len), dtype=np.int64)
        mask = np.ones_like(ids)

        def run(pixels: np.ndarray = pixels, ids: np.ndarray = ids, mask: np.ndarray = mask, n: int = n) -> None:
            feats = s["image_encoder"].run(["IMAGE_FEATURES"], {"PIXELS": pixels})[0]
            text = s["text_encoder"].run(["TEXT_FEATURES"], {"INPUT_IDS": ids, "ATTENTION_MASK": mask})[0]
            s["fusion"].run(["VQA_LOGITS"], {"IMAGE_FEATURES": np.repeat(feats, n, axis=0), "TEXT_FEATURES": text,
                                             "ATTENTION_MASK": mask})

        out[n] = time_fn(run, min_time_s)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO_ROOT / "loadtests" / "results" / "vilt"))
    p.add_argument("--quick", action="store_true", help="the tests' tiny ViLT (seconds; figures say nothing)")
    p.add_argument("--repository", default=str(REPO_ROOT / "model_repository"), help="built repository with tiny")
    ns = p.parse_args(argv)
    from export.hf.importer import import_hf

    build = REPO_ROOT / "build"
    suffix = "-quick" if ns.quick else ""
    ckpt, work, repo = build / f"vilt-base-random{suffix}", build / f"vilt-onnx{suffix}", build / f"vilt-repo{suffix}"
    if not (ckpt / "config.json").exists():
        if ns.quick:
            from tests.hf.checkpoints import build_vilt

            build_vilt(ckpt)
        else:
            build_vilt_base(ckpt)
    if not (work / "single_stream.onnx").exists():
        shutil.rmtree(repo, ignore_errors=True)
        import_hf(str(ckpt), "vilt", repo=repo, precision="fp32", work_dir=work)
    cfg = json.loads((ckpt / "config.json").read_text())
    side = (64, 80) if ns.quick else (384, 512)
    min_time = 0.3 if ns.quick else 3.0
    vilt = vilt_sweep(work / "single_stream.onnx", side, 16, int(cfg["vocab_size"]), min_time)
    tiny = tiny_sweep(Path(ns.repository), min_time)
    summary = {
        "command": "python -m loadtests.vilt_questions" + (" --quick" if ns.quick else ""),
        "vilt": {"hidden_size": cfg["hidden_size"], "layers": cfg["num_hidden_layers"], "patch": cfg["patch_size"],
                 "image": list(side), "tokens": 16, "seconds_by_questions": vilt,
                 "seconds_per_extra_question": per_question(vilt),
                 "extra_question_over_first": per_question(vilt) / vilt[1]},
        "tiny": {"precision": json.loads((Path(ns.repository) / "fusion" / "1" / "manifest.json").read_text())
                 .get("precision"), "seconds_by_questions": tiny, "seconds_per_extra_question": per_question(tiny),
                 "extra_question_over_first": per_question(tiny) / tiny[1]},
        "engine": "ONNX Runtime CPU, 2 intra-op threads, batch = questions; ViLT fp32, tiny as installed",
    }
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
