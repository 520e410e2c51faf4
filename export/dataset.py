"""Pre-rendered training data for stage 0: augmented shapes-world images with every target.

Each sample carries the image (uint8, rendered in many ways), its per-patch
colour and shape labels (dense supervision for the image tower: without it the binding
questions stay near chance in the budget), a question with its answer, the true caption and
a negative caption (mostly one-attribute distractors, the hard case ITM must separate).

The caption stage has its own, lighter set (`render_caption_dataset`): images through the
same augmentation, each with its canonical caption as token ids, the decoder's target.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from multiprocessing import Pool

import numpy as np
from PIL import ImageFilter

from serving.model.preprocess import decode_image, tokenize
from serving.model.tokenizer import build_tokenizer
from serving.shapes import world


@dataclass
class Arrays:
    """A pre-rendered data set, one row per sample."""

    pixels: np.ndarray  # (N, S, S, 3) uint8
    patch_color: np.ndarray  # (N, g*g) int64, 0 = background
    patch_shape: np.ndarray  # (N, g*g) int64, 0 = background
    q_ids: np.ndarray  # (N, L) int64
    q_mask: np.ndarray
    answer: np.ndarray  # (N,) int64 into world.ANSWERS
    qtype: np.ndarray  # (N,) int64 into world.QUESTION_TYPES
    pos_ids: np.ndarray
    pos_mask: np.ndarray
    neg_ids: np.ndarray
    neg_mask: np.ndarray
    scene_key: np.ndarray  # (N,) int64: equal keys = same caption multiset (contrastive positives)


def _vary_question(q: str, rng: random.Random) -> str:
    """Case, spacing and the optional '?' vary, as users type them."""
    if rng.random() < 0.5:
        q = q.rstrip("?")
    if rng.random() < 0.2:
        q = q.upper() if rng.random() < 0.3 else q.capitalize()
    if rng.random() < 0.2:
        q = "  " + q.replace(" ", "  ") + " "
    return q


def augmented_image(scene: world.Scene, rng: random.Random, side: int) -> np.ndarray:
    """One render of the scene at `side` px, through one of several plausible pipelines."""
    if rng.random() < 0.5:
        # The serving path itself: encoded bytes at some size, decoded and resized by decode_image.
        src = rng.choice([side, side, 72, 96, 128, 200, 256, 320])
        img = world.render(scene, src, supersample=rng.choice([1, 2]) if src <= 200 else 1)
        if rng.random() < 0.25:
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0) * src / 64))
        data = world.encode(img, "JPEG", rng.randint(60, 95)) if rng.random() < 0.7 else world.encode(img, "PNG")
        return decode_image(data, side)
    img = world.augmented_render(scene, rng, side)
    if rng.random() < 0.15:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.6)))
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def patch_labels(scene: world.Scene, side: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch (colour, shape) ids: the object covering most of a patch if ≥ 20 % of it, else 0."""
    colors, shapes = world.label_map(scene, side)
    ps = side // grid
    obj = np.zeros((side, side), dtype=np.int64)
    col_ids, shp_ids = [0], [0]
    for i, o in enumerate(scene.objects):
        m = (colors == world.COLOR_NAMES.index(o.color) + 1) & (shapes == world.SHAPES.index(o.shape) + 1)
        obj[m] = i + 1
        col_ids.append(world.COLOR_NAMES.index(o.color) + 1)
        shp_ids.append(world.SHAPES.index(o.shape) + 1)
    cover = np.stack(
        [(obj == k).reshape(grid, ps, grid, ps).mean(axis=(1, 3)).ravel() for k in range(len(scene.objects) + 1)]
    )  # (K+1, g*g)
    cover[0] = 0.2  # background wins unless an object covers at least 20 %
    best = cover.argmax(axis=0)
    return np.array(col_ids)[best], np.array(shp_ids)[best]


def _scene_key(scene: world.Scene) -> int:
    key = 0
    for c, s in sorted(world.scene_items(scene)):
        key = key * 13 + world.COLOR_NAMES.index(c) * 3 + world.SHAPES.index(s) + 1
    return key


def _render_chunk(args: tuple[int, int, int, int, int]) -> Arrays:
    seed, n, side, grid, max_len = args
    rng = random.Random(seed)
    tok = build_tokenizer()
    rows: dict[str, list] = {k: [] for k in Arrays.__dataclass_fields__}
    questions, pos, neg = [], [], []
    for _ in range(n):
        scene = world.random_scene(rng)
        rows["pixels"].append(augmented_image(scene, rng, side))
        pc, pshape = patch_labels(scene, side, grid)
        rows["patch_color"].append(pc)
        rows["patch_shape"].append(pshape)
        qa = world.sample_question(scene, rng)
        questions.append(_vary_question(qa.question, rng))
        rows["answer"].append(world.ANSWERS.index(qa.answer))
        rows["qtype"].append(world.QUESTION_TYPES.index(qa.qtype))
        pos.append(world.caption(world.scene_items(scene), rng))
        if rng.random() < 0.8:
            neg.append(world.distractor_captions(scene, rng, 1)[0])
        else:
            neg.append(world.random_caption_negative(scene, rng))
        rows["scene_key"].append(_scene_key(scene))
    q_ids, q_mask = tokenize(tok, questions, max_len)
    pos_ids, pos_mask = tokenize(tok, pos, max_len)
    neg_ids, neg_mask = tokenize(tok, neg, max_len)
    return Arrays(
        pixels=np.stack(rows["pixels"]),
        patch_color=np.stack(rows["patch_color"]),
        patch_shape=np.stack(rows["patch_shape"]),
        q_ids=q_ids,
        q_mask=q_mask,
        answer=np.array(rows["answer"]),
        qtype=np.array(rows["qtype"]),
        pos_ids=pos_ids,
        pos_mask=pos_mask,
        neg_ids=neg_ids,
        neg_mask=neg_mask,
        scene_key=np.array(rows["scene_key"]),
    )


def render_dataset(n: int, seed: int, side: int, grid: int, max_len: int, workers: int = 2) -> Arrays:
    """Render `n` samples deterministically from `seed`, split over `workers` processes."""
    chunk = 2000
    jobs = [
        (seed * 1_000_003 + i, min(chunk, n - i * chunk), side, grid, max_len) for i in range((n + chunk - 1) // chunk)
    ]
    with Pool(workers) as pool:
        parts = pool.map(_render_chunk, jobs)
    return Arrays(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in Arrays.__dataclass_fields__})


@dataclass
class CaptionArrays:
    """The caption stage's data set: augmented images and their canonical captions."""

    pixels: np.ndarray  # (N, S, S, 3) uint8
    ids: np.ndarray  # (N, L) int64: [CLS] caption [SEP], then [PAD] (0)
    mask: np.ndarray  # (N, L) int64


def _render_caption_chunk(args: tuple[int, int, int, int]) -> CaptionArrays:
    seed, n, side, max_len = args
    rng = random.Random(seed)
    tok = build_tokenizer()
    pixels, texts = [], []
    for _ in range(n):
        scene = world.random_scene(rng)
        pixels.append(augmented_image(scene, rng, side))
        texts.append(world.canonical_caption(world.scene_items(scene)))
    ids, mask = tokenize(tok, texts, max_len)
    return CaptionArrays(pixels=np.stack(pixels), ids=ids, mask=mask)


def render_caption_dataset(n: int, seed: int, side: int, max_len: int, workers: int = 2) -> CaptionArrays:
    """Render `n` (image, canonical caption) samples deterministically from `seed`, over `workers` processes."""
    chunk = 2000
    jobs = [(seed * 7_000_003 + i, min(chunk, n - i * chunk), side, max_len) for i in range((n + chunk - 1) // chunk)]
    with Pool(workers) as pool:
        parts = pool.map(_render_caption_chunk, jobs)
    fields = CaptionArrays.__dataclass_fields__
    return CaptionArrays(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in fields})
