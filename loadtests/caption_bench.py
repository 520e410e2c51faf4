"""BLIP-base captioning and generative VQA on this machine: the served stack against a naive `generate()` server.

Steps (each stage's failure is recorded in summary.json `errors`, the others still run):

1. BLIP-base-shaped random checkpoints (`BlipConfig` defaults: ViT-B/16 at 384 px, BERT-base text
   decoder; the shapes-world WordPiece words and `[DEC]` padded with `[unused{i}]` to 30 524): a
   `BlipForConditionalGeneration` and a `BlipForQuestionAnswering`, the vision tower drawn with
   `initializer_range` 0.02 (its default of 1e-10 leaves the image features near zero, and every image
   would get one caption), in build/blip-{caption,vqa}-base-random (reused when there);
2. `import_hf(..., precision="fp32")` of each into its own copy of the built repository
   (build/model_repository-caption, build/model_repository-caption-vqa; `tiny` kept), reused when the
   checkpoint is unchanged (a stamp in the repository);
3. `cost`: in-process, what one caption costs: vision GFLOP (loadtests.flops), the vision tower under
   PyTorch eager and ONNX Runtime as each side runs it (2 processes × 1 thread, 1 process × 2 threads,
   and 2 × 1 for ONNX Runtime too), a whole naive caption on one thread, and the decoder step
   (serving.generation.engine.OnnxDecoderEngine, the served engine, 2 threads) at 1-32 rows with
   a cache of `cache_positions` positions and the 577 image tokens' cross K/V;
4. `caption_vs_naive`: paired rounds of a closed loop at concurrency 16 for a fixed window, every
   request a fixed `new_tokens` (`min_new_tokens` = `max_new_tokens`), through `/v1/caption` of the
   served stack (Triton without its response cache, as `make bench` runs it, + the Ray Serve app as
   deploy/serve_config.yaml composes it, generation deadline raised) and of the naive server
   (loadtests/baseline/caption_app.py: FastAPI + `generate()`, 2 uvicorn workers × 1 torch thread),
   fresh servers for every window, the order alternating between rounds. A round where either side
   strays more than 25 % from its side's median is run again once and marked; a round that still
   strays is left out; the figure is the median round's ratio (the lower middle of an even count).
   Every response's tokens are compared with the naive server's for the same image. Triton's
   `vtfuse_generate_step_rows` over the served windows gives `decode_rows_per_step_c16`;
5. `stream`: the same closed loop with `"stream": true` on a fresh served stack: time to first
   token and time per output token ((total − TTFT) ÷ (tokens − 1)) per request, p50/p99, and
   Triton's time-to-first-token histogram over the same window;
6. `vqa`: one image × 8 questions ÷ one image × 1 question through `/v1/vqa` on the VQA model,
   sequential requests alternating, a fresh image each (median latencies);
7. raw.json (every window), summary.json (rebuilt from raw.json by `--rebuild`) and caption.png.

`--quick` uses tests.hf.checkpoints' tiny generation checkpoints (64 px, 2 layers) in build/*-quick
paths and seconds-long windows, so the whole tool runs in a few minutes; its figures say nothing
about speed.

    python -m loadtests.caption_bench --out loadtests/results/caption [--quick] [--only cost rounds stream vqa]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from loadtests import blip_bench as bb
from loadtests.census import process_label
from loadtests.common import (
    CDF_POINTS,
    REPO_ROOT,
    ForeignCpu,
    _descendants,
    _proc_table,
    git_commit,
    machine,
    percentile,
    versions,
    wait_quiet,
    write_json,
)
from loadtests.rounds import STRAY, headline, order, strayed
from serving.shapes import world

log = logging.getLogger("loadtests.caption_bench")

TARGETS = {"caption_vs_naive": (">=", 1.6), "decode_rows_per_step_c16": (">=", 8.0),
           "vqa_gen_8q_over_1q": ("<=", 3.0)}
STAMP = "caption_bench_import.json"  # in each bench repository: what was imported, so a rerun can reuse it
CONTENDED = 0.10  # share of all cores other processes may take during a window before it is measured again
ROWS_METRIC = "vtfuse_generate_step_rows"
TTFT_METRIC = "vtfuse_generate_time_to_first_token_seconds"
COUNTERS = ("vtfuse_generate_decode_steps_total", "vtfuse_generate_tokens_total")


@dataclass(frozen=True)
class CaptionBenchSettings:
    """Paths, loads and windows of one run."""

    quick: bool = False
    caption_name: str = "blip-cap-base"
    vqa_name: str = "blip-vqa-base"
    caption_checkpoint: Path = REPO_ROOT / "build" / "blip-caption-base-random"
    vqa_checkpoint: Path = REPO_ROOT / "build" / "blip-vqa-base-random"
    caption_repository: Path = REPO_ROOT / "build" / "model_repository-caption"
    vqa_repository: Path = REPO_ROOT / "build" / "model_repository-caption-vqa"
    work_dir: Path = REPO_ROOT / "build" / "caption-bench-onnx"
    base_repository: Path = bb.BASE_REPO
    seed: int = 0
    concurrency: int = 16
    new_tokens: int = 20
    images: int = 24  # distinct images the closed loop cycles through (Triton's response cache is off)
    image_side: int = 256  # rendered scene side; both servers resize it to the model's 384
    rounds: int = 5
    window_s: float = 90.0
    warmup_s: float = 30.0  # a closed loop at c=16 fills its queues first (a served caption takes ~15 s)
    stream_window_s: float = 90.0
    vqa_requests: int = 10  # timed requests of each kind (1 and 8 questions), alternating
    vqa_questions: int = 8
    vqa_warmups: int = 2
    timeout_s: float = 900.0  # the served app's generation and request deadlines (contention headroom)
    naive_workers: int = 2
    naive_threads: int = 1
    engine_threads: int = 2  # the served engines' intra-op threads
    sweep_rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    cache_positions: int = 11  # self-attention cache the sweep's rows hold (mid-caption of 20 new tokens)
    sweep_min_time_s: float = 4.5
    decoder_threads: tuple[int, ...] = (1, 2)  # the decoder step is swept at these intra-op threads
    vision_window_s: float = 25.0  # each in-process vision arrangement runs this long
    caption_reps: int = 3  # whole naive captions timed in-process (one thread)
    stray: float = STRAY
    wait_quiet_s: float = 0.0  # before each measuring stage, wait up to this long for other work to leave the CPU
    variant: tuple[tuple[str, str], ...] = ()  # served repository settings (`variant_edit`), for the levers

    @classmethod
    def quick_run(cls) -> CaptionBenchSettings:
        b = REPO_ROOT / "build"
        return cls(
            quick=True, caption_name="blip-cap-quick", vqa_name="blip-vqa-quick",
            caption_checkpoint=b / "blip-caption-quick-random", vqa_checkpoint=b / "blip-vqa-quick-random",
            caption_repository=b / "model_repository-caption-quick",
            vqa_repository=b / "model_repository-caption-vqa-quick", work_dir=b / "caption-bench-onnx-quick",
            images=8, image_side=96, rounds=2, window_s=6.0, warmup_s=2.0, stream_window_s=4.0, vqa_requests=3,
            vqa_warmups=1, sweep_rows=(1, 4, 16), sweep_min_time_s=0.2, vision_window_s=1.5, caption_reps=1,
            timeout_s=120.0,
        )

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


# -- pure parts -----------------------------------------------------------------------------------

def round_order(r: int) -> tuple[str, ...]:
    """Which side a round measures first: the served stack in even rounds, the naive server in odd ones."""
    return order(("served", "naive"), r)


def ratio(a: float | None, b: float | None) -> float | None:
    """a ÷ b rounded to 4 places, None when either is missing or b is 0."""
    if a is None or not b:
        return None
    return round(a / b, 4)


_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$")


def parse_metrics(text: str, model: str) -> dict[str, float]:
    """{series: value} of every sample labelled `model=<model>` (series: name, with `le` for histogram buckets)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if labels.get("model") != model:
            continue
        key = m.group(1) + (f'{{le="{labels["le"]}"}}' if "le" in labels else "")
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def metric_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """after − before for every series of `after`."""
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def add_deltas(deltas: list[dict[str, float]]) -> dict[str, float]:
    """The sum of several windows' deltas, series by series."""
    out: dict[str, float] = {}
    for d in deltas:
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + v
    return out


def rows_per_step(delta: dict[str, float]) -> float | None:
    """Δ rows summed over steps ÷ Δ steps, from a `vtfuse_generate_step_rows` histogram delta."""
    count = delta.get(f"{ROWS_METRIC}_count", 0.0)
    return round(delta.get(f"{ROWS_METRIC}_sum", 0.0) / count, 3) if count else None


def histogram_quantile(q: float, delta: dict[str, float], name: str) -> float | None:
    """Prometheus' histogram_quantile over a bucket delta: linear within the bucket; the highest finite bound
    when the quantile falls in +Inf. None without observations."""
    buckets = []
    for k, v in delta.items():
        m = re.fullmatch(re.escape(name) + r'_bucket\{le="([^"]+)"\}', k)
        if m:
            buckets.append((float("inf") if m.group(1) == "+Inf" else float(m.group(1)), v))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


def sse_events(lines: Sequence[tuple[float, bytes | str]]) -> list[tuple[float, dict[str, Any]]]:
    """(arrival time, JSON) of every `data:` line of a text/event-stream, in order."""
    out = []
    for t, raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        line = line.strip()
        if line.startswith("data:"):
            out.append((t, json.loads(line[5:].strip())))
    return out


def stream_timing(sent: float, events: list[tuple[float, dict[str, Any]]]) -> dict[str, Any]:
    """TTFT (the first token event), the total, tokens and TPOT ((total − TTFT) ÷ (tokens − 1)) of one stream.

    Token events carry `token_id`; the last event is the whole result (`token_ids`).
    """
    tokens = [(t, e) for t, e in events if "token_id" in e]
    if not tokens or not events:
        raise ValueError("a stream without a token event")
    ttft = tokens[0][0] - sent
    total = events[-1][0] - sent
    n = len(tokens)
    return {"ttft_s": ttft, "total_s": total, "tokens": n,
            "tpot_s": (total - ttft) / (n - 1) if n > 1 else None, "result": events[-1][1]}


def quantiles(values: list[float], scale: float = 1.0, digits: int = 4) -> dict[str, float | None]:
    """p50 and p99 of `values` × `scale` (None for no values)."""
    if not values:
        return {"p50": None, "p99": None}
    return {"p50": round(percentile(values, 50) * scale, digits), "p99": round(percentile(values, 99) * scale, digits)}


def compare_tokens(naive: list[tuple[int, list[int]]], served: list[tuple[int, list[int]]]) -> dict[str, Any]:
    """Every served (image, tokens) against the naive server's tokens for that image.

    The naive server's own answers for one image must agree with each other too (`naive_inconsistent`).
    """
    ref: dict[int, list[int]] = {}
    inconsistent = 0
    for img, ids in naive:
        if img in ref and ref[img] != ids:
            inconsistent += 1
        ref.setdefault(img, ids)
    compared = identical = 0
    differ: list[int] = []
    for img, ids in served:
        if img not in ref:
            continue
        compared += 1
        if ids == ref[img]:
            identical += 1
        elif img not in differ:
            differ.append(img)
    uncompared = sum(1 for img, _ in served if img not in ref)
    return {"served_responses": len(served), "compared": compared, "identical": identical,
            "differ_images": sorted(differ), "uncompared": uncompared, "naive_responses": len(naive),
            "naive_inconsistent": inconsistent, "images_with_naive_reference": len(ref)}


def caption_bodies(n: int, seed: int, side: int, model: str, new_tokens: int, stream: bool = False
                   ) -> list[bytes]:
    """`n` /v1/caption JSON bodies over distinct shapes-world renders (PNG), each a fixed `new_tokens` long."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        png = world.encode(world.render(world.random_scene(rng), side, supersample=2), "PNG")
        body: dict[str, Any] = {"model": model, "image": base64.b64encode(png).decode(),
                                "min_new_tokens": new_tokens, "max_new_tokens": new_tokens}
        if stream:
            body["stream"] = True
        out.append(json.dumps(body).encode())
    return out


def vqa_bodies(n: int, seed: int, side: int, model: str, questions: int) -> list[tuple[bytes, bytes]]:
    """`n` pairs of /v1/vqa bodies on a fresh image each: (1 question, `questions` questions on that image)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = world.random_scene(rng)
        png = base64.b64encode(world.encode(world.render(scene, side, supersample=2), "PNG")).decode()
        qs: list[str] = []
        while len(qs) < questions:
            q = world.sample_question(scene, rng).question
            if q not in qs:
                qs.append(q)
        out.append((json.dumps({"model": model, "image": png, "questions": qs[:1]}).encode(),
                    json.dumps({"model": model, "image": png, "questions": qs}).encode()))
    return out


# -- checkpoints and repositories ----------------------------------------------------------------

def _generation_tokenizer(size: int) -> Any:
    """BertTokenizer over the shapes-world words and `[DEC]` (BLIP's decoder start token), padded to `size`."""
    from transformers import BertTokenizer

    from tests.hf.checkpoints import WORDS

    tok = BertTokenizer(vocab={w: i for i, w in enumerate(bb.padded_vocab([*WORDS, "[DEC]"], size))})
    tok.add_special_tokens({"bos_token": "[DEC]"})  # in the vocabulary already: marked special, not added
    return tok


def build_base_checkpoint(folder: Path, task: str, seed: int = 0) -> Path:
    """BlipForConditionalGeneration (`caption`) or BlipForQuestionAnswering (`vqa`) at BlipConfig's sizes."""
    import torch
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipForQuestionAnswering,
        BlipImageProcessor,
        BlipProcessor,
    )

    torch.manual_seed(seed)
    default: Any = BlipConfig()
    tok = _generation_tokenizer(default.text_config.vocab_size)
    cfg: Any = BlipConfig(
        text_config={"vocab_size": len(tok), "pad_token_id": 0, "bos_token_id": tok.bos_token_id, "sep_token_id": 3},
        # The text decoder's default initialisation already varies the greedy tokens with the image and from
        # step to step once the image features do (the vision tower's default 1e-10 leaves them near 0).
        vision_config={"image_size": 384, "patch_size": 16, "initializer_range": bb.VISION_INIT_RANGE},
    )
    cls = BlipForConditionalGeneration if task == "caption" else BlipForQuestionAnswering
    model = cls(cfg).eval()
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    side = cfg.vision_config.image_size
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": side, "width": side}), tokenizer=tok) \
        .save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def ensure_checkpoint(folder: Path, task: str, quick: bool, seed: int) -> dict[str, Any]:
    """The checkpoint folder (built unless there), with its sizes."""
    ready = (folder / "config.json").exists() and any(folder.glob("*.safetensors")) \
        and (folder / "tokenizer_config.json").exists()
    if ready:
        log.info("checkpoint %s: reused", folder)
    elif quick:
        from tests.hf.checkpoints import build_blip_caption, build_blip_vqa

        (build_blip_caption if task == "caption" else build_blip_vqa)(folder)
    else:
        log.info("building %s (BLIP-base sizes, random weights, %s)", folder, task)
        build_base_checkpoint(folder, task, seed)
    cfg = json.loads((folder / "config.json").read_text())
    weights = sorted(folder.glob("*.safetensors"))
    return {
        "folder": str(folder), "built_now": not ready, "architectures": cfg.get("architectures"),
        "vision": {k: cfg["vision_config"].get(k) for k in ("image_size", "patch_size", "hidden_size",
                                                              "num_hidden_layers", "initializer_range")},
        "text": {k: cfg["text_config"].get(k) for k in ("vocab_size", "hidden_size", "num_hidden_layers")},
        "weights_bytes": sum(w.stat().st_size for w in weights),
    }


def unbuilt_models(repository: Path) -> list[str]:
    """Model folders with no built version (no `<version>/manifest.json`, which every install writes)."""
    return sorted(c.parent.name for c in repository.glob("*/config.pbtxt") if not any(c.parent.glob("*/manifest.json")))


# The code that writes an imported generative model's graphs and configs: a change to it imports again.
IMPORT_CODE = ("export/hf/importer.py", "export/hf/blip_caption.py", "export/hf/blip_vqa.py",
               "export/hf/blip_decoder.py", "export/generate_model.py")


def import_code_fingerprint() -> str:
    """sha256 (16 hex digits) over IMPORT_CODE's files."""
    h = hashlib.sha256()
    for rel in IMPORT_CODE:
        path = REPO_ROOT / rel
        h.update(rel.encode() + (path.read_bytes() if path.exists() else b""))
    return h.hexdigest()[:16]


def ensure_import(checkpoint: Path, name: str, repository: Path, work_dir: Path, base: Path) -> dict[str, Any]:
    """A copy of the built repository with `checkpoint` imported fp32 as `name` (reused when the stamp matches)."""
    from export.hf.importer import import_hf

    if not (base / "fusion" / "1" / "model.onnx").exists():
        raise RuntimeError(f"{base} is not built: run `make repository` first")
    stamp: dict[str, Any] = {"checkpoint": str(checkpoint), "fingerprint": bb._fingerprint(checkpoint), "name": name,
                             "precision": "fp32", "import_code": import_code_fingerprint()}
    stamp_path = repository / STAMP
    if stamp_path.exists() and (work_dir / "image_encoder.onnx").exists():
        old = json.loads(stamp_path.read_text())
        if {k: old.get(k) for k in stamp} == stamp:
            log.info("repository %s: reused (imported %s)", repository, old.get("imported"))
            for m in unbuilt_models(repository):
                shutil.rmtree(repository / m)
            return old | {"reused": True}
    if repository.exists():
        shutil.rmtree(repository)
    unbuilt = unbuilt_models(base)
    if unbuilt:  # e.g. a model another change is adding, not exported yet: Triton would refuse to start
        log.warning("%s: not copying %s (no built version folder)", base, ", ".join(unbuilt))
    skip = shutil.ignore_patterns("__pycache__", "vtfuse_models.json", STAMP)
    shutil.copytree(base, repository, ignore=lambda d, names: skip(d, names) | (
        set(unbuilt) & set(names) if Path(d) == base else set()))
    stamp["not_copied"] = unbuilt
    t = time.monotonic()
    res = import_hf(str(checkpoint), name, repo=repository, precision="fp32", work_dir=work_dir)
    generation = json.loads((work_dir / "generation.json").read_text()) if (work_dir / "generation.json").exists() \
        else None
    stamp |= {"imported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "import_seconds": round(time.monotonic() - t, 1), "engines": res["engines"],
              "parity_fp32": res["parity"],
              "generation_check": {k: generation.get(k) for k in ("identical", "sequences", "ok")} if generation
              else None}
    write_json(stamp_path, stamp)
    return stamp | {"reused": False}


# A bench variant of the generate model (`decoder_spinning=0`): ONNX Runtime's thread spinning off in its sessions.
SPIN_OFF_MODEL_PY = '''"""Bench variant of the generate model: its ONNX Runtime sessions without thread spinning."""

import onnxruntime as _ort

_session = _ort.InferenceSession


def _spin_off(path, sess_options=None, providers=None, **kwargs):
    opts = sess_options or _ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return _session(path, opts, providers=providers, **kwargs)


_ort.InferenceSession = _spin_off

from serving.triton.python_models.generate import GenerateModel as TritonPythonModel  # noqa: E402,F401
'''
# A bench variant of the generate model (`gather_rows=N gather_wait_ms=T`): a decoder step waits (up to T ms after
# the last one) while fewer than N rows are active or waiting, so that more rows share each step's weight reads.
GATHER_MODEL_PY = '''"""Bench variant of the generate model: a step waits while fewer than {rows} rows could run."""

import time

from serving.generation import scheduler as _scheduler

_step = _scheduler.DecodeScheduler.step


def _gathered(self):
    now = time.monotonic()
    with self.lock:
        rows = self.rows_used + sum(seq.decoder.rows for seq in self.waiting)
    if self.active and rows < {rows} and now - getattr(self, "_last_step_at", 0.0) < {wait_ms} / 1e3:
        time.sleep(0.002)
        self.last_step_rows = self.last_step_tokens = 0
        return []
    self._last_step_at = now
    return _step(self)


_scheduler.DecodeScheduler.step = _gathered

from serving.triton.python_models.generate import GenerateModel as TritonPythonModel  # noqa: E402,F401
'''
VARIANT_KEYS = ("image_instances", "image_threads", "decoder_threads", "max_rows", "prepare_workers",
                "decoder_spinning", "vision_graph", "gather_rows", "gather_wait_ms")


def variant_edit(settings: tuple[tuple[str, str], ...], name: str) -> Callable[[str, object], None]:
    """Config edit of a served variant: `image_instances`, `image_threads` (the vision tower's instances and
    intra-op threads), `decoder_threads`, `max_rows`, `prepare_workers` (the generate model's parameters);
    `decoder_spinning` and `vision_graph` swap files instead (`served_repository`)."""
    wanted = dict(settings)
    unknown = set(wanted) - set(VARIANT_KEYS)
    if unknown:
        raise ValueError(f"unknown variant settings: {', '.join(sorted(unknown))}")

    def edit(model: str, config: Any) -> None:
        if model == f"{name}_image_encoder":
            if "image_instances" in wanted:
                config.instance_group[0].count = int(wanted["image_instances"])
            if "image_threads" in wanted:
                config.parameters["intra_op_threads"].string_value = wanted["image_threads"]
        elif model == f"{name}_generate":
            for key, param in (("decoder_threads", "intra_op_threads"), ("max_rows", "max_rows"),
                               ("prepare_workers", "prepare_workers")):
                if key in wanted:
                    config.parameters[param].string_value = wanted[key]

    return edit


def served_repository(s: CaptionBenchSettings) -> Path:
    """The caption repository as measured: itself, or a copy with `s.variant`'s settings (build/bench/)."""
    if not s.variant:
        return s.caption_repository
    from loadtests import servers

    wanted = dict(s.variant)
    tag = "-".join(f"{k}{Path(v).stem if k == 'vision_graph' else v}" for k, v in s.variant)
    dest = REPO_ROOT / "build" / "bench" / f"model_repository-caption-{tag}"
    swap: dict[str, dict[str, Path]] = {}
    if wanted.get("decoder_spinning") == "0":
        model_py = REPO_ROOT / "build" / "bench" / "generate_spin_off.py"
        model_py.parent.mkdir(parents=True, exist_ok=True)
        model_py.write_text(SPIN_OFF_MODEL_PY)
        swap[f"{s.caption_name}_generate"] = {"model.py": model_py}
    if "gather_rows" in wanted:
        model_py = REPO_ROOT / "build" / "bench" / f"generate_gather_{tag}.py"
        model_py.parent.mkdir(parents=True, exist_ok=True)
        model_py.write_text(GATHER_MODEL_PY.format(rows=int(wanted["gather_rows"]),
                                                   wait_ms=float(wanted.get("gather_wait_ms", "400"))))
        swap[f"{s.caption_name}_generate"] = {"model.py": model_py}
    if "vision_graph" in wanted:
        swap[f"{s.caption_name}_image_encoder"] = {"model.onnx": Path(wanted["vision_graph"])}
    servers.variant_repository(s.caption_repository, dest, variant_edit(s.variant, s.caption_name), swap)
    shutil.copy2(s.caption_repository / "vtfuse_models.json", dest / "vtfuse_models.json")
    return dest


def lever(s: CaptionBenchSettings, against: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    """`s.variant` against the served repository as imported (or as the `against` variant makes it): paired rounds
    of served windows at c=16."""
    variant = served_repository(s)
    baseline = served_repository(replace(s, variant=against))
    rounds = paired_rounds(s, {
        "baseline": lambda name: served_window(s, baseline, name),
        "variant": lambda name: served_window(s, variant, name),
    }, "lever")
    for r in rounds:
        for side in ("baseline", "variant"):
            r[side] = r["windows"][side]["captions_per_s"]
    value, which = headline(rounds, s.stray, ("variant", "baseline"))
    return {"variant": dict(s.variant), "baseline": dict(against), "variant_over_baseline": value, **which,
            "rounds": [{"round": r["round"], "first": r["first"], "rerun": r["rerun"],
                        "ratio": ratio(r["variant"], r["baseline"]),
                        **{side: {k: r["windows"][side].get(k) for k in (
                            "captions_per_s", "p50_ms", "completed", "errors", "rows_per_step", "foreign_cpu_share",
                            "stack_cpu_s_per_caption", "cpu_by_process_s", "contended_first_try")}
                           for side in ("baseline", "variant")}}
                       for r in rounds]}


# -- in-process cost ------------------------------------------------------------------------------

def worker_job(job: dict[str, Any]) -> dict[str, Any]:
    """One timing job in this process (`--worker`): load, warm up, say `ready`, wait for the go file's window, run
    until its end; the time of every run.

    kinds: `torch_vision` (the checkpoint's vision_model on processor pixels), `ort_vision` (image_encoder.onnx
    on uint8 pixels, the served session options), `torch_caption` (a whole `generate()` of `new_tokens` and its
    vision_model part).
    """
    rng = np.random.default_rng(job.get("seed", 0))
    side = int(job["side"])
    pixels = rng.integers(0, 256, (1, side, side, 3), dtype=np.uint8)
    run: Callable[[], Any]
    if job["kind"] in ("torch_vision", "torch_caption"):
        import torch
        from PIL import Image
        from transformers import BlipForConditionalGeneration, BlipProcessor

        torch.set_num_threads(int(job["threads"]))
        model = BlipForConditionalGeneration.from_pretrained(job["checkpoint"], dtype=torch.float32).eval()
        proc = BlipProcessor.from_pretrained(job["checkpoint"])
        enc = proc(images=Image.fromarray(pixels[0]), return_tensors="pt")
        n = int(job.get("new_tokens", 20))
        if job["kind"] == "torch_vision":
            def run() -> Any:
                with torch.inference_mode():
                    return model.vision_model(pixel_values=enc["pixel_values"])
        else:
            def run() -> Any:
                with torch.inference_mode():
                    t = time.perf_counter()
                    model.vision_model(pixel_values=enc["pixel_values"])
                    t_vision = time.perf_counter()
                    model.generate(**enc, min_new_tokens=n, max_new_tokens=n)
                    return t_vision - t, time.perf_counter() - t_vision  # the vision tower, the whole caption
    elif job["kind"] == "ort_vision":
        import onnxruntime as ort

        from loadtests.engine_bench import IN_PROCESS

        opts = replace(IN_PROCESS, intra_threads=int(job["threads"])).options()
        sess = ort.InferenceSession(job["path"], opts, providers=["CPUExecutionProvider"])

        def run() -> Any:
            return sess.run(None, {"PIXELS": pixels})
    else:
        raise ValueError(f"unknown job kind {job['kind']!r}")
    run()  # warm-up
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    go = Path(job["go_file"])
    while not go.exists():
        time.sleep(0.01)
    window = json.loads(go.read_text())
    while time.time() < window["start_at"]:
        time.sleep(0.001)
    cpu0 = time.process_time()
    times: list[float] = []
    extra: list[float] = []
    while time.time() < window["end_at"] or len(times) < int(job.get("min_reps", 1)):
        t = time.perf_counter()
        out = run()
        if job["kind"] == "torch_caption":  # a caption's time is generate()'s alone; the vision tower's beside it
            extra.append(float(out[0]))
            times.append(float(out[1]))
        else:
            times.append(time.perf_counter() - t)
    return {"times_s": [round(x, 4) for x in times], "vision_s": [round(x, 4) for x in extra],
            "cpu_s": round(time.process_time() - cpu0, 2)}


def run_workers(job: dict[str, Any], processes: int, window_s: float) -> dict[str, Any]:
    """`processes` copies of a worker job at once over the same window, once every one has loaded and warmed up;
    runs per second over all of them."""
    with tempfile.TemporaryDirectory(prefix="caption-bench-") as tmp:
        go = Path(tmp) / "go.json"
        job = job | {"go_file": str(go)}
        cmd = [sys.executable, "-m", "loadtests.caption_bench", "--worker", json.dumps(job)]
        env = dict(os.environ) | {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": str(job["threads"])}
        procs = [subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                 for _ in range(processes)]
        try:
            for p in procs:
                assert p.stdout is not None
                if p.stdout.readline().strip() != b"ready":
                    raise RuntimeError(f"worker {job['kind']} exited with {p.wait()} before it was ready")
            start = time.time() + 0.2
            go.write_text(json.dumps({"start_at": start, "end_at": start + window_s}))
            fc = ForeignCpu()
            fc.start()
            results = []
            for p in procs:
                out, _ = p.communicate(timeout=window_s + 900)
                if p.returncode != 0:
                    raise RuntimeError(f"worker {job['kind']} exited with {p.returncode}")
                results.append(json.loads(out.decode().strip().splitlines()[-1]))
            elapsed = max(time.time() - start, 1e-9)
            share = fc.stop() / (elapsed * (os.cpu_count() or 1))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    times = [t for r in results for t in r["times_s"]]
    runs = len(times)
    span = max(sum(r["times_s"]) for r in results)  # the busiest process: every run had ended by then
    vision = [x for r in results for x in r["vision_s"]]
    return {"kind": job["kind"], "processes": processes, "threads": job["threads"], "runs": runs,
            "per_s": round(runs / span, 4), "median_s": round(statistics.median(times), 4),
            "vision_median_s": round(statistics.median(vision), 4) if vision else None,
            "cpu_s": [r["cpu_s"] for r in results], "foreign_cpu_share": round(share, 3)}


def decoder_sweep(folder: Path, rows: tuple[int, ...], positions: int, threads: int, min_time_s: float,
                  passes: int = 3) -> dict[str, Any]:
    """The served decoder step (OnnxDecoderEngine, `threads` threads) per row count, each row `positions` deep in its
    cache and cross-attending to the full encoder length; and the cross-K/V projection of one sequence.

    The inputs are laid out as the scheduler passes them: row-major slices of buffers of the largest row
    count (the cross K/V in place, the self-attention cache a strided slice the engine makes contiguous).
    Every row count is timed in each of `passes` interleaved passes and its figure is the median of them,
    so a slow spell of this shared machine does not land on one row count alone.
    """
    from serving.generation.engine import OnnxDecoderEngine

    eng = OnnxDecoderEngine(folder, threads)
    sh = eng.shape
    rng = np.random.default_rng(0)
    spec = json.loads((folder / "checkpoint" / "generation.json").read_text())
    s = int(spec["max_cross_len"])
    cap, max_pos = max(rows), int(spec["defaults"]["max_positions"])
    states = rng.standard_normal((1, s, sh.encoder_dim), dtype=np.float32)
    cross_one = eng.cross_kv(states)
    cross_buf = [np.ascontiguousarray(np.repeat(kv, cap, axis=0)) for kv in cross_one]
    self_buf = [np.empty((cap, sh.heads, max_pos, sh.head_dim), np.float32) for _ in range(2 * sh.layers)]
    for buf in self_buf:
        buf[:, :, :positions] = rng.standard_normal((cap, sh.heads, positions, sh.head_dim), dtype=np.float32)

    def timed(fn: Callable[[], Any], seconds: float) -> list[float]:
        fn()
        times: list[float] = []
        end = time.perf_counter() + seconds
        while len(times) < 3 or time.perf_counter() < end:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return times

    def step(b: int) -> Any:
        ids = rng.integers(4, sh.vocab, (b, 1), dtype=np.int64)
        pos = np.full((b, 1), positions, np.int64)
        masks = np.ones((b, positions + 1), np.int64), np.ones((b, s), np.int64)
        return lambda: eng.step(ids, pos, *masks, [kv[:b, :, :positions] for kv in self_buf],
                                [kv[:b, :, :s] for kv in cross_buf])

    per_pass: dict[int, list[float]] = {b: [] for b in rows}
    for _ in range(passes):
        for b in rows:
            per_pass[b].append(statistics.median(timed(step(b), min_time_s / passes)) * 1e3)
    table = []
    for b in rows:
        ms = statistics.median(per_pass[b])
        table.append({"rows": b, "step_ms": round(ms, 2), "ms_per_row": round(ms / b, 2),
                      "passes_ms": [round(x, 2) for x in per_pass[b]]})
        log.info("   decoder step, %d rows: %.1f ms (%.1f ms a row; passes %s)", b, ms, ms / b,
                 ", ".join(f"{x:.0f}" for x in per_pass[b]))
    cross_ms = statistics.median(timed(lambda: eng.cross_kv(states), min_time_s)) * 1e3
    return {"cross_kv_ms": round(cross_ms, 2), "rows": table, "shape": sh.to_json(), "cross_len": s,
            "positions": positions, "threads": threads, "passes": passes}


def onnx_weight_bytes(path: Path) -> dict[str, int]:
    """Bytes of a graph's initializers: all of them, and those a step reads whole (any consumer but a Gather)."""
    import onnx

    model = onnx.load(str(path))
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = read = 0
    for t in model.graph.initializer:
        n = (int(np.prod(t.dims)) if t.dims else 1) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        total += n
        if consumers.get(t.name, set()) - {"Gather"}:
            read += n
    return {"all": total, "read_per_step": read}


def cost(s: CaptionBenchSettings, repository: Path) -> dict[str, Any]:
    """Vision GFLOP, the vision tower per arrangement, a whole naive caption, the decoder step per row count."""
    vision_path = s.work_dir / s.caption_name / "image_encoder.onnx"
    cfg = json.loads((s.caption_checkpoint / "config.json").read_text())
    side = int(cfg["vision_config"]["image_size"])
    count = bb.count_flops(vision_path, {"PIXELS": [1, side, side, 3]})
    vision_gflop = count["flops_per_item"] / 1e9
    log.info("   vision tower: %.2f GFLOP an image", vision_gflop)
    base = {"side": side, "min_reps": 2, "seed": s.seed}
    torch_job = base | {"checkpoint": str(s.caption_checkpoint)}
    ort_job = base | {"kind": "ort_vision", "path": str(vision_path)}
    arrangements = []
    for label, job, procs in (
        ("pytorch 1 process × 1 thread (one naive worker alone)", torch_job | {"kind": "torch_vision", "threads": 1},
         1),
        ("pytorch 2 processes × 1 thread (the naive server)", torch_job | {"kind": "torch_vision", "threads": 1}, 2),
        ("onnxruntime 1 process × 2 threads (the served image encoder)", ort_job | {"threads": 2}, 1),
        ("onnxruntime 2 processes × 1 thread", ort_job | {"threads": 1}, 2),
        ("onnxruntime 1 process × 1 thread", ort_job | {"threads": 1}, 1),
    ):
        r = quiet_measure(s, lambda: run_workers(job, procs, s.vision_window_s), label)  # noqa: B023 — at once
        r["arrangement"] = label
        r["gflop_s"] = round(r["per_s"] * vision_gflop, 1)
        arrangements.append(r)
        log.info("   vision, %s: %.3f images/s (median %.3f s an image), foreign cpu %.2f", label, r["per_s"],
                 r["median_s"], r["foreign_cpu_share"])
    caption = quiet_measure(s, lambda: run_workers(torch_job | {
        "kind": "torch_caption", "threads": 1, "new_tokens": s.new_tokens, "min_reps": s.caption_reps}, 1, 0.0),
        "naive caption")
    naive_caption = {
        "caption_s": caption["median_s"], "vision_s": caption["vision_median_s"],
        "vision_share": round(caption["vision_median_s"] / caption["median_s"], 3) if caption["median_s"] else None,
        "ms_per_token": round((caption["median_s"] - caption["vision_median_s"]) / s.new_tokens * 1e3, 1),
        "runs": caption["runs"], "foreign_cpu_share": caption["foreign_cpu_share"],
    }
    log.info("   a naive %d-token caption, one thread: %.2f s, of it vision %.2f s (%.0f %%), %.1f ms a token",
             s.new_tokens, naive_caption["caption_s"], naive_caption["vision_s"], 100 * naive_caption["vision_share"],
             naive_caption["ms_per_token"])
    folder = repository / f"{s.caption_name}_generate" / "1"

    from serving.triton.model_config import load_config

    served = int(load_config(folder.parent / "config.pbtxt").parameters["intra_op_threads"].string_value)

    def sweep_once(threads: int) -> dict[str, Any]:
        fc = ForeignCpu()
        fc.start()
        t0 = time.perf_counter()
        res = decoder_sweep(folder, s.sweep_rows, s.cache_positions, threads, s.sweep_min_time_s)
        return res | {"foreign_cpu_share": round(fc.stop() / ((time.perf_counter() - t0) * (os.cpu_count() or 1)), 3)}

    # The served thread count first (the cost model's), then the other one, for the levers.
    sweeps = {n: quiet_measure(s, lambda: sweep_once(n), f"decoder sweep, {n} threads")  # noqa: B023 — at once
              for n in dict.fromkeys((served, *s.decoder_threads))}
    sweep = sweeps[served]
    sh = sweep["shape"]
    hidden = sh["heads"] * sh["head_dim"]
    weights = onnx_weight_bytes(folder / "decoder_step.onnx")
    cross_row = 2 * sh["layers"] * sweep["cross_len"] * hidden * 4
    self_row = 2 * sh["layers"] * s.new_tokens * hidden * 4
    return {
        "vision_gflop": round(vision_gflop, 2), "vision_macs": count["macs"], "vision": arrangements,
        "naive_caption_one_thread": naive_caption,
        "decoder": sweep, "decoder_by_threads": {str(n): w for n, w in sweeps.items()},
        "decoder_bytes": {"weights": weights["all"], "weights_read_per_step": weights["read_per_step"],
                          "cross_kv_per_row": cross_row, "self_kv_per_row_at_new_tokens": self_row,
                          "per_step_at_rows": {str(b): weights["read_per_step"] + b * (cross_row + self_row)
                                               for b in s.sweep_rows}},
        "cross_kv_gflop_per_sequence": round(2 * 2 * sh["layers"] * sweep["cross_len"] * hidden * sh["encoder_dim"]
                                             / 1e9, 2),
    }


def vision_optimizer(s: CaptionBenchSettings, passes: int = 3) -> dict[str, Any]:
    """ONNX Runtime's transformer optimizer (`vit` fusions) on the imported vision tower, in-process: what it fused,
    the largest difference from the traced graph's features, and images/s of both graphs as the served encoder
    runs (1 process × `engine_threads` threads), in `passes` interleaved passes."""
    import onnxruntime as ort
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    plain = s.work_dir / s.caption_name / "image_encoder.onnx"
    fused = plain.with_name("image_encoder.optimized.onnx")
    cfg = json.loads((s.caption_checkpoint / "config.json").read_text())["vision_config"]
    model = optimize_model(str(plain), model_type="vit", num_heads=int(cfg.get("num_attention_heads", 12)),
                           hidden_size=int(cfg.get("hidden_size", 768)), optimization_options=FusionOptions("vit"),
                           opt_level=0, use_gpu=False)
    model.save_model_to_file(str(fused))
    side = int(cfg["image_size"])
    px = np.random.default_rng(1).integers(0, 256, (2, side, side, 3), dtype=np.uint8)
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"PIXELS": px})[0]
            for p in (plain, fused))
    timed: dict[str, list[float]] = {"traced": [], "optimized": []}
    for k in range(passes):
        for name, path in (("traced", plain), ("optimized", fused))[:: 1 if k % 2 == 0 else -1]:
            r = quiet_measure(s, lambda: run_workers({"kind": "ort_vision", "path": str(path),  # noqa: B023
                                                      "threads": s.engine_threads, "side": side, "min_reps": 2},
                                                     1, s.vision_window_s), name)
            timed[name].append(r["per_s"])
            log.info("   vision %s: %.3f images/s (foreign cpu %.2f)", name, r["per_s"], r["foreign_cpu_share"])
    med = {k: statistics.median(v) for k, v in timed.items()}
    return {"fused": {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v},
            "max_abs_diff": float(np.abs(a - b).max()), "features_max_abs": float(np.abs(a).max()),
            "images_per_s": timed, "optimized_over_traced": round(med["optimized"] / med["traced"], 4),
            "graph": str(fused)}


# -- servers and load -----------------------------------------------------------------------------

@contextlib.contextmanager
def served_stack(s: CaptionBenchSettings, repository: Path, tag: str) -> Iterator[tuple[Any, Any]]:
    """Triton (response cache off) + the Ray Serve app on `repository`; yields (triton, app)."""
    from loadtests import servers

    env = {"VTFUSE_LIMITS_GENERATION_TIMEOUT_S": str(s.timeout_s), "VTFUSE_LIMITS_REQUEST_TIMEOUT_S": str(s.timeout_s)}
    with servers.triton(repository, tag, timeout=600, response_cache_mb=0) as tr, \
            servers.serve_app(tr.url_grpc, repository, "tiny", tag, env=env) as app:
        yield tr, app


@contextlib.contextmanager
def naive_server(s: CaptionBenchSettings, tag: str) -> Iterator[Any]:
    from loadtests import servers

    port = servers.free_port()
    cmd = [sys.executable, "-m", "loadtests.baseline.caption_app", "--checkpoint", str(s.caption_checkpoint),
           "--name", s.caption_name, "--port", str(port), "--workers", str(s.naive_workers),
           "--threads", str(s.naive_threads)]
    with servers.spawn(cmd, "/healthz", port, f"naive-{tag}", timeout=600) as h:
        servers.wait_workers(h.url, s.naive_workers, 600)
        yield h


def _scrape(url: str | None, model: str) -> dict[str, float]:
    if not url:
        return {}
    with urllib.request.urlopen(url, timeout=10) as r:
        return parse_metrics(r.read().decode(), model)


def _stack_cpu() -> tuple[float, dict[int, tuple[str, float]]]:
    """CPU seconds of this process's descendants (the servers it started), not its own; and per process."""
    table = _proc_table()
    mine = [p for p in _descendants(table, os.getpid()) if p != os.getpid()]
    per: dict[int, tuple[str, float]] = {}
    for pid in mine:
        try:
            cmdline = [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if a]
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        per[pid] = (process_label(cmdline, comm), table[pid][1])
    return sum(table[p][1] for p in mine), per


def cpu_by_label(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per process label between two `_stack_cpu` snapshots, largest first."""
    out: dict[str, float] = {}
    for pid, (label, cpu) in after.items():
        out[label] = out.get(label, 0.0) + cpu - before.get(pid, (label, 0.0))[1]
    return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.01}


async def caption_loop(url: str, path: str, bodies: list[bytes], concurrency: int, warmup_s: float, window_s: float,
                       name: str, timeout_s: float, metrics_url: str | None = None, model: str = "",
                       stream: bool = False) -> dict[str, Any]:
    """A closed loop of `concurrency` workers over `bodies` for warm-up + window; stats over the window.

    Every answer's tokens are kept (warm-up ones too) as (body index, token_ids); `stream` reads each
    text/event-stream and times its events. Triton's generate metrics (`metrics_url`), the client's CPU,
    the servers' CPU and other processes' CPU are taken at the window's start and end.
    """
    import aiohttp

    t_start = time.perf_counter() + warmup_s
    t_end = t_start + window_s
    counter = iter(range(1 << 62))
    lat: list[float] = []
    errors: Counter[str] = Counter()
    tokens: list[tuple[int, list[int]]] = []
    timings: list[dict[str, Any]] = []
    workers: Counter[str] = Counter()
    marks: dict[str, Any] = {}

    def mark(key: str) -> None:
        marks[key] = {"metrics": _scrape(metrics_url, model), "client_cpu": time.process_time(),
                      "stack_cpu": _stack_cpu(), "t": time.perf_counter()}

    async def at(t: float, key: str, foreign: ForeignCpu) -> None:
        await asyncio.sleep(max(0.0, t - time.perf_counter()))
        if key == "start":
            foreign.start()
        else:
            marks["foreign_cpu_s"] = foreign.stop()
        await asyncio.to_thread(mark, key)

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        body = bodies[i % len(bodies)]
        t0 = time.perf_counter()
        try:
            async with session.post(url + path, data=body, headers={"Content-Type": "application/json"}) as r:
                if r.status >= 300:
                    raise RuntimeError(f"http_{r.status}")
                if stream:
                    lines = [(time.perf_counter(), line) async for line in r.content]
                    timing = stream_timing(t0, sse_events(lines))
                    result = timing.pop("result")
                else:
                    result = json.loads(await r.read())
                    timing = None
                pid = r.headers.get("x-worker-pid")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 — every failure is counted, none stops the run
            done = time.perf_counter()
            if t_start <= done <= t_end:
                errors[str(e) if str(e).startswith("http_") else type(e).__name__] += 1
            return
        done = time.perf_counter()
        tokens.append((i % len(bodies), [int(x) for x in result["token_ids"]]))
        if t_start <= done <= t_end:
            lat.append(done - t0)
            if pid:
                workers[pid] += 1
            if timing is not None:
                timings.append(timing)

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < t_end:
            await one(session, next(counter))

    foreign = ForeignCpu()
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency + 4), timeout=timeout) as sess:
        marks_tasks = [asyncio.create_task(at(t_start, "start", foreign)),
                       asyncio.create_task(at(t_end, "end", foreign))]
        tasks = [asyncio.create_task(worker(sess)) for _ in range(concurrency)]
        # Requests still running when the window closes count for nothing: the servers are stopped next.
        await asyncio.wait(tasks, timeout=warmup_s + window_s + 1.0)
        await asyncio.gather(*marks_tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    start, end = marks["start"], marks["end"]
    span = end["t"] - start["t"]
    arr = np.sort(np.asarray(lat) * 1e3)
    idx = np.linspace(0, len(arr) - 1, min(len(arr), CDF_POINTS)).round().astype(int)
    out: dict[str, Any] = {
        "name": name, "concurrency": concurrency, "warmup_s": warmup_s, "window_s": round(span, 2),
        "completed": len(lat), "errors": dict(errors), "captions_per_s": round(len(lat) / span, 4),
        "p50_ms": round(percentile(arr, 50), 1) if len(arr) else None,
        "p99_ms": round(percentile(arr, 99), 1) if len(arr) else None,
        "latencies_ms": [round(float(x), 1) for x in arr[idx]] if len(arr) else [],
        "client_cpu_s": round(end["client_cpu"] - start["client_cpu"], 2),
        "stack_cpu_s": round(end["stack_cpu"][0] - start["stack_cpu"][0], 2),
        "cpu_by_process_s": cpu_by_label(start["stack_cpu"][1], end["stack_cpu"][1]),
        "foreign_cpu_share": round(marks["foreign_cpu_s"] / (span * (os.cpu_count() or 1)), 3),
        "workers": dict(workers), "tokens": tokens,
    }
    if lat:
        out["stack_cpu_s_per_caption"] = round(out["stack_cpu_s"] / len(lat), 3)
    if metrics_url:
        out["metrics_delta"] = metric_delta(start["metrics"], end["metrics"])
        out["rows_per_step"] = rows_per_step(out["metrics_delta"])
    if stream:
        out["stream"] = [{k: round(v, 4) if isinstance(v, float) else v for k, v in t.items()} for t in timings]
    return out


def served_window(s: CaptionBenchSettings, repository: Path, name: str, stream: bool = False,
                  window_s: float | None = None) -> dict[str, Any]:
    """A fresh served stack, one closed-loop window at c=`concurrency` through /v1/caption, then stopped."""
    bodies = caption_bodies(s.images, s.seed, s.image_side, s.caption_name, s.new_tokens, stream)
    t = time.perf_counter()
    with served_stack(s, repository, name) as (tr, app):
        startup = time.perf_counter() - t
        res = asyncio.run(caption_loop(app.url, "/v1/caption", bodies, s.concurrency, s.warmup_s,
                                       window_s or s.window_s, name, s.timeout_s + 60, tr.url_metrics,
                                       f"{s.caption_name}_generate", stream))
    return res | {"side": "served", "startup_s": round(startup, 1), "repository": str(repository)}


def naive_window(s: CaptionBenchSettings, name: str) -> dict[str, Any]:
    """A fresh naive server, one closed-loop window at c=`concurrency`, then stopped."""
    bodies = caption_bodies(s.images, s.seed, s.image_side, s.caption_name, s.new_tokens)
    t = time.perf_counter()
    with naive_server(s, name) as h:
        startup = time.perf_counter() - t
        res = asyncio.run(caption_loop(h.url, "/v1/caption", bodies, s.concurrency, s.warmup_s, s.window_s, name,
                                       s.timeout_s + 60))
    if len(res["workers"]) < s.naive_workers:
        log.warning("   %s: only %d of %d naive workers answered in the window", name, len(res["workers"]),
                    s.naive_workers)
    return res | {"side": "naive", "startup_s": round(startup, 1), "workers_total": s.naive_workers,
                  "torch_threads": s.naive_threads}


def quiet_measure(s: CaptionBenchSettings, fn: Callable[[], dict[str, Any]], label: str) -> dict[str, Any]:
    """`fn()` once other work has left the CPU (up to `s.wait_quiet_s`); taken again once, after waiting for quiet,
    when other processes took more than `CONTENDED` of the cores meanwhile (the first try kept beside it)."""
    if s.wait_quiet_s > 0:
        wait_quiet(timeout_s=s.wait_quiet_s)
    w = fn()
    if w.get("foreign_cpu_share", 0.0) > CONTENDED and s.wait_quiet_s > 0:
        log.warning("   %s: other work took %.0f %% of the cores: measuring again when it is quiet", label,
                    100 * w["foreign_cpu_share"])
        wait_quiet(timeout_s=s.wait_quiet_s)
        first = {k: w.get(k) for k in ("captions_per_s", "per_s", "p50_ms", "completed", "foreign_cpu_share")}
        w = fn() | {"contended_first_try": first}
    return w


def paired_rounds(s: CaptionBenchSettings, sides: dict[str, Callable[[str], dict[str, Any]]], prefix: str
                  ) -> list[dict[str, Any]]:
    """`s.rounds` rounds of one window per side, back to back, the order alternating; a round where either side
    strays more than `s.stray` from its median is run once more (in that round's order) and marked. Each window
    waits for quiet first and is measured again once when other work took the cores meanwhile (`quiet_measure`)."""
    names = tuple(sides)

    def one(r: int, rerun: bool = False) -> dict[str, Any]:
        sides_in_order = order(names, r)
        rnd: dict[str, Any] = {"round": r, "first": sides_in_order[0], "rerun": rerun, "windows": {}}
        for side in sides_in_order:
            name = f"{prefix}-{side}-r{r}{'-rerun' if rerun else ''}"
            w = quiet_measure(s, lambda: sides[side](name), name)  # noqa: B023 — called at once
            rnd["windows"][side] = w
            rnd[side] = w["captions_per_s"]
            log.info("   round %d%s %s: %.3f captions/s (p50 %s ms, %d done, errors %s, foreign cpu %.2f)", r,
                     " (re-run)" if rerun else "", side, w["captions_per_s"], w["p50_ms"], w["completed"],
                     w["errors"], w["foreign_cpu_share"])
        return rnd

    rounds = [one(r) for r in range(s.rounds)]
    if len(rounds) > 2:
        for i in strayed([{k: r[k] for k in names} for r in rounds], s.stray, names):
            first = rounds[i]
            rounds[i] = one(first["round"], rerun=True) | {"first_try": {k: first[k] for k in names}}
    return rounds


def vqa(s: CaptionBenchSettings) -> dict[str, Any]:
    """Sequential /v1/vqa calls, 1 question and `vqa_questions` on a fresh image each, alternating."""
    import httpx

    pairs = vqa_bodies(s.vqa_warmups + s.vqa_requests, s.seed + 7, s.image_side, s.vqa_name, s.vqa_questions)
    model = f"{s.vqa_name}_generate"
    rows: list[dict[str, Any]] = []
    with served_stack(s, s.vqa_repository, "caption-vqa") as (tr, app), httpx.Client(timeout=s.timeout_s) as client:
        fc = ForeignCpu()
        for k, (one_q, many_q) in enumerate(pairs):
            if k == s.vqa_warmups:
                fc.start()
                t_window = time.perf_counter()
            order = ((1, one_q), (s.vqa_questions, many_q)) if k % 2 == 0 else ((s.vqa_questions, many_q), (1, one_q))
            for n, body in order:
                before = _scrape(tr.url_metrics, model)
                t = time.perf_counter()
                r = client.post(app.url + "/v1/vqa", content=body, headers={"Content-Type": "application/json"})
                dt = time.perf_counter() - t
                if r.status_code != 200:
                    raise RuntimeError(f"/v1/vqa: HTTP {r.status_code}: {r.text[:300]}")
                d = metric_delta(before, _scrape(tr.url_metrics, model))
                rows.append({"request": k, "questions": n, "warmup": k < s.vqa_warmups, "s": round(dt, 4),
                             "generated_tokens": d.get("vtfuse_generate_tokens_total"),
                             "decode_steps": d.get("vtfuse_generate_decode_steps_total"),
                             "answers": [a["answer"] for a in r.json()["answers"]]})
        share = fc.stop() / ((time.perf_counter() - t_window) * (os.cpu_count() or 1))
    return {"requests": rows, "foreign_cpu_share": round(share, 3)}


# -- summary, plot, run ---------------------------------------------------------------------------

def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """summary.json from raw.json: the figures, what each is computed from, and provenance."""
    s = raw.get("settings") or {}
    rounds = raw.get("rounds") or []
    value, which = headline(rounds, s.get("stray", STRAY))
    median = next((r for r in rounds if r["round"] == which.get("median_round")), None)
    served_windows = [r["windows"]["served"] for r in rounds if "served" in r.get("windows", {})]
    naive_windows = [r["windows"]["naive"] for r in rounds if "naive" in r.get("windows", {})]
    stream = raw.get("stream") or {}
    rows_delta = add_deltas([w.get("metrics_delta") or {} for w in served_windows])
    served_tokens = [t for w in [*served_windows, stream] for t in (w.get("tokens") or [])]
    tokens = compare_tokens([t for w in naive_windows for t in w.get("tokens") or []], served_tokens) \
        if naive_windows else None
    timings = stream.get("stream") or []
    ttft = quantiles([t["ttft_s"] for t in timings])
    tpot = quantiles([t["tpot_s"] for t in timings if t.get("tpot_s") is not None], 1e3, 2)
    tdelta = stream.get("metrics_delta") or {}
    triton_ttft = {f"p{int(q * 100)}": (round(x, 4) if (x := histogram_quantile(q, tdelta, TTFT_METRIC)) is not None
                                          else None) for q in (0.5, 0.99)}
    vq_raw = raw.get("vqa") or {}
    timed = [r for r in vq_raw.get("requests") or [] if not r["warmup"]]
    one = [r["s"] for r in timed if r["questions"] == 1]
    many = [r["s"] for r in timed if r["questions"] != 1]
    vq = ratio(statistics.median(many), statistics.median(one)) if one and many else None

    def window_row(w: dict[str, Any]) -> dict[str, Any]:
        return {k: w.get(k) for k in ("name", "captions_per_s", "completed", "p50_ms", "p99_ms", "errors",
                                      "foreign_cpu_share", "client_cpu_s", "stack_cpu_s", "stack_cpu_s_per_caption",
                                      "rows_per_step", "workers", "startup_s", "cpu_by_process_s",
                                      "contended_first_try")}

    out: dict[str, Any] = {
        "caption_vs_naive": value,
        "caption_vs_naive_detail": {
            "target": f"{TARGETS['caption_vs_naive'][0]} {TARGETS['caption_vs_naive'][1]}",
            "served_captions_per_s": median["served"] if median else None,
            "naive_captions_per_s": median["naive"] if median else None,
            "served_p50_ms": median["windows"]["served"]["p50_ms"] if median else None,
            "naive_p50_ms": median["windows"]["naive"]["p50_ms"] if median else None,
            "rounds": [{"round": r["round"], "first": r["first"], "rerun": r["rerun"],
                        "ratio": ratio(r.get("served"), r.get("naive")), "served": r.get("served"),
                        "naive": r.get("naive"), "first_try": r.get("first_try"),
                        "kept": r["round"] in which["kept"],
                        "windows": {k: window_row(w) for k, w in r["windows"].items()}} for r in rounds],
            "kept": which["kept"], "left_out": which["left_out"], "median_round": which.get("median_round"),
            "tokens": tokens,
            "concurrency": s.get("concurrency"), "new_tokens": s.get("new_tokens"), "window_s": s.get("window_s"),
        },
        "decode_rows_per_step_c16": rows_per_step(rows_delta),
        "decode_rows_per_step_c16_detail": {
            "target": ">= 8.0", "steps": rows_delta.get(f"{ROWS_METRIC}_count"),
            "rows": rows_delta.get(f"{ROWS_METRIC}_sum"),
            # rows per step = captions/s × tokens a caption ÷ steps/s: the decoder steps whenever it has a row
            "steps_per_s": round(rows_delta.get(f"{ROWS_METRIC}_count", 0.0) / span, 3) if (
                span := sum(w.get("window_s") or 0.0 for w in served_windows)) else None,
            "captions_per_s": round(sum(w.get("completed") or 0 for w in served_windows) / span, 4) if span else None,
            "per_window": [w.get("rows_per_step") for w in served_windows],
            "stream_window": stream.get("rows_per_step"),
        },
        "ttft_p50_s_c16": ttft["p50"], "ttft_p99_s_c16": ttft["p99"],
        "tpot_p50_ms_c16": tpot["p50"], "tpot_p99_ms_c16": tpot["p99"],
        "ttft_tpot_detail": {
            "streams": len(timings), "client": {"ttft_s": ttft, "tpot_ms": tpot},
            "triton_ttft_histogram_s": triton_ttft, "triton_ttft_observations":
                tdelta.get(f"{TTFT_METRIC}_count"),
            "stream_window": window_row(stream) if stream else None,
            "tokens_per_stream": sorted(Counter(t["tokens"] for t in timings).items()),
        },
        "vqa_gen_8q_over_1q": vq,
        "vqa_gen_8q_over_1q_detail": {
            "target": "<= 3.0", "one_question_median_s": round(statistics.median(one), 4) if one else None,
            "eight_questions_median_s": round(statistics.median(many), 4) if many else None,
            "one_question_s": one, "eight_questions_s": many,
            "generated_tokens_one": [r["generated_tokens"] for r in timed if r["questions"] == 1],
            "generated_tokens_eight": [r["generated_tokens"] for r in timed if r["questions"] != 1],
            "foreign_cpu_share": vq_raw.get("foreign_cpu_share"),
        },
        "cost_model": raw.get("cost"),
        "checkpoints": raw.get("checkpoints"), "imports": raw.get("imports"),
        "served_repository": raw.get("served_repository"), "variant": s.get("variant"),
        "quick": s.get("quick"),
        "settings": s,
    }
    out["targets"] = {k: {"target": f"{op} {goal}", "met": None if out[k] is None else
                          (out[k] >= goal if op == ">=" else out[k] <= goal)} for k, (op, goal) in TARGETS.items()}
    out.update({k: raw.get(k) for k in ("command", "commit", "machine", "versions", "started", "stage_seconds",
                                        "cpu_busy_before_stage", "wall_s", "errors", "stage_runs")})
    return out


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Left: captions/s per paired round, both sides; right: the decoder step's time per row count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = summary["caption_vs_naive_detail"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    rounds = d["rounds"]
    x = np.arange(len(rounds))
    a.bar(x - 0.2, [r["served"] or 0 for r in rounds], 0.4, label="vtfuse (Triton + Ray Serve)", color="tab:blue")
    a.bar(x + 0.2, [r["naive"] or 0 for r in rounds], 0.4, label="naive (FastAPI + generate())", color="tab:gray")
    a.set_xticks(x, [f"r{r['round']}{'*' if r['rerun'] else ''}" for r in rounds])
    a.set_ylabel("captions/s (closed loop, c=16)")
    v = summary.get("caption_vs_naive")
    a.set_title(f"{d.get('new_tokens')} tokens a caption" + (f": median ratio {v:.2f}×" if v else ""), fontsize=10)
    a.legend(fontsize=8)
    a.grid(True, axis="y", alpha=0.3)
    dec = (summary.get("cost_model") or {}).get("decoder") or {}
    if dec.get("rows"):
        rows = [r["rows"] for r in dec["rows"]]
        b.plot(rows, [r["step_ms"] for r in dec["rows"]], "o-", label="step, ms")
        b.plot(rows, [r["ms_per_row"] for r in dec["rows"]], "s--", label="ms per row (a token)")
        b.set_xscale("log", base=2)
        b.set_xlabel("rows per decoder step")
        b.set_title(f"decoder step ({dec.get('threads')} threads, {dec.get('cross_len')} image tokens)", fontsize=10)
        b.legend(fontsize=8)
        b.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


STAGES = ("cost", "rounds", "stream", "vqa")


class Run:
    """One run: stages fill raw.json; summary.json and the plot are computed from it.

    With `only` some of the measuring stages, the others' results stay as an earlier run in `out` left them
    in raw.json; `stage_runs` says which run measured each.
    """

    def __init__(self, s: CaptionBenchSettings, out: Path, only: tuple[str, ...] = STAGES) -> None:
        self.s, self.out, self.only = s, out, only
        # blip_bench's stage runner: timings, failures recorded, the CPU's business before measuring stages.
        self.stager = bb.Run(replace(bb.BlipBenchSettings(), wait_quiet_s=s.wait_quiet_s), out)
        earlier = out / "raw.json"
        keep = set(only) != set(STAGES) and earlier.exists()
        self.raw: dict[str, Any] = json.loads(earlier.read_text()) if keep else {}
        for stage in only:
            self.raw.pop(stage, None)
        self.raw["settings"] = s.to_json()

    def stage(self, name: str, fn: Callable[[], Any], measures: bool = False) -> Any:
        return self.stager.stage(name, fn, measures)

    def run(self, command: str) -> dict[str, Any]:
        started = time.time()
        s = self.s
        raw = self.raw
        raw["checkpoints"] = {
            "caption": self.stage("checkpoint-caption", lambda: ensure_checkpoint(s.caption_checkpoint, "caption",
                                                                                  s.quick, s.seed)),
            "vqa": self.stage("checkpoint-vqa", lambda: ensure_checkpoint(s.vqa_checkpoint, "vqa", s.quick, s.seed)),
        }
        raw["imports"] = {
            "caption": self.stage("import-caption", lambda: ensure_import(
                s.caption_checkpoint, s.caption_name, s.caption_repository, s.work_dir / s.caption_name,
                s.base_repository)) if raw["checkpoints"]["caption"] else None,
            "vqa": self.stage("import-vqa", lambda: ensure_import(
                s.vqa_checkpoint, s.vqa_name, s.vqa_repository, s.work_dir / s.vqa_name, s.base_repository))
            if raw["checkpoints"]["vqa"] else None,
        }
        if raw["imports"]["caption"]:
            repo = served_repository(s)
            raw["served_repository"] = str(repo)
            if "cost" in self.only:
                raw["cost"] = self.stage("cost", lambda: cost(s, s.caption_repository), measures=True)
            if "rounds" in self.only:
                raw["rounds"] = self.stage("rounds", lambda: paired_rounds(s, {
                    "served": lambda name: served_window(s, repo, name),
                    "naive": lambda name: naive_window(s, name),
                }, "caption"), measures=True)
            if "stream" in self.only:
                raw["stream"] = self.stage("stream", lambda: quiet_measure(s, lambda: served_window(
                    s, repo, "caption-stream", stream=True, window_s=s.stream_window_s), "stream"), measures=True)
        if raw["imports"]["vqa"] and "vqa" in self.only:
            raw["vqa"] = self.stage("vqa", lambda: quiet_measure(s, lambda: vqa(s), "vqa"), measures=True)
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
        commit = git_commit()
        runs = raw.setdefault("stage_runs", {})
        for stage in self.only:
            if stage in raw:
                runs[stage] = {"command": command, "commit": commit, "started": when, "variant": list(s.variant)}
        raw.update(command=command, commit=commit, machine=machine(), versions=versions(), started=when,
                   stage_seconds=self.stager.timings, cpu_busy_before_stage=self.stager.busy_before,
                   errors=self.stager.errors, wall_s=round(time.time() - started, 1))
        write_json(self.out / "raw.json", raw)
        summary = summarize(raw)
        write_json(self.out / "summary.json", summary)
        if summary["caption_vs_naive_detail"]["rounds"] or summary["cost_model"]:
            self.stage("plot", lambda: plot(summary, self.out / "caption.png"))
        return summary


def rebuild(folder: Path) -> dict[str, Any]:
    """summary.json (and the plot) again from a run's raw.json."""
    summary = summarize(json.loads((folder / "raw.json").read_text()))
    write_json(folder / "summary.json", summary)
    plot(summary, folder / "caption.png")
    return summary


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny BLIP generation checkpoints, seconds-long windows")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default loadtests/results/caption, --quick build/caption-bench-quick)")
    p.add_argument("--only", nargs="+", choices=STAGES, default=list(STAGES), help="measuring stages to run")
    p.add_argument("--rounds", type=int, help="paired rounds (default 5)")
    p.add_argument("--window", type=float, help="seconds of each measured window (default 90)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up before each window (default 30)")
    p.add_argument("--variant", nargs="*", default=[], metavar="KEY=VALUE",
                   help="served repository settings: image_instances, image_threads, decoder_threads, max_rows, "
                   "prepare_workers (a copy under build/bench/)")
    p.add_argument("--wait-quiet", type=float, default=0.0,
                   help="before each measuring stage, wait up to this many seconds for other work to leave the CPU")
    p.add_argument("--lever", action="store_true",
                   help="measure --variant against the imported repository (served windows only) into OUT/levers.json")
    p.add_argument("--lever-vision-optimizer", action="store_true",
                   help="ONNX Runtime's transformer optimizer on the vision tower, in-process, into OUT/levers.json")
    p.add_argument("--against", nargs="*", default=[], metavar="KEY=VALUE",
                   help="--lever: the baseline's settings (default: the repository as imported)")
    p.add_argument("--rebuild", type=Path, metavar="DIR", help="rewrite DIR/summary.json from DIR/raw.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one in-process timing job (JSON), for `cost`
    args = p.parse_args(args_in)
    if args.worker:
        sys.stdout.write(json.dumps(worker_job(json.loads(args.worker))) + "\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.rebuild:
        rebuild(args.rebuild)
        return 0
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    s = CaptionBenchSettings.quick_run() if args.quick else CaptionBenchSettings()
    overrides: dict[str, Any] = {"wait_quiet_s": args.wait_quiet,
                                 "variant": tuple((k, v) for k, v in (a.split("=", 1) for a in args.variant))}
    for key, value in (("rounds", args.rounds), ("window_s", args.window), ("warmup_s", args.warmup)):
        if value is not None:
            overrides[key] = value
    s = replace(s, **overrides)
    out = args.out or (REPO_ROOT / ("build/caption-bench-quick" if args.quick else "loadtests/results/caption"))
    out.mkdir(parents=True, exist_ok=True)
    command = "PYTHONPATH=. python -m loadtests.caption_bench " + " ".join(shlex.quote(a) for a in args_in)
    if args.lever_vision_optimizer:
        res = vision_optimizer(s) | {"command": command, "commit": git_commit(),
                                     "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        path = out / "levers.json"
        write_json(path, (json.loads(path.read_text()) if path.exists() else {}) | {"vision_optimizer": res})
        log.info("vision optimizer: %s, optimized ÷ traced %s, max abs diff %.2g", res["fused"],
                 res["optimized_over_traced"], res["max_abs_diff"])
        return 0
    if args.lever:
        if not s.variant:
            p.error("--lever needs --variant")
        against = tuple((k, v) for k, v in (a.split("=", 1) for a in args.against))
        res = lever(s, against) | {"command": command, "commit": git_commit(),
                                   "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        path = out / "levers.json"
        levers = json.loads(path.read_text()) if path.exists() else {}
        levers[" ".join(args.variant) + (f" against {' '.join(args.against)}" if args.against else "")] = res
        write_json(path, levers)
        log.info("lever %s: variant ÷ baseline %s (rounds %s)", " ".join(args.variant), res["variant_over_baseline"],
                 [r["ratio"] for r in res["rounds"]])
        return 0
    summary = Run(s, out, tuple(args.only)).run(command)
    log.info("summary: %s", out / "summary.json")
    for key in ("caption_vs_naive", "decode_rows_per_step_c16", "ttft_p50_s_c16", "ttft_p99_s_c16", "tpot_p50_ms_c16",
                "tpot_p99_ms_c16", "vqa_gen_8q_over_1q"):
        log.info("   %-26s %s", key, summary[key])
    if summary["errors"]:
        log.error("failed stages: %s", ", ".join(summary["errors"]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
