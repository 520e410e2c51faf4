"""Stage 0: train `tiny` on the shapes world (VQA, ITM, contrastive, dense patch supervision), then its caption decoder.

Seeded and CPU-only: `vtfuse train` reproduces the shipped checkpoint within the budget of
60 minutes on 2 cores. The dense head (each patch's colour and shape, from the renderer's
own label map) exists only during training and is not saved: it is what makes the binding
questions learnable in the budget.

The caption stage (`train_caption`) follows: the towers are frozen (their weights file is
not rewritten), the image tower's features of freshly rendered, augmented scenes are computed
once, and the decoder alone learns each scene's canonical caption by teacher forcing. It
writes `caption_decoder.safetensors` and a `caption` section in training_report.json.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from export.dataset import Arrays, render_caption_dataset, render_dataset
from serving import progress
from serving.model.checkpoint import Checkpoint, save_checkpoint, save_decoder
from serving.model.model import CaptionDecoder, FusionConfig, FusionModel
from serving.model.tokenizer import PAD, build_tokenizer
from serving.shapes import world

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """Training hyper-parameters (code-owned, frozen)."""

    preset: str = "tiny"
    samples: int = 60_000
    epochs: float = 4.0
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    dense_weight: float = 0.5
    seed: int = 0
    threads: int = 2
    max_minutes: float = 55.0


class DenseHead(nn.Module):
    """Training-only: per-patch colour (5 classes) and shape (4 classes) from image features."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.color = nn.Linear(dim, len(world.COLOR_NAMES) + 1)
        self.shape = nn.Linear(dim, len(world.SHAPES) + 1)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.color(feats), self.shape(feats)


def _batch(a: Arrays, idx: np.ndarray) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(getattr(a, k)[idx]) for k in Arrays.__dataclass_fields__}


def training_step(
    model: FusionModel, dense: DenseHead, b: dict[str, torch.Tensor], dense_weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """One forward pass over every objective; returns the total loss and its parts."""
    n = b["pixels"].shape[0]
    img_feats, img_emb = model.encode_image(b["pixels"])
    ids = torch.cat([b["q_ids"], b["pos_ids"], b["neg_ids"]])
    mask = torch.cat([b["q_mask"], b["pos_mask"], b["neg_mask"]])
    txt_feats, txt_emb = model.encode_text(ids, mask)
    vqa_logits, itm_logit, _ = model.fuse(img_feats.repeat(3, 1, 1), txt_feats, mask)
    loss_vqa = F.cross_entropy(vqa_logits[:n], b["answer"])
    itm_target = torch.cat([torch.ones(n), torch.zeros(n)])
    loss_itm = F.binary_cross_entropy_with_logits(itm_logit[n:, 0], itm_target)
    # Contrastive: image vs its true caption; scenes with the same objects are all positives.
    same = (b["scene_key"][:, None] == b["scene_key"][None, :]).float()
    target = same / same.sum(1, keepdim=True)
    logits = model.logit_scale.exp().clamp(max=100) * img_emb @ txt_emb[n : 2 * n].T
    loss_con = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    pc, ps = dense(img_feats)
    loss_dense = F.cross_entropy(pc.flatten(0, 1), b["patch_color"].flatten()) + F.cross_entropy(
        ps.flatten(0, 1), b["patch_shape"].flatten()
    )
    total = loss_vqa + loss_itm + 0.5 * loss_con + dense_weight * loss_dense
    parts = {"vqa": loss_vqa.item(), "itm": loss_itm.item(), "con": loss_con.item(), "dense": loss_dense.item()}
    return total, parts


def train(settings: TrainSettings, out_dir: str | Path) -> dict:
    """Train, evaluate on fresh held-out renders, save the checkpoint and a training report."""
    from export.evaluate import evaluate  # late: evaluate imports the model too

    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    np.random.seed(settings.seed)
    torch.set_num_threads(settings.threads)
    cfg = FusionConfig.preset(settings.preset)
    t0 = time.time()
    data = render_dataset(settings.samples, settings.seed, cfg.image_size, cfg.grid, cfg.max_text_len)
    render_s = time.time() - t0
    log.info("rendered %d samples in %.0f s", settings.samples, render_s)

    model = FusionModel(cfg).train()
    dense = DenseHead(cfg.dim)
    params = list(model.parameters()) + list(dense.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
    )
    steps_per_epoch = settings.samples // settings.batch_size
    total_steps = int(steps_per_epoch * settings.epochs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=total_steps, pct_start=0.1)
    rng = np.random.default_rng(settings.seed)
    step, deadline = 0, t0 + settings.max_minutes * 60
    history = []
    bar = progress.Steps(total_steps, "train", unit="step")  # tqdm on a terminal, a line every 30 s otherwise
    while step < total_steps and time.time() < deadline:
        order = rng.permutation(settings.samples)
        for i in range(steps_per_epoch):
            if step >= total_steps or time.time() >= deadline:
                break
            b = _batch(data, order[i * settings.batch_size : (i + 1) * settings.batch_size])
            loss, parts = training_step(model, dense, b, settings.dense_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            bar.update(1, **({"loss": loss.item()} if step % 20 == 0 else {}))
            if step % 100 == 0 or step == 1:
                elapsed = (time.time() - t0) / 60
                log.info(
                    "step %d/%d %.1f min loss %.3f %s",
                    step,
                    total_steps,
                    elapsed,
                    loss.item(),
                    " ".join(f"{k}={v:.3f}" for k, v in parts.items()),
                )
                history.append({"step": step, "minutes": round(elapsed, 2), "loss": round(loss.item(), 4), **parts})
    bar.close()
    train_minutes = (time.time() - t0) / 60
    model.eval()
    ckpt = Checkpoint(model, build_tokenizer(), list(world.ANSWERS))
    out = save_checkpoint(ckpt, out_dir)
    metrics = evaluate(ckpt, n=1000, seed=settings.seed + 12345)
    report = {
        "settings": asdict(settings),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": step,
        "render_seconds": round(render_s, 1),
        "train_minutes_total": round(train_minutes, 2),
        "threads": torch.get_num_threads(),
        "heldout": metrics,
        "history": history,
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("done in %.1f min: %s", train_minutes, json.dumps(metrics))
    return report


STAGES = ("all", "towers", "caption")
# `make train`'s whole budget on 2 cores; after the towers the caption stage gets what is left of it
# (its own cap at most), less a margin for its evaluation and the writes.
TOTAL_MINUTES = 60.0
CAPTION_MARGIN_MINUTES = 1.5


@dataclass(frozen=True)
class CaptionSettings:
    """Caption-stage hyper-parameters (code-owned, frozen). `max_minutes` caps the whole stage but its evaluation."""

    samples: int = 30_000
    epochs: float = 4.0
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    seed: int = 0
    threads: int = 2
    max_minutes: float = 9.0
    eval_scenes: int = 500


@torch.no_grad()
def image_features(model: FusionModel, pixels: np.ndarray, chunk: int = 500) -> torch.Tensor:
    """The frozen image tower's features (N, P, D) of uint8 images (N, S, S, 3), computed once."""
    model.eval()
    parts = [model.encode_image(torch.from_numpy(pixels[i : i + chunk]))[0] for i in range(0, len(pixels), chunk)]
    return torch.cat(parts)


def caption_loss(decoder: CaptionDecoder, ids: torch.Tensor, feats: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Teacher forcing: each position predicts the next token of [CLS] caption [SEP]; padding is ignored."""
    logits = decoder(ids[:, :-1], feats)  # (B, T - 1, V)
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), ignore_index=pad_id)


def train_caption(settings: CaptionSettings, ckpt_dir: str | Path) -> dict:
    """Train the caption decoder on a trained checkpoint's frozen towers; save it and report it.

    Writes `caption_decoder.safetensors` beside the towers (whose file is left as it is) and the
    `caption` section of training_report.json: time, steps, loss history and the greedy
    caption accuracy on `eval_scenes` fresh held-out renders.
    """
    from export.evaluate import caption_accuracy, special_token_id  # late: evaluate imports the model too

    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)
    torch.set_num_threads(settings.threads)
    out = Path(ckpt_dir)
    towers = _towers(out)
    cfg = towers.config
    if not cfg.has_decoder:
        raise ValueError(f"{out}/config.json has no caption decoder (decoder_layers 0): nothing to train")
    t0 = time.time()
    data = render_caption_dataset(settings.samples, settings.seed, cfg.image_size, cfg.max_text_len)
    render_s = time.time() - t0
    feats = image_features(towers.model, data.pixels)
    features_s = time.time() - t0 - render_s
    log.info("caption stage: %d samples rendered in %.0f s, features in %.0f s", settings.samples, render_s, features_s)
    ids = torch.from_numpy(data.ids)
    lengths = data.mask.sum(1)
    pad_id = special_token_id(towers.tokenizer, PAD)

    decoder = CaptionDecoder(cfg).train()
    params = list(decoder.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
    )
    steps_per_epoch = settings.samples // settings.batch_size
    total_steps = int(steps_per_epoch * settings.epochs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=total_steps, pct_start=0.1)
    rng = np.random.default_rng(settings.seed)
    step, deadline = 0, t0 + settings.max_minutes * 60
    history = []
    bar = progress.Steps(total_steps, "caption", unit="step")
    while step < total_steps and time.time() < deadline:
        order = rng.permutation(settings.samples)
        for i in range(steps_per_epoch):
            if step >= total_steps or time.time() >= deadline:
                break
            idx = order[i * settings.batch_size : (i + 1) * settings.batch_size]
            width = int(lengths[idx].max())  # trailing padding computes nothing useful
            loss = caption_loss(decoder, ids[idx, :width], feats[idx], pad_id)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            bar.update(1, **({"loss": loss.item()} if step % 20 == 0 else {}))
            if step % 100 == 0 or step == 1:
                elapsed = (time.time() - t0) / 60
                log.info("caption step %d/%d %.1f min loss %.4f", step, total_steps, elapsed, loss.item())
                history.append({"step": step, "minutes": round(elapsed, 2), "loss": round(loss.item(), 4)})
    bar.close()
    stage_minutes = (time.time() - t0) / 60
    decoder.eval()
    save_decoder(decoder, out)
    ckpt = Checkpoint(towers.model, towers.tokenizer, towers.answers, out, decoder)
    t1 = time.time()
    accuracy = caption_accuracy(ckpt, n=settings.eval_scenes, seed=settings.seed + 54321)
    section = {
        "settings": asdict(settings),
        "parameters": sum(p.numel() for p in decoder.parameters()),
        "target": "canonical caption: items sorted by colour, then shape (serving.shapes.world.canonical_caption)",
        "steps": step,
        "total_steps": total_steps,
        "render_seconds": round(render_s, 1),
        "features_seconds": round(features_s, 1),
        "train_minutes_total": round(stage_minutes, 2),
        "eval_seconds": round(time.time() - t1, 1),
        "threads": torch.get_num_threads(),
        "heldout": accuracy,
        "history": history,
    }
    report_path = out / "training_report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report["caption"] = section
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    log.info("caption stage done in %.1f min: %s", stage_minutes, json.dumps(accuracy))
    return section


def _towers(folder: Path) -> Checkpoint:
    """A checkpoint's towers before its decoder exists (the caption stage's input)."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    cfg = FusionConfig.from_json(folder / "config.json")
    model = FusionModel(cfg)
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return Checkpoint(
        model.eval(), Tokenizer.from_file(str(folder / "tokenizer.json")),
        json.loads((folder / "answers.json").read_text()), folder,
    )


def main(argv: list[str] | None = None) -> None:
    """CLI: python -m export.train [--out DIR] [--samples N] [--epochs E] [--max-minutes M] [--stage S]."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="checkpoints/tiny")
    p.add_argument("--samples", type=int, default=TrainSettings.samples)
    p.add_argument("--epochs", type=float, default=TrainSettings.epochs)
    p.add_argument("--max-minutes", type=float, default=TrainSettings.max_minutes)
    p.add_argument("--caption-max-minutes", type=float, default=CaptionSettings.max_minutes)
    p.add_argument("--seed", type=int, default=TrainSettings.seed)
    p.add_argument("--stage", choices=STAGES, default="all")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train_stages(
        a.stage,
        TrainSettings(samples=a.samples, epochs=a.epochs, max_minutes=a.max_minutes, seed=a.seed),
        CaptionSettings(max_minutes=a.caption_max_minutes, seed=a.seed),
        a.out,
    )


def train_stages(stage: str, settings: TrainSettings, caption: CaptionSettings, out_dir: str | Path) -> dict:
    """`all`: the towers, then the caption decoder when the preset has one; `towers` or `caption` alone.

    Returns the training report as written (training_report.json).
    """
    t0 = time.time()
    if stage in ("all", "towers"):
        train(settings, out_dir)
    if stage == "caption" or (stage == "all" and FusionConfig.preset(settings.preset).has_decoder):
        if stage == "all":
            left = TOTAL_MINUTES - (time.time() - t0) / 60 - CAPTION_MARGIN_MINUTES
            if left < caption.max_minutes:
                log.warning("the towers took %.1f min: the caption stage gets %.1f min", (time.time() - t0) / 60, left)
                caption = replace(caption, max_minutes=max(left, 1.0))
        train_caption(caption, out_dir)
    return json.loads((Path(out_dir) / "training_report.json").read_text())


if __name__ == "__main__":
    main()
