"""BLIP-base retrieval here: imported engines' efficiency, /v1/retrieve against a naive server, /v1/match's wire.

Steps (each stage's failure is recorded in summary.json `errors`, the others still run; summary.json
is written after every measuring stage, so a run cut short keeps what it measured):

1. a BLIP-base-shaped random `BlipForImageTextRetrieval` checkpoint (BlipConfig defaults:
   ViT-B/16 at 384 px, BERT-base text with cross-attention, 256-d ITC projections; a WordPiece
   vocabulary of the shapes-world words padded with `[unused{i}]` to the config's 30 524) with
   its BlipProcessor, in build/blip-base-random (reused when there);
2. `import_hf(..., precision="fp32")` into a copy of the built embedded repository
   (build/model_repository-blip; the native `tiny` stays, so the app's /readyz default works),
   the fp32 ONNX files kept in build/blip-bench-onnx (reused when the checkpoint is unchanged);
3. `blip_engine_efficiency`: in-process ONNX Runtime (2 intra-op threads, the served session
   options) items/s × FLOPs/item (loadtests.flops, every dynamic axis fixed) ÷ the fp32 matmul
   ceiling, for the image encoder at batch 1 and 8 and the fusion at batch 16 × 35 tokens;
   the headline is the image encoder at its better batch;
4. `blip_retrieve64_vs_naive` / `blip_retrieve64_all_vs_naive`: p50 latency of one image × 64
   shapes-world captions (`top_k` 5), sequential requests after one warm-up, through /v1/retrieve of
   the served stack (Triton on the repository + the Ray Serve app as deploy/serve_config.yaml
   composes it) with the default shortlist (16: ITC shortlist, ITM on those) and, on a fresh
   Triton + app (so the response cache holds none of the images), with `shortlist: "all"` (ITM on
   every caption: the exact ranking); and through the naive server (loadtests/baseline/blip_app.py:
   FastAPI + transformers, every caption through the ITM head, 2 uvicorn workers × 1 torch thread).
   ratio = naive p50 ÷ served p50. `blip_retrieve64_top5_same_order` / `..._top5_overlap` /
   `..._top1_agreement`: shortlist 16 against the exact ranking (shortlist "all"), request by request;
   the top index of the served and naive answers is compared on every request too;
5. `blip_match64_before_over_after`: one image × 64 texts, sequential after a warm-up, straight to
   Triton with the app's own gRPC client (serving.triton.client) and the tensors the app sends
   (decoded and tokenized in-process as the app does): after = `NAME_itm` with the pixels once and
   the 64 token rows (today's /v1/match); before = `NAME_image_encoder`, then `NAME_fusion` with the
   image features repeated for every row (the pipeline before b852799); the two paths alternate on
   the same images, on a Triton with the response cache off. Bytes per request: numpy nbytes of every
   input of each Triton call plus the outputs returned (the tensor payload, not gRPC framing). The
   same images also go through /v1/match of the served app (default shortlist session) end to end;
6. summary.json (figures, settings, commit, machine, command, stage timings) and a p50 plot.

`--quick` uses tests.hf.checkpoints.build_blip's tiny sizes (64 px, 2 layers) in build/*-quick
paths, so the whole tool runs in a few minutes; its figures say nothing about speed.

    python -m loadtests.blip_bench --out loadtests/results/blip [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import random
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.common import REPO_ROOT, ForeignCpu, cpu_busy, git_commit, machine, versions, wait_quiet, write_json
from serving.shapes import world

log = logging.getLogger("loadtests.blip_bench")

NAME = "blip-base"
BASE_REPO = REPO_ROOT / "model_repository"
TARGET_RATIO = 5.0
SHORTLIST = 16  # the served ITC shortlist for 64 captions at top_k 5 (serving.app.router.shortlist_size)
ENGINE_MAX_BATCH = 64  # the app's engine_max_batch (serving.app.settings): rows per engine request at most
MB = 1e6  # bytes in the reported megabytes (decimal, as the commit that moved the features off the wire counts)
STAMP = "blip_bench_import.json"  # in the bench repository: what was imported, so a rerun can reuse it


@dataclass(frozen=True)
class BlipBenchSettings:
    """Paths and sizes of one run."""

    quick: bool = False
    name: str = NAME
    checkpoint: Path = REPO_ROOT / "build" / "blip-base-random"
    repository: Path = REPO_ROOT / "build" / "model_repository-blip"
    work_dir: Path = REPO_ROOT / "build" / "blip-bench-onnx"
    base_repository: Path = BASE_REPO
    seed: int = 0
    captions: int = 64
    top_k: int = 5
    image_side: int = 256  # rendered scene side; both servers resize it to the model's 384
    requests: int = 10  # timed sequential requests per server (shortlist 16, shortlist "all", naive)
    warmups: int = 1
    naive_budget_s: float = 2400.0  # timed naive requests are cut to fit this (never below 1): 10 at ~182 s
    match_requests: int = 10  # timed sequential /v1/match-shaped requests per path (after, before, the app)
    match_texts: int = 64
    image_batches: tuple[int, ...] = (1, 8)
    fusion_batch: int = 16
    fusion_tokens: int = 35
    engine_threads: int = 2
    engine_min_time_s: float = 6.0
    engine_min_reps: int = 3
    matmul_n: int = 4096
    matmul_reps: int = 5
    request_timeout_s: float = 600.0  # the served app's deadline per request (default 10 s; contention headroom)
    naive_workers: int = 2
    naive_threads: int = 1
    wait_quiet_s: float = 0.0  # before each measuring stage, wait up to this long for other work to leave the CPU

    @classmethod
    def quick_run(cls) -> BlipBenchSettings:
        b = REPO_ROOT / "build"
        return cls(
            quick=True, name="blip-quick", checkpoint=b / "blip-quick-random",
            repository=b / "model_repository-blip-quick", work_dir=b / "blip-bench-onnx-quick",
            engine_min_time_s=0.3, matmul_n=2048, matmul_reps=2, naive_budget_s=120.0, requests=3,
            match_requests=3,
        )

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


# -- pure parts -----------------------------------------------------------------------------------

def padded_vocab(words: list[str] | tuple[str, ...], size: int) -> list[str]:
    """`words` followed by `[unused{i}]` tokens up to `size` entries (a BERT-sized WordPiece vocabulary)."""
    if len(words) > size:
        raise ValueError(f"{len(words)} words do not fit a vocabulary of {size}")
    return list(words) + [f"[unused{i}]" for i in range(size - len(words))]


def captions_for(scene: world.Scene, rng: random.Random, n: int) -> tuple[list[str], int]:
    """`n` distinct shapes-world captions for one scene: its own caption, one-attribute distractors, other
    scenes' captions, shuffled; returns them and the index of the true one."""
    true = world.caption(world.scene_items(scene), rng)
    out = [true]
    for c in world.distractor_captions(scene, rng, min(12, n - 1)):
        if c not in out and len(out) < n:
            out.append(c)
    while len(out) < n:
        c = world.random_caption_negative(scene, rng)
        if c not in out:
            out.append(c)
    rng.shuffle(out)
    return out, out.index(true)


@dataclass(frozen=True)
class RetrieveRequest:
    """One timed request: the JSON both servers get, and which caption describes the image."""

    body: dict[str, Any]
    true_index: int
    side: int


def make_requests(n: int, seed: int, captions: int, top_k: int, side: int, model: str) -> list[RetrieveRequest]:
    """`n` one-image × `captions`-caption /v1/retrieve bodies (PNG renders of random scenes)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = world.random_scene(rng)
        png = world.encode(world.render(scene, side, supersample=2), "PNG")
        texts, true = captions_for(scene, rng, captions)
        body = {"model": model, "image": base64.b64encode(png).decode(), "texts": texts, "top_k": top_k}
        out.append(RetrieveRequest(body, true, side))
    return out


def p50(values: list[float]) -> float | None:
    """Median, None for no values."""
    return float(statistics.median(values)) if values else None


def ratio(naive_p50_ms: float | None, served_p50_ms: float | None) -> float | None:
    """naive p50 ÷ served p50 (how many times faster the served stack answers), None when either is missing."""
    if naive_p50_ms is None or not served_p50_ms:
        return None
    return round(naive_p50_ms / served_p50_ms, 3)


def efficiency(items_per_s: float, flops_per_item: float, ceiling_flops_per_s: float) -> float:
    """Achieved FLOP/s ÷ the matmul ceiling."""
    return round(items_per_s * flops_per_item / ceiling_flops_per_s, 4)


def requests_within(budget_s: float, seconds_per_request: float, wanted: int) -> int:
    """How many of `wanted` requests fit `budget_s` at `seconds_per_request` (at least 1)."""
    if seconds_per_request <= 0:
        return wanted
    return max(1, min(wanted, int(budget_s // seconds_per_request)))


def compare_tops(served: list[dict[str, Any]], naive: list[dict[str, Any]],
                 shortlists: list[list[int]] | None = None) -> dict[str, Any]:
    """Per request: both answers' top index, whether they agree, and the scores of captions both returned.

    `served` / `naive` are the `results` lists of each response (best first), request by request;
    `shortlists`, where given, the ITC shortlist the served path re-ranks (computed in-process from
    the same engines): a different top is explained when the naive top is not in it.
    """
    rows = []
    for i, (s, n) in enumerate(zip(served, naive)):
        s_idx = [r["index"] for r in s]
        n_idx = [r["index"] for r in n]
        n_score = {r["index"]: r["score"] for r in n}
        common = [r for r in s if r["index"] in n_score]
        rows.append({
            "served_top": s_idx[0] if s_idx else None,
            "naive_top": n_idx[0] if n_idx else None,
            "same_top": bool(s_idx and n_idx and s_idx[0] == n_idx[0]),
            "naive_top_in_served_top_k": bool(n_idx and n_idx[0] in s_idx),
            "common_in_top_k": len(common),
            "common_score_max_abs_diff": max((abs(r["score"] - n_score[r["index"]]) for r in common), default=None),
            "naive_top1_minus_top2": (n[0]["score"] - n[1]["score"]) if len(n) > 1 else None,
            "served": [[r["index"], round(r["score"], 6)] for r in s],
            "naive": [[r["index"], round(r["score"], 6)] for r in n],
        })
        if shortlists is not None and i < len(shortlists):
            sl = shortlists[i]
            rows[-1]["itc_shortlist"] = list(sl)
            rows[-1]["naive_top_in_shortlist"] = bool(n_idx and n_idx[0] in sl)
    out: dict[str, Any] = {"all_same_top": bool(rows) and all(r["same_top"] for r in rows),
                           "same_top": sum(r["same_top"] for r in rows), "compared": len(rows)}
    diffs = [r["common_score_max_abs_diff"] for r in rows if r["common_score_max_abs_diff"] is not None]
    out["common_score_max_abs_diff"] = max(diffs, default=None)
    if rows and all("naive_top_in_shortlist" in r for r in rows):
        # Same top wherever the naive best survives the shortlist, different only where it does not.
        out["differences_explained_by_shortlist"] = all(r["same_top"] == r["naive_top_in_shortlist"] for r in rows)
    return out | {"requests": rows}


def top_indices(results: list[list[dict[str, Any]]]) -> list[list[int]]:
    """The ranked indices of each /v1/retrieve answer (its `results`, best first)."""
    return [[int(r["index"]) for r in res] for res in results]


def topk_agreement(approx: Sequence[Sequence[int]], exact: Sequence[Sequence[int]], k: int = 5,
                   shortlists: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
    """How a ranking's top k (shortlist 16) agrees with the exact ranking's (shortlist "all"), request by request.

    Per request: whether the two top-k index lists are equal in order, how many indices the two top-k
    sets share, whether the top 1 is the same. Over the requests: the share equal in order, the mean
    overlap (indices, and as a share of k), the share with the same top 1.

    With `shortlists` (the ITC shortlist each approximate answer re-ranked): how many of the exact top k
    the shortlist holds, and whether the approximate top k starts with exactly those, in the exact order
    (what re-ranking the shortlist by the same ITM scores gives: a difference is then the shortlist's).
    """
    rows: list[dict[str, Any]] = []
    same = top1 = overlaps = 0
    for i, (a_all, e_all) in enumerate(zip(approx, exact)):
        a, e = [int(x) for x in a_all][:k], [int(x) for x in e_all][:k]
        row: dict[str, Any] = {"same_order": a == e, "overlap": len(set(a) & set(e)),
                               "same_top1": bool(a and e and a[0] == e[0]), "approx": a, "exact": e}
        if shortlists is not None and i < len(shortlists):
            held = [x for x in e if x in set(shortlists[i])]
            row["exact_in_shortlist"] = len(held)
            row["consistent_with_shortlist"] = a[:len(held)] == held
        same, top1, overlaps = same + row["same_order"], top1 + row["same_top1"], overlaps + row["overlap"]
        rows.append(row)
    n = len(rows)
    overlap = overlaps / n if n else None
    out: dict[str, Any] = {
        "k": k, "compared": n,
        "same_order": same, "same_order_share": round(same / n, 4) if n else None,
        "mean_overlap": None if overlap is None else round(overlap, 4),
        "mean_overlap_share": None if overlap is None else round(overlap / k, 4),
        "same_top1": top1, "same_top1_share": round(top1 / n, 4) if n else None,
    }
    if rows and all("exact_in_shortlist" in r for r in rows):
        out["mean_exact_in_shortlist"] = round(sum(r["exact_in_shortlist"] for r in rows) / n, 4)
        out["differences_explained_by_shortlist"] = all(r["consistent_with_shortlist"] for r in rows)
    return out | {"requests": rows}


def tensor_bytes(tensors: Mapping[str, np.ndarray]) -> int:
    """numpy nbytes of every tensor of one Triton call's inputs (or outputs)."""
    return sum(int(np.asarray(a).nbytes) for a in tensors.values())


def payload(calls: Sequence[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]]) -> dict[str, int]:
    """Tensor payload of one request's Triton calls, each given as (inputs sent, outputs returned): bytes each way.

    gRPC and protobuf framing are not counted (a few hundred bytes a call beside these megabytes).
    """
    sent = sum(tensor_bytes(i) for i, _ in calls)
    received = sum(tensor_bytes(o) for _, o in calls)
    return {"calls": len(calls), "sent": sent, "received": received, "total": sent + received}


def fusion_feeds(image_features: np.ndarray, ids: np.ndarray, mask: np.ndarray,
                 max_rows: int) -> list[dict[str, np.ndarray]]:
    """The fusion requests /v1/match sent before `NAME_itm` (b852799's parent, Pipeline._texts_through_fusion):
    one image's features repeated for every text row, with its ids and mask, split into requests of at
    most `max_rows` rows as Pipeline.infer splits them (min(engine_max_batch, the fusion's max_batch_size))."""
    from serving.app.router import chunks

    n = ids.shape[0]
    feats = image_features if image_features.shape[0] == n else np.repeat(image_features, n, axis=0)
    feed = {"IMAGE_FEATURES": feats, "INPUT_IDS": ids, "ATTENTION_MASK": mask}
    return [{k: v[sl] for k, v in feed.items()} for sl in chunks(n, max_rows)]


def itm_probability(logits: np.ndarray) -> np.ndarray:
    """ITM logits (N, 2) → probability of "match" per row (softmax, index 1), as the app scores them."""
    x = np.asarray(logits, dtype=np.float64).reshape(-1, 2)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return (e[:, 1] / e.sum(axis=1))


def as_match(r: RetrieveRequest) -> RetrieveRequest:
    """A /v1/match body (image, texts) from a /v1/retrieve one."""
    return replace(r, body={k: v for k, v in r.body.items() if k in ("model", "image", "texts")})


def with_shortlist(r: RetrieveRequest, shortlist: int | str | None) -> RetrieveRequest:
    """The same /v1/retrieve body with `shortlist` set (None: the default, the field left out)."""
    return r if shortlist is None else replace(r, body=r.body | {"shortlist": shortlist})


def compare(lat: dict[str, Any], shortlists: list[list[int]] | None, k: int) -> dict[str, Any]:
    """The comparisons of the retrieve answers the latency stages got so far (each needs both of its sides)."""
    out: dict[str, Any] = {}
    res = {side: (lat.get(side) or {}).get("results") for side in ("served", "served_all", "naive")}
    if res["served"] is not None and res["naive"] is not None:
        out["top_index"] = compare_tops(res["served"], res["naive"], shortlists)
    if res["served_all"] is not None and res["naive"] is not None:
        out["top_index_all"] = compare_tops(res["served_all"], res["naive"])
    if res["served"] is not None and res["served_all"] is not None:
        out["shortlist_agreement"] = topk_agreement(top_indices(res["served"]), top_indices(res["served_all"]), k,
                                                    shortlists)
    return out


_BULKY = ("results", "scores", "probabilities_after")  # per-request answers: the comparisons keep what matters of them


def _public(d: dict[str, Any] | None) -> dict[str, Any]:
    return {k: (_public(v) if isinstance(v, dict) else v) for k, v in (d or {}).items() if k not in _BULKY}


def _mb(n: float | None) -> float | None:
    return None if n is None else round(n / MB, 3)


def summarize(raw: dict[str, Any], settings: BlipBenchSettings, command: str, started: float,
              errors: dict[str, str], timings: dict[str, float]) -> dict[str, Any]:
    """summary.json: the figures with what each is computed from, settings, provenance."""
    eng = raw.get("engines") or {}
    rows = eng.get("rows") or []
    image_rows = [r for r in rows if r["engine"] == "image_encoder"]
    head = max(image_rows, key=lambda r: r["efficiency"]) if image_rows else None
    lat = raw.get("latency") or {}
    served, served_all, naive = (_public(lat.get(k)) for k in ("served", "served_all", "naive"))
    r = ratio(naive.get("p50_ms"), served.get("p50_ms"))
    r_all = ratio(naive.get("p50_ms"), served_all.get("p50_ms"))
    agree = lat.get("shortlist_agreement") or {}
    m = raw.get("match") or {}
    after, before = m.get("after") or {}, m.get("before") or {}
    return {
        "blip_engine_efficiency": head["efficiency"] if head else None,
        "blip_engine_efficiency_detail": {
            "headline": f"image_encoder at batch {head['batch']}" if head else None,
            "rows": rows,
            "ceiling": eng.get("ceiling"),
            "definition": "in-process ONNX Runtime items/s × FLOPs/item ÷ fp32 matmul ceiling (loadtests.flops)",
        },
        "blip_retrieve64_vs_naive": r,
        "blip_retrieve64_all_vs_naive": r_all,
        "blip_retrieve64_same_top": (f"{top['same_top']}/{top['compared']}" if (top := lat.get("top_index")) else None),
        "blip_retrieve64_top5_same_order": agree.get("same_order_share"),
        "blip_retrieve64_top5_overlap": agree.get("mean_overlap_share"),
        "blip_retrieve64_top1_agreement": agree.get("same_top1_share"),
        "blip_retrieve64_vs_naive_detail": {
            "target": f">= {TARGET_RATIO}",
            "reached": None if r is None else r >= TARGET_RATIO,
            "served_p50_ms": served.get("p50_ms"),
            "served_all_p50_ms": served_all.get("p50_ms"),
            "naive_p50_ms": naive.get("p50_ms"),
            "served": served,
            "served_all": served_all,
            "naive": naive,
            "top_index": lat.get("top_index"),
            "top_index_all": lat.get("top_index_all"),
        },
        "blip_retrieve64_shortlist_detail": {
            "definition": f"shortlist {SHORTLIST} (the default) against shortlist \"all\" (ITM on every caption: "
                          f"the exact ranking), same requests: top-{settings.top_k} index lists equal in order, "
                          f"mean overlap of the top-{settings.top_k} sets ÷ {settings.top_k}, same top 1",
            **agree,
        } if agree else None,
        "blip_match64_before_over_after": ratio(before.get("p50_ms"), after.get("p50_ms")),
        "blip_match64_after_mb": _mb((after.get("payload") or {}).get("total")),
        "blip_match64_before_mb": _mb((before.get("payload") or {}).get("total")),
        "blip_match64_detail": {
            "definition": "one image × 64 texts straight to Triton with the app's gRPC client, the app's tensors; "
                          "after: NAME_itm (pixels once + token rows); before: NAME_image_encoder, then NAME_fusion "
                          "with the features repeated per row; ratio = before p50 ÷ after p50; MB = 1e6 bytes of "
                          "tensor payload per request (numpy nbytes of every input sent and output returned)",
            **_public(m),
        } if m else None,
        "model": {"name": settings.name, "checkpoint": raw.get("checkpoint"), "import": raw.get("import")},
        "settings": settings.to_json() | {"shortlist": SHORTLIST},
        "command": command,
        "commit": git_commit(),
        "machine": machine(),
        "versions": versions(),
        "stage_seconds": timings,
        "wall_s": round(time.time() - started, 1),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "errors": errors,
    }


# -- checkpoint and repository -------------------------------------------------------------------

VISION_INIT_RANGE = 0.02  # the text tower's default; spreads the random image features


def build_base_checkpoint(folder: Path, seed: int = 0) -> Path:
    """BlipForImageTextRetrieval at BlipConfig's (BLIP-base) sizes, random weights, with a BlipProcessor (384 px)."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor, BlipProcessor

    from tests.hf.checkpoints import WORDS

    torch.manual_seed(seed)
    base = BlipConfig()
    vocab = padded_vocab(WORDS, base.text_config.vocab_size)
    cfg = BlipConfig(
        text_config={"vocab_size": len(vocab), "pad_token_id": 0, "bos_token_id": 2, "sep_token_id": 3},
        # BlipVisionConfig's default initializer_range (1e-10) leaves image features near 0, so
        # ITM would score the text alone and the served-vs-naive top-caption check would mean nothing.
        vision_config={"image_size": 384, "patch_size": 16, "initializer_range": VISION_INIT_RANGE},
    )
    model = BlipForImageTextRetrieval(cfg).eval()
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    side = cfg.vision_config.image_size
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": side, "width": side}), tokenizer=tok) \
        .save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def checkpoint_ready(folder: Path) -> bool:
    processor = any((folder / f).exists() for f in ("processor_config.json", "preprocessor_config.json"))
    ready = (folder / "config.json").exists() and any(folder.glob("*.safetensors")) and processor \
        and (folder / "tokenizer_config.json").exists()
    if not ready:
        return False
    vision = json.loads((folder / "config.json").read_text()).get("vision_config", {})
    return bool(vision.get("initializer_range") == VISION_INIT_RANGE)


def ensure_checkpoint(s: BlipBenchSettings) -> dict[str, Any]:
    if checkpoint_ready(s.checkpoint):
        log.info("checkpoint %s: reused", s.checkpoint)
        built = False
    elif s.quick:
        from tests.hf.checkpoints import build_blip

        build_blip(s.checkpoint, seed=4)
        built = True
    else:
        log.info("building %s (BLIP-base sizes, random weights)", s.checkpoint)
        build_base_checkpoint(s.checkpoint, s.seed)
        built = True
    cfg = json.loads((s.checkpoint / "config.json").read_text())
    weights = sorted(s.checkpoint.glob("*.safetensors"))
    return {
        "folder": str(s.checkpoint),
        "built_now": built,
        "vision": {k: cfg["vision_config"].get(k) for k in ("image_size", "patch_size", "hidden_size",
                                                              "num_hidden_layers")},
        "text": {k: cfg["text_config"].get(k) for k in ("vocab_size", "hidden_size", "num_hidden_layers")},
        "image_text_hidden_size": cfg.get("image_text_hidden_size"),
        "weights_bytes": sum(w.stat().st_size for w in weights),
        "parameters": _parameters(weights),
    }


def _parameters(weights: list[Path]) -> int | None:
    try:
        from safetensors import safe_open

        n = 0
        for w in weights:
            with safe_open(str(w), "pt") as f:
                for k in f.keys():  # noqa: SIM118 — safe_open is not a mapping
                    n += math.prod(f.get_slice(k).get_shape())
        return n
    except Exception:  # noqa: BLE001 — a figure for the record only
        return None


def _fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def ensure_repository(s: BlipBenchSettings) -> dict[str, Any]:
    """A copy of the built repository with the checkpoint imported fp32 (reused when the stamp matches)."""
    from export.hf.importer import import_hf

    if not (s.base_repository / "fusion" / "1" / "model.onnx").exists():
        raise RuntimeError(f"{s.base_repository} is not built: run `make repository` first")
    stamp = {"checkpoint": str(s.checkpoint), "fingerprint": _fingerprint(s.checkpoint), "name": s.name,
             "precision": "fp32"}
    stamp_path = s.repository / STAMP
    onnx_ok = all((s.work_dir / f"{r}.onnx").exists() for r in ("image_encoder", "text_encoder", "fusion"))
    if stamp_path.exists() and onnx_ok:
        old = json.loads(stamp_path.read_text())
        if {k: old.get(k) for k in stamp} == stamp:
            log.info("repository %s: reused (imported %s)", s.repository, old.get("imported"))
            return old | {"reused": True}
    if s.repository.exists():
        shutil.rmtree(s.repository)
    shutil.copytree(s.base_repository, s.repository,
                    ignore=shutil.ignore_patterns("__pycache__", "vtfuse_models.json", STAMP))
    t = time.monotonic()
    res = import_hf(str(s.checkpoint), s.name, repo=s.repository, precision="fp32", work_dir=s.work_dir)
    stamp |= {"imported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "import_seconds": round(time.monotonic() - t, 1), "engines": res["engines"],
              "parity_fp32": res["parity"]}
    write_json(stamp_path, stamp)
    return stamp | {"reused": False}


# -- in-process engines ---------------------------------------------------------------------------

def fix_dims(model: Any, dims: dict[str, list[int]]) -> Any:
    """A copy of an onnx ModelProto whose named graph inputs have every dim fixed to `dims[name]`."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for inp in m.graph.input:
        if inp.name in dims:
            shape = inp.type.tensor_type.shape.dim
            if len(shape) != len(dims[inp.name]):
                raise ValueError(f"{inp.name}: rank {len(shape)}, got dims {dims[inp.name]}")
            for d, v in zip(shape, dims[inp.name]):
                d.Clear()
                d.dim_value = int(v)
    return m


def count_flops(path: Path, dims: dict[str, list[int]]) -> dict[str, Any]:
    """loadtests.flops.count_graph of a graph with every input dim fixed (tokens too, not just the batch)."""
    import onnx

    from loadtests import flops

    batch = next(iter(dims.values()))[0]
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        fixed = Path(tmp) / path.name
        onnx.save(fix_dims(onnx.load(str(path)), dims), str(fixed))
        res = flops.count_graph(fixed, batch=batch)
    if res["nodes_without_shapes"]:
        raise RuntimeError(f"{path.name}: no shapes for {res['nodes_without_shapes'][:5]}: FLOPs would be low")
    return res


def engine_inputs(role: str, batch: int, s: BlipBenchSettings, image_size: int, tokens_width: tuple[int, int],
                  vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(s.seed)
    if role == "image_encoder":
        return {"PIXELS": rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)}
    ids = rng.integers(4, vocab, (batch, s.fusion_tokens), dtype=np.int64)
    ids[:, 0] = 2  # [CLS]
    return {
        "IMAGE_FEATURES": rng.standard_normal((batch, *tokens_width), dtype=np.float32),
        "INPUT_IDS": ids,
        "ATTENTION_MASK": np.ones((batch, s.fusion_tokens), dtype=np.int64),
    }


def time_session(sess: Any, feed: dict[str, np.ndarray], min_time_s: float, min_reps: int) -> dict[str, Any]:
    """Median seconds of `sess.run` over at least `min_reps` runs and `min_time_s` seconds, after a warm-up run."""
    sess.run(None, feed)
    times: list[float] = []
    end = time.perf_counter() + min_time_s
    while len(times) < min_reps or time.perf_counter() < end:
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return {"reps": len(times), "ms_median": statistics.median(times) * 1e3, "ms_min": min(times) * 1e3}


def engines(s: BlipBenchSettings, ckpt_cfg: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime as ort

    from export.hf.blip_retrieval import image_tokens
    from loadtests import flops
    from loadtests.engine_bench import IN_PROCESS

    cfg = json.loads((s.checkpoint / "config.json").read_text())
    size = int(cfg["vision_config"]["image_size"])
    tw = image_tokens(cfg)
    vocab = int(cfg["text_config"]["vocab_size"])
    settings = replace(IN_PROCESS, intra_threads=s.engine_threads)
    setups = [("image_encoder", b) for b in s.image_batches] + [("fusion", s.fusion_batch)]
    fc = ForeignCpu()
    fc.start()
    t0 = time.perf_counter()
    ceiling = flops.matmul_ceiling(s.matmul_n, s.engine_threads, s.matmul_reps)
    ceiling["foreign_cpu_share"] = round(fc.stop() / ((time.perf_counter() - t0) * (os.cpu_count() or 1)), 3)
    log.info("   ceiling %.1f GFLOP/s (%s, n=%d)", ceiling["flops_per_s"] / 1e9, ceiling["best_library"], s.matmul_n)
    rows = []
    for role in dict.fromkeys(r for r, _ in setups):
        path = s.work_dir / f"{role}.onnx"
        sess = ort.InferenceSession(str(path), settings.options(), providers=["CPUExecutionProvider"])
        for r, batch in setups:
            if r != role:
                continue
            feed = engine_inputs(role, batch, s, size, tw, vocab)
            count = count_flops(path, {k: list(v.shape) for k, v in feed.items()})
            fc = ForeignCpu()
            fc.start()
            t0 = time.perf_counter()
            timing = time_session(sess, feed, s.engine_min_time_s, s.engine_min_reps)
            share = fc.stop() / ((time.perf_counter() - t0) * (os.cpu_count() or 1))
            items = batch / (timing["ms_median"] / 1e3)
            row = {
                "engine": role, "batch": batch,
                "tokens": s.fusion_tokens if role == "fusion" else None,
                "items_per_s": round(items, 3), **{k: round(v, 2) if isinstance(v, float) else v
                                                   for k, v in timing.items()},
                "gflop_per_item": round(count["flops_per_item"] / 1e9, 3),
                "macs": count["macs"],
                "achieved_gflop_s": round(items * count["flops_per_item"] / 1e9, 2),
                "efficiency": efficiency(items, count["flops_per_item"], ceiling["flops_per_s"]),
                "foreign_cpu_share": round(share, 3),
            }
            rows.append(row)
            log.info("   %s batch %d: %.2f items/s × %.2f GFLOP = %.1f GFLOP/s → efficiency %.3f (foreign cpu %.2f)",
                     role, batch, items, row["gflop_per_item"], row["achieved_gflop_s"], row["efficiency"], share)
        del sess
        gc.collect()
    return {"ceiling": ceiling, "rows": rows,
            "session": asdict(settings) | {"intra_threads": s.engine_threads},
            "image_tokens": list(tw), "image_size": size}


@dataclass(frozen=True)
class AppTensors:
    """What the app's preprocessing makes of one request: pixels (1, H, W, 3) uint8, ids and mask (N, L) int64."""

    pixels: np.ndarray
    ids: np.ndarray
    mask: np.ndarray


def app_tensors(s: BlipBenchSettings, reqs: list[RetrieveRequest]) -> list[AppTensors]:
    """Decode and tokenize each request as the app does for an imported model (serving.app.models.ModelRuntime:
    serving.families.imported.decode_for, tokenize_padded to a multiple of 16)."""
    from serving.app.settings import Limits
    from serving.families.imported import decode_for, load_plain_tokenizer, read_repository_models, tokenize_padded

    record = read_repository_models(s.repository)[s.name]
    tok = load_plain_tokenizer(record.checkpoint_dir(s.repository) / "tokenizer.json")
    out = []
    for r in reqs:
        pixels = decode_for(record.image, base64.b64decode(r.body["image"]), Limits().max_pixels)[None]
        ids, mask = tokenize_padded(tok, r.body["texts"], record.max_tokens)
        out.append(AppTensors(pixels, ids, mask))
    return out


def itc_shortlists(s: BlipBenchSettings, reqs: list[RetrieveRequest]) -> list[list[int]]:
    """The served path's ITC shortlist of each request, from the same fp32 engines in-process (decode and
    tokenize as the app does: serving.families.imported, serving.app.router)."""
    import onnxruntime as ort

    from loadtests.engine_bench import IN_PROCESS
    from serving.app.router import shortlist, shortlist_size

    opts = replace(IN_PROCESS, intra_threads=s.engine_threads).options()
    img = ort.InferenceSession(str(s.work_dir / "image_encoder.onnx"), opts, providers=["CPUExecutionProvider"])
    txt = ort.InferenceSession(str(s.work_dir / "text_encoder.onnx"), opts, providers=["CPUExecutionProvider"])
    out = []
    for r, t in zip(reqs, app_tensors(s, reqs)):
        (img_emb,) = img.run(["IMAGE_EMBEDDING"], {"PIXELS": t.pixels})
        (txt_emb,) = txt.run(["TEXT_EMBEDDING"], {"INPUT_IDS": t.ids, "ATTENTION_MASK": t.mask})
        k = shortlist_size(len(r.body["texts"]), int(r.body["top_k"]))
        out.append([int(i) for i in shortlist(img_emb[0], txt_emb, k)])
    return out


# -- servers --------------------------------------------------------------------------------------

def post_all(url: str, reqs: list[RetrieveRequest], warmups: list[RetrieveRequest], timeout_s: float,
             budget_s: float | None = None, path: str = "/v1/retrieve") -> dict[str, Any]:
    """Warm-up requests, then the timed ones in sequence (cut to fit `budget_s` by the warm-up's duration).

    Keeps each answer: `results` (/v1/retrieve, best first) or `scores` (/v1/match).
    """
    import httpx

    field = "scores" if path == "/v1/match" else "results"

    def one(client: httpx.Client, r: RetrieveRequest) -> tuple[float, dict[str, Any]]:
        t = time.perf_counter()
        resp = client.post(url + path, json=r.body)
        dt = (time.perf_counter() - t) * 1e3
        if resp.status_code != 200:
            raise RuntimeError(f"{url}{path}: HTTP {resp.status_code}: {resp.text[:300]}")
        return dt, resp.json()

    with httpx.Client(timeout=timeout_s) as client:
        warm_ms = [one(client, r)[0] for r in warmups]
        planned = len(reqs)
        n = planned
        if budget_s is not None and warm_ms:
            n = requests_within(budget_s, max(warm_ms) / 1e3, planned)
            if n < planned:
                log.warning("   %d of %d timed requests fit the %.0f s budget (warm-up took %.0f s)", n, planned,
                            budget_s, max(warm_ms) / 1e3)
        fc = ForeignCpu()
        fc.start()
        t0 = time.perf_counter()
        lat, answers = [], []
        for r in reqs[:n]:
            dt, body = one(client, r)
            lat.append(dt)
            answers.append(body[field])
            top = [x["index"] for x in body[field]] if field == "results" else f"{len(body[field])} scores"
            log.info("   %s%s: %.0f ms, %s", url, path, dt, top)
        share = fc.stop() / ((time.perf_counter() - t0) * (os.cpu_count() or 1))
    return {"p50_ms": p50(lat), "latencies_ms": [round(x, 1) for x in lat], "warmup_ms": [round(x, 1) for x in warm_ms],
            "requests_planned": planned, "requests_run": n, "foreign_cpu_share": round(share, 3),
            field: answers}


def served(s: BlipBenchSettings, reqs: list[RetrieveRequest], warm: list[RetrieveRequest],
           shortlist: int | str | None = None, match: list[RetrieveRequest] | None = None,
           match_warm: list[RetrieveRequest] | None = None) -> dict[str, Any]:
    """/v1/retrieve (and, given `match`, then /v1/match) through a fresh Triton + Serve app: Triton's response
    cache (on, as `vtfuse serve` runs it) holds none of the images at the start."""
    from loadtests import servers

    t = time.perf_counter()
    tag = "blip" if shortlist is None else f"blip-shortlist-{shortlist}"
    with servers.triton(s.repository, tag) as tr:
        t_triton = time.perf_counter() - t
        env = {"VTFUSE_LIMITS_REQUEST_TIMEOUT_S": str(s.request_timeout_s)}
        with servers.serve_app(tr.url_grpc, s.repository, "tiny", tag, env=env) as app:
            t_ready = time.perf_counter() - t
            res = post_all(app.url, [with_shortlist(r, shortlist) for r in reqs],
                           [with_shortlist(r, shortlist) for r in warm], s.request_timeout_s + 60)
            if match:
                try:
                    res["match_app"] = post_all(app.url, match, match_warm or [], s.request_timeout_s + 60,
                                                path="/v1/match")
                except Exception as e:  # noqa: BLE001 — the retrieve figures above stand; Run records this
                    log.error("/v1/match through the app failed: %s", e)
                    res["match_app_error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"
    return res | {"shortlist": SHORTLIST if shortlist is None else shortlist,
                  "startup_s": {"triton": round(t_triton, 1), "triton_and_serve": round(t_ready, 1)},
                  "composition": servers.shipped_serve_composition(),
                  "limits_override": {"request_timeout_s": s.request_timeout_s}}


async def match_after(client: Any, engines: Mapping[str, str], t: AppTensors, timeout_s: float
                      ) -> tuple[np.ndarray, list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]]:
    """Today's /v1/match on an imported BLIP (Pipeline.match): one call to `NAME_itm`, the pixels once."""
    feed = {"PIXELS": t.pixels, "INPUT_IDS": t.ids, "ATTENTION_MASK": t.mask}
    out = await client.infer(engines["itm"], feed, ["ITM_LOGITS"], deadline=time.monotonic() + timeout_s)
    return out["ITM_LOGITS"], [(feed, out)]


async def match_before(client: Any, engines: Mapping[str, str], t: AppTensors, max_rows: int, timeout_s: float
                       ) -> tuple[np.ndarray, list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]]:
    """/v1/match before `NAME_itm` (b852799's parent): `NAME_image_encoder` asked for IMAGE_FEATURES, then
    `NAME_fusion` with those features repeated for every text row (its requests concurrently, as Pipeline.infer)."""
    deadline = time.monotonic() + timeout_s
    image_in = {"PIXELS": t.pixels}
    image_out = await client.infer(engines["image_encoder"], image_in, ["IMAGE_FEATURES"], deadline=deadline)
    feeds = fusion_feeds(image_out["IMAGE_FEATURES"], t.ids, t.mask, max_rows)
    outs = await asyncio.gather(*(client.infer(engines["fusion"], f, ["ITM_LOGITS"], deadline=deadline)
                                  for f in feeds))
    return np.concatenate([o["ITM_LOGITS"] for o in outs]), [(image_in, image_out), *zip(feeds, outs)]


def _path_summary(lat: list[float], warm: list[float], payloads: list[dict[str, int]], wire: Any,
                  calls_made: int) -> dict[str, Any]:
    totals = [p["total"] for p in payloads]
    return {
        "p50_ms": p50(lat), "latencies_ms": [round(x, 1) for x in lat], "warmup_ms": [round(x, 1) for x in warm],
        "requests_run": len(lat),
        # The requests' token width can differ (the longest text rounded up to 16): the median request's payload.
        "payload": sorted(payloads, key=lambda p: p["total"])[(len(payloads) - 1) // 2] if payloads else None,
        "payload_total_bytes_per_request": totals,
        "payload_mb_p50": _mb(statistics.median(totals)) if totals else None,
        # The client's own count (serving.triton.client.WireStats, warm-ups included), over every call it made.
        "client_wire_stats": {"calls": wire.calls, "sent": wire.sent, "received": wire.received,
                              "requests": calls_made},
    }


async def _match_runs(s: BlipBenchSettings, url: str, engines: Mapping[str, str], max_rows: int,
                      tensors: list[AppTensors], warm: list[AppTensors]) -> dict[str, Any]:
    from serving.triton.client import TritonClient, TritonClientSettings

    timeout = s.request_timeout_s
    # One client per path, with the app's pool size (loadtests.servers.serve_app: 2): each counts its own bytes.
    clients = {p: TritonClient(TritonClientSettings(url=url, pool_size=2)) for p in ("after", "before")}

    async def run(path: str, t: AppTensors) -> tuple[float, np.ndarray, dict[str, int]]:
        t0 = time.perf_counter()
        if path == "after":
            logits, calls = await match_after(clients[path], engines, t, timeout)
        else:
            logits, calls = await match_before(clients[path], engines, t, max_rows, timeout)
        return (time.perf_counter() - t0) * 1e3, logits, payload(calls)

    warm_ms: dict[str, list[float]] = {"after": [], "before": []}
    for w in warm:
        for path in ("after", "before"):
            warm_ms[path].append((await run(path, w))[0])
    lat: dict[str, list[float]] = {"after": [], "before": []}
    pays: dict[str, list[dict[str, int]]] = {"after": [], "before": []}
    diffs, probs_after = [], []
    fc = ForeignCpu()
    fc.start()
    t0 = time.perf_counter()
    for i, t in enumerate(tensors):
        got = {}
        for path in (("after", "before") if i % 2 == 0 else ("before", "after")):  # alternate who goes first
            ms, logits, pay = await run(path, t)
            lat[path].append(ms)
            pays[path].append(pay)
            got[path] = itm_probability(logits)
        diffs.append(float(np.abs(got["after"] - got["before"]).max()))
        probs_after.append(got["after"])
        log.info("   match %d: after %.0f ms (%.2f MB), before %.0f ms (%.2f MB), |Δp| ≤ %.1e", i, lat["after"][-1],
                 pays["after"][-1]["total"] / MB, lat["before"][-1], pays["before"][-1]["total"] / MB, diffs[-1])
    share = fc.stop() / ((time.perf_counter() - t0) * (os.cpu_count() or 1))
    n_calls = len(tensors) + len(warm)
    out = {p: _path_summary(lat[p], warm_ms[p], pays[p], clients[p].stats, n_calls) for p in ("after", "before")}
    return out | {"itm_probability_max_abs_diff": max(diffs, default=None), "foreign_cpu_share": round(share, 3),
                  "order": "alternating, after first on even requests", "probabilities_after": probs_after}


def match_direct(s: BlipBenchSettings, reqs: list[RetrieveRequest], warm: list[RetrieveRequest]) -> dict[str, Any]:
    """Step 5: the two /v1/match paths straight to a Triton whose response cache is off (the two paths take the
    same images in turn: with the cache on, the second would be answered the image features from it)."""
    from loadtests import servers
    from serving.families.imported import read_repository_models

    record = read_repository_models(s.repository)[s.name]
    fusion_max = record.max_batch.get("fusion")
    max_rows = min(ENGINE_MAX_BATCH, fusion_max or ENGINE_MAX_BATCH)
    tensors, warm_t = app_tensors(s, reqs), app_tensors(s, warm)
    t = time.perf_counter()
    with servers.triton(s.repository, "blip-match", response_cache_mb=0) as tr:
        startup = time.perf_counter() - t
        res = asyncio.run(_match_runs(s, tr.url_grpc, record.engines, max_rows, tensors, warm_t))
    return res | {"texts": s.match_texts, "token_width": sorted({int(x.ids.shape[1]) for x in tensors}),
                  "pixels_shape": list(tensors[0].pixels.shape) if tensors else None,
                  "fusion_rows_per_request": max_rows, "fusion_max_batch": fusion_max,
                  "engines": {k: record.engines.get(k) for k in ("itm", "image_encoder", "fusion")},
                  "triton_startup_s": round(startup, 1), "response_cache": "off"}


@contextlib.contextmanager
def naive_server(s: BlipBenchSettings) -> Iterator[Any]:
    from loadtests import servers

    port = servers.free_port()
    cmd = [sys.executable, "-m", "loadtests.baseline.blip_app", "--checkpoint", str(s.checkpoint), "--name", s.name,
           "--port", str(port), "--workers", str(s.naive_workers), "--threads", str(s.naive_threads)]
    with servers.spawn(cmd, "/healthz", port, "naive-blip", timeout=600) as h:
        yield h


def naive(s: BlipBenchSettings, reqs: list[RetrieveRequest], warm: list[RetrieveRequest]) -> dict[str, Any]:
    t = time.perf_counter()
    with naive_server(s) as h:
        t_ready = time.perf_counter() - t
        res = post_all(h.url, reqs, warm, 3600, s.naive_budget_s)
    return res | {"startup_s": round(t_ready, 1), "workers": s.naive_workers, "torch_threads": s.naive_threads}


# -- plot, run ------------------------------------------------------------------------------------

def plot(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = summary["blip_retrieve64_vs_naive_detail"]
    labels, values, points = [], [], []
    for key, label in (("served", f"vtfuse, shortlist {SHORTLIST}"), ("served_all", 'vtfuse, shortlist "all"'),
                       ("naive", "naive (FastAPI + transformers)")):
        if d[key].get("p50_ms") is not None:
            labels.append(label)
            values.append(d[key]["p50_ms"] / 1e3)
            points.append([x / 1e3 for x in d[key]["latencies_ms"]])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    bars = ax.bar(labels, values, color=["tab:blue", "tab:cyan", "tab:gray"][: len(values)])
    for i, pts in enumerate(points):
        ax.scatter([i] * len(pts), pts, color="black", s=12, zorder=3)
    for b, v in zip(bars, values):
        ax.annotate(f"{v:.2f} s", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=9)
    ax.set_yscale("log")
    ax.set_ylabel("p50 latency, s (dots: each request)")
    r = summary.get("blip_retrieve64_vs_naive")
    size = summary["model"]["checkpoint"] or {}
    side = (size.get("vision") or {}).get("image_size")
    r_all = summary.get("blip_retrieve64_all_vs_naive")
    ax.set_title(f"{summary['model']['name']} ({side} px): 1 image × 64 captions, /v1/retrieve"
                 + (f" — naive ÷ served {r:.1f}×" if r else "") + (f", all {r_all:.1f}×" if r_all else ""),
                 fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class Run:
    def __init__(self, s: BlipBenchSettings, out: Path) -> None:
        self.s, self.out = s, out
        self.raw: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self.busy_before: dict[str, float] = {}

    def stage(self, name: str, fn: Callable[[], Any], measures: bool = False) -> Any:
        log.info("== %s", name)
        if measures:  # how busy other work kept the CPU just before (this machine is shared)
            busy = wait_quiet(timeout_s=self.s.wait_quiet_s) if self.s.wait_quiet_s > 0 else cpu_busy(2.0)
            self.busy_before[name] = round(busy, 3)
            log.info("   CPU busy with other work before %s: %.0f %%", name, 100 * busy)
        t = time.perf_counter()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 — one failed stage must not lose the others' figures
            log.error("stage %s failed: %s", name, e)
            self.errors[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"
            return None
        finally:
            self.timings[name] = round(time.perf_counter() - t, 1)
            log.info("   %s took %.0f s", name, self.timings[name])

    def write(self, command: str, started: float) -> dict[str, Any]:
        """summary.json from what the stages measured so far."""
        summary = summarize(self.raw, self.s, command, started, self.errors, self.timings)
        summary["cpu_busy_before_stage"] = self.busy_before
        write_json(self.out / "summary.json", summary)
        return summary

    def run(self, command: str) -> dict[str, Any]:
        started = time.time()
        s = self.s
        self.raw["checkpoint"] = self.stage("checkpoint", lambda: ensure_checkpoint(s))
        if self.raw["checkpoint"] is not None:
            self.raw["import"] = self.stage("import", lambda: ensure_repository(s))
        if self.raw.get("import") is not None:
            self.raw["engines"] = self.stage("engines", lambda: engines(s, self.raw["checkpoint"]), measures=True)
            gc.collect()
            reqs = make_requests(s.requests, s.seed, s.captions, s.top_k, s.image_side, s.name)
            warm = make_requests(s.warmups, s.seed + 1000, s.captions, s.top_k, s.image_side, s.name)
            # /v1/match: images and texts of their own (none of them in the response cache of the retrieve runs).
            mreqs = [as_match(r) for r in make_requests(s.match_requests, s.seed + 2000, s.match_texts, s.top_k,
                                                        s.image_side, s.name)]
            mwarm = [as_match(r) for r in make_requests(s.warmups, s.seed + 3000, s.match_texts, s.top_k,
                                                        s.image_side, s.name)]
            lat: dict[str, Any] = {"requests": [{"true_index": r.true_index, "side": r.side,
                                                 "texts": len(r.body["texts"])} for r in reqs]}
            self.raw["latency"] = lat
            shortlists = self.stage("shortlists", lambda: itc_shortlists(s, reqs))
            gc.collect()
            lat["served"] = self.stage("served", lambda: served(s, reqs, warm, None, mreqs, mwarm), measures=True)
            if lat["served"] and "match_app_error" in lat["served"]:
                self.errors["match_app"] = lat["served"].pop("match_app_error")
            self.write(command, started)
            lat["served_all"] = self.stage("served_all", lambda: served(s, reqs, warm, "all"), measures=True)
            lat |= compare(lat, shortlists, s.top_k)
            self.write(command, started)
            self.raw["match"] = self.stage("match", lambda: match_direct(s, mreqs, mwarm), measures=True)
            self._match_app_check()
            self.write(command, started)
            lat["naive"] = self.stage("naive", lambda: naive(s, reqs, warm), measures=True)
            lat |= compare(lat, shortlists, s.top_k)
        summary = self.write(command, started)
        if any(summary["blip_retrieve64_vs_naive_detail"][k] is not None
               for k in ("served_p50_ms", "served_all_p50_ms", "naive_p50_ms")):
            self.stage("plot", lambda: plot(summary, self.out / "retrieve64_p50.png"))
            summary = self.write(command, started)
        return summary

    def _match_app_check(self) -> None:
        """The app's /v1/match scores against the direct `NAME_itm` call's on the same requests (same tensors?)."""
        m = self.raw.get("match")
        app = ((self.raw.get("latency") or {}).get("served") or {}).get("match_app") or {}
        if not m or not app.get("scores"):
            return
        diffs = [float(np.abs(np.asarray(a, dtype=np.float64) - d).max())
                 for a, d in zip(app["scores"], m["probabilities_after"])]
        m["app_scores_vs_after_max_abs_diff"] = max(diffs, default=None)
        m["app_p50_ms"] = app.get("p50_ms")


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny BLIP (tests.hf.checkpoints.build_blip sizes)")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default loadtests/results/blip, --quick build/blip-bench-quick)")
    p.add_argument("--requests", type=int,
                   help="timed /v1/retrieve requests per side: shortlist 16, shortlist all, naive (default 10)")
    p.add_argument("--match-requests", type=int, help="timed /v1/match-shaped requests per path (default 10)")
    p.add_argument("--naive-budget", type=float, help="seconds the timed naive requests may take (default 2400)")
    p.add_argument("--wait-quiet", type=float, default=0.0,
                   help="before each measuring stage, wait up to this many seconds for other work to leave the CPU")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    s = BlipBenchSettings.quick_run() if args.quick else BlipBenchSettings()
    if args.requests:
        s = replace(s, requests=args.requests)
    if args.match_requests:
        s = replace(s, match_requests=args.match_requests)
    if args.naive_budget:
        s = replace(s, naive_budget_s=args.naive_budget)
    s = replace(s, wait_quiet_s=args.wait_quiet)
    out = args.out or (REPO_ROOT / ("build/blip-bench-quick" if args.quick else "loadtests/results/blip"))
    out.mkdir(parents=True, exist_ok=True)
    argv_shown = sys.argv[1:] if argv is None else argv
    command = "PYTHONPATH=. python -m loadtests.blip_bench " + " ".join(shlex.quote(a) for a in argv_shown)
    summary = Run(s, out).run(command)
    log.info("summary: %s", out / "summary.json")
    log.info("   blip_engine_efficiency   %s (%s)", summary["blip_engine_efficiency"],
             summary["blip_engine_efficiency_detail"]["headline"])
    d = summary["blip_retrieve64_vs_naive_detail"]
    log.info("   blip_retrieve64_vs_naive %s, _all_ %s (served p50 %s ms, shortlist all %s ms, naive p50 %s ms)",
             summary["blip_retrieve64_vs_naive"], summary["blip_retrieve64_all_vs_naive"], d["served_p50_ms"],
             d["served_all_p50_ms"], d["naive_p50_ms"])
    log.info("   shortlist 16 vs all: top-5 same order %s, top-5 overlap %s, top-1 %s",
             summary["blip_retrieve64_top5_same_order"], summary["blip_retrieve64_top5_overlap"],
             summary["blip_retrieve64_top1_agreement"])
    log.info("   blip_match64_before_over_after %s (after %s MB, before %s MB a request)",
             summary["blip_match64_before_over_after"], summary["blip_match64_after_mb"],
             summary["blip_match64_before_mb"])
    if summary["errors"]:
        log.error("failed stages: %s", ", ".join(summary["errors"]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
