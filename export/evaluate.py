"""Accuracy of a checkpoint on fresh held-out renders: VQA per question type, caption ranking, generated captions.

Images go through the serving path (PNG/JPEG bytes → `decode_image`) so the figures are
those a client would see.
"""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import torch
from tokenizers import Tokenizer

from serving.model.checkpoint import Checkpoint
from serving.model.preprocess import decode_image, tokenize
from serving.model.tokenizer import CLS, SEP
from serving.shapes import world

# What a served caption gets by default: greedy, 20 new tokens (capped by the decoder's positions).
CAPTION_NEW_TOKENS = 20


def fresh_render(scene: world.Scene, rng: random.Random) -> bytes:
    """A held-out render: random size, PNG or JPEG, anti-aliased or not."""
    side = rng.choice([64, 96, 128, 200, 256])
    img = world.render(scene, side, supersample=rng.choice([1, 3]))
    return world.encode(img, "JPEG", rng.randint(75, 95)) if rng.random() < 0.5 else world.encode(img, "PNG")


@torch.no_grad()
def answer(ckpt: Checkpoint, images: list[bytes], questions: list[str]) -> list[str]:
    """In-process VQA: one question per image."""
    cfg = ckpt.config
    px = torch.from_numpy(np.stack([decode_image(b, cfg.image_size) for b in images]))
    ids, mask = tokenize(ckpt.tokenizer, questions, cfg.max_text_len)
    feats, _ = ckpt.model.encode_image(px)
    tfeats, _ = ckpt.model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask))
    logits, _, _ = ckpt.model.fuse(feats, tfeats, torch.from_numpy(mask))
    return [ckpt.answers[i] for i in logits.argmax(-1).tolist()]


@torch.no_grad()
def itm_scores(ckpt: Checkpoint, image: bytes, texts: list[str]) -> np.ndarray:
    """ITM probability of each text for one image (image features computed once)."""
    cfg = ckpt.config
    px = torch.from_numpy(decode_image(image, cfg.image_size)[None])
    ids, mask = tokenize(ckpt.tokenizer, texts, cfg.max_text_len)
    feats, _ = ckpt.model.encode_image(px)
    tfeats, _ = ckpt.model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask))
    _, itm, _ = ckpt.model.fuse(feats.expand(len(texts), -1, -1), tfeats, torch.from_numpy(mask))
    return torch.sigmoid(itm[:, 0]).numpy()


def evaluate(ckpt: Checkpoint, n: int = 300, seed: int = 999, n_captions: int = 200) -> dict:
    """VQA accuracy (overall and per type) on `n` fresh renders; caption-first-among-8 rate."""
    ckpt.model.eval()
    rng = random.Random(seed)
    scenes = [world.random_scene(rng) for _ in range(n)]
    qas = [world.sample_question(s, rng) for s in scenes]
    images = [fresh_render(s, rng) for s in scenes]
    preds: list[str] = []
    for i in range(0, n, 100):
        preds += answer(ckpt, images[i : i + 100], [q.question for q in qas[i : i + 100]])
    per_type: dict[str, list[int]] = defaultdict(list)
    for qa, p in zip(qas, preds):
        per_type[qa.qtype].append(int(qa.answer == p))
    first, above = 0, 0
    for s, img in zip(scenes[:n_captions], images[:n_captions]):
        texts = [world.caption(world.scene_items(s), rng)] + world.distractor_captions(s, rng, 7)
        sc = itm_scores(ckpt, img, texts)
        first += int(sc.argmax() == 0)
        above += int(sc[0] > sc[1])
    m = min(n_captions, n)
    return {
        "vqa_accuracy": round(float(np.mean([qa.answer == p for qa, p in zip(qas, preds)])), 4),
        "vqa_by_type": {k: round(float(np.mean(v)), 4) for k, v in sorted(per_type.items())},
        "caption_first_of_8": round(first / m, 4),
        "true_above_distractor": round(above / m, 4),
        "n": n,
    }


def special_token_id(tokenizer: Tokenizer, token: str) -> int:
    """The id of a special token the caption decoder needs ([CLS] starts, [SEP] ends, [PAD] pads)."""
    i = tokenizer.token_to_id(token)
    if i is None:
        raise ValueError(f"the tokenizer has no {token} token")
    return int(i)


@torch.no_grad()
def generate_captions(ckpt: Checkpoint, images: list[bytes], chunk: int = 100) -> list[list[int]]:
    """Greedy caption token ids ([CLS] … [SEP]) of encoded images, by the plain PyTorch loop (`CaptionDecoder.greedy`).

    Rows are decoded together; each stops at its own end token.
    """
    if ckpt.decoder is None:
        raise ValueError(f"checkpoint {ckpt.path or ckpt.config.name} has no caption decoder")
    cfg = ckpt.config
    bos, eos = special_token_id(ckpt.tokenizer, CLS), special_token_id(ckpt.tokenizer, SEP)
    out: list[list[int]] = []
    for i in range(0, len(images), chunk):
        px = torch.from_numpy(np.stack([decode_image(b, cfg.image_size) for b in images[i : i + chunk]]))
        feats, _ = ckpt.model.encode_image(px)
        out += ckpt.decoder.greedy(feats, bos, eos, CAPTION_NEW_TOKENS)
    return out


def caption_accuracy(ckpt: Checkpoint, n: int = 500, seed: int = 54321) -> dict:
    """Share of `n` fresh renders whose greedy caption names exactly the scene's (colour, shape) items, as a multiset.

    Also by number of objects, and the share of captions that parse at all (`world.parse_caption`).
    """
    rng = random.Random(seed)
    scenes = [world.random_scene(rng) for _ in range(n)]
    images = [fresh_render(s, rng) for s in scenes]
    texts = [ckpt.tokenizer.decode(ids, skip_special_tokens=True) for ids in generate_captions(ckpt, images)]
    right = [world.caption_matches(t, s) for t, s in zip(texts, scenes)]
    by_count: dict[int, list[bool]] = defaultdict(list)
    for s, ok in zip(scenes, right):
        by_count[len(s.objects)].append(ok)
    return {
        "caption_items_exact": round(float(np.mean(right)), 4),
        "by_objects": {str(k): round(float(np.mean(v)), 4) for k, v in sorted(by_count.items())},
        "parsed": round(float(np.mean([world.parse_caption(t) is not None for t in texts])), 4),
        "examples": [{"caption": t, "objects": world.caption(world.scene_items(s))} for t, s in zip(texts[:3], scenes)],
        "n": n,
        "seed": seed,
    }
