"""The shapes world: scenes, renders, questions, answers, captions and distractors.

Used by training (with augmentation), by tests and by load generators. Never by the
serving path: every answer the service gives comes from the model's heads.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
COUNTS: tuple[str, ...] = ("0", "1", "2", "3", "4")
# The closed answer vocabulary of the VQA head, in head order.
ANSWERS: tuple[str, ...] = (*COLOR_NAMES, *SHAPES, *COUNTS, "yes", "no")
QUESTION_TYPES: tuple[str, ...] = ("color_of_shape", "shape_of_color", "count_shape", "count_color", "exists")


@dataclass(frozen=True)
class ShapeObject:
    """One object in a scene, its box in unit coordinates (x0, y0, side)."""

    shape: str
    color: str
    x: float
    y: float
    size: float
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    """A background colour and 1-4 non-overlapping objects."""

    background: tuple[int, int, int]
    objects: tuple[ShapeObject, ...]


@dataclass(frozen=True)
class QA:
    """A question about a scene with its answer and type."""

    question: str
    answer: str
    qtype: str


def random_scene(rng: random.Random, n_objects: int | None = None) -> Scene:
    """Sample a scene: light background, 1-4 objects whose boxes do not overlap."""
    background = tuple(rng.randint(200, 255) for _ in range(3))
    n = n_objects if n_objects is not None else rng.randint(1, 4)
    objects: list[ShapeObject] = []
    while len(objects) < n:
        placed = False
        for _ in range(200):
            size = rng.uniform(0.15, 0.30)
            x, y = rng.uniform(0.0, 1.0 - size), rng.uniform(0.0, 1.0 - size)
            gap = 0.01
            if all(
                x + size + gap <= o.x or o.x + o.size + gap <= x or y + size + gap <= o.y or o.y + o.size + gap <= y
                for o in objects
            ):
                color = rng.choice(COLOR_NAMES)
                rgb = tuple(int(np.clip(c + rng.randint(-25, 25), 0, 255)) for c in COLORS[color])
                objects.append(ShapeObject(rng.choice(SHAPES), color, x, y, size, rgb))  # type: ignore[arg-type]
                placed = True
                break
        if not placed:  # rare: restart with a fresh layout
            objects = []
    return Scene(background, tuple(objects))  # type: ignore[arg-type]


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObject, side: int, fill: int | tuple[int, int, int]) -> None:
    x0, y0 = obj.x * side, obj.y * side
    x1, y1 = (obj.x + obj.size) * side - 1, (obj.y + obj.size) * side - 1
    if obj.shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif obj.shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def render(scene: Scene, side: int = 64, supersample: int = 1) -> Image.Image:
    """Render a scene to an RGB image; supersample > 1 gives anti-aliased edges."""
    big = side * supersample
    img = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw(draw, obj, big, obj.rgb)
    if supersample > 1:
        img = img.resize((side, side), Image.Resampling.LANCZOS)
    return img


def label_map(scene: Scene, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel (colour, shape) class ids at `side` px: 0 is background, else index + 1."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    for i, obj in enumerate(scene.objects):
        _draw(draw, obj, side, i + 1)
    idx = np.asarray(mask)
    color_ids = np.array([0] + [COLOR_NAMES.index(o.color) + 1 for o in scene.objects], dtype=np.int64)
    shape_ids = np.array([0] + [SHAPES.index(o.shape) + 1 for o in scene.objects], dtype=np.int64)
    return color_ids[idx], shape_ids[idx]


def encode(img: Image.Image, fmt: str = "PNG", quality: int = 90) -> bytes:
    """Encode an image to PNG or JPEG bytes."""
    buf = io.BytesIO()
    if fmt.upper() in ("JPEG", "JPG"):
        img.save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format=fmt.upper())
    return buf.getvalue()


def augmented_render(scene: Scene, rng: random.Random, out_side: int = 64) -> Image.Image:
    """Render as varied renderers would: size, anti-aliasing, blur, JPEG, resampling filter."""
    side = rng.choice([out_side, out_side, 80, 96, 128, 160, 256])
    img = render(scene, side, supersample=rng.choice([1, 1, 2, 4]))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0) * side / 64))
    if rng.random() < 0.6:
        img = Image.open(io.BytesIO(encode(img, "JPEG", rng.randint(60, 95)))).convert("RGB")
    if side != out_side:
        filt = rng.choice(
            [
                Image.Resampling.BILINEAR,
                Image.Resampling.BICUBIC,
                Image.Resampling.LANCZOS,
                Image.Resampling.BOX,
                Image.Resampling.NEAREST,
                Image.Resampling.HAMMING,
            ]
        )
        img = img.resize((out_side, out_side), filt)
    return img


def _count(scene: Scene, shape: str | None = None, color: str | None = None) -> int:
    return sum(1 for o in scene.objects if (shape is None or o.shape == shape) and (color is None or o.color == color))


def all_questions(scene: Scene) -> list[QA]:
    """Every question the shapes world allows about this scene, with its answer."""
    out: list[QA] = []
    for shape in SHAPES:
        if _count(scene, shape=shape) == 1:
            color = next(o.color for o in scene.objects if o.shape == shape)
            out.append(QA(f"what color is the {shape}?", color, "color_of_shape"))
        out.append(QA(f"how many {shape}s are there?", str(_count(scene, shape=shape)), "count_shape"))
    for color in COLOR_NAMES:
        if _count(scene, color=color) == 1:
            shape = next(o.shape for o in scene.objects if o.color == color)
            out.append(QA(f"what shape is the {color} object?", shape, "shape_of_color"))
        out.append(QA(f"how many {color} objects are there?", str(_count(scene, color=color)), "count_color"))
        for shape in SHAPES:
            yes = _count(scene, shape=shape, color=color) > 0
            out.append(QA(f"is there a {color} {shape}?", "yes" if yes else "no", "exists"))
    return out


def sample_question(scene: Scene, rng: random.Random) -> QA:
    """A question with its type drawn uniformly first, then its answer balanced where possible."""
    qas = all_questions(scene)
    by_type: dict[str, list[QA]] = {}
    for qa in qas:
        by_type.setdefault(qa.qtype, []).append(qa)
    qtype = rng.choice(sorted(by_type))
    pool = by_type[qtype]
    if qtype == "exists":  # balance yes/no: most combinations are absent
        yes = [q for q in pool if q.answer == "yes"]
        if yes and rng.random() < 0.5:
            pool = yes
    elif qtype.startswith("count"):  # avoid a flood of zeros and ones: large counts are rare otherwise
        r = rng.random()
        if r < 0.4:
            pool = [max(pool, key=lambda q: int(q.answer))]
        elif r < 0.85:
            pool = [q for q in pool if q.answer != "0"] or pool
    return rng.choice(pool)


def caption(objects: list[tuple[str, str]] | tuple[tuple[str, str], ...], rng: random.Random | None = None) -> str:
    """`a {color} {shape}` items joined by ` and `, shuffled when rng is given."""
    items = list(objects)
    if rng is not None:
        rng.shuffle(items)
    return " and ".join(f"a {c} {s}" for c, s in items)


def scene_items(scene: Scene) -> list[tuple[str, str]]:
    """The (color, shape) pairs a caption of this scene names."""
    return [(o.color, o.shape) for o in scene.objects]


def canonical_items(items: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    """Items in the one order the caption decoder learns: by colour, then shape, as COLOR_NAMES and SHAPES list them."""
    return sorted(items, key=lambda it: (COLOR_NAMES.index(it[0]), SHAPES.index(it[1])))


def canonical_caption(items: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> str:
    """The caption the decoder is trained to generate: `canonical_items` joined as `caption` joins them."""
    return caption(canonical_items(items))


def parse_caption(text: str) -> list[tuple[str, str]] | None:
    """The (color, shape) items a caption names, in its order; None when it is not a shapes-world caption.

    Accepts what `caption` writes in any case and spacing (`a red circle and a blue square`),
    with `an` for `a`; anything else (an unknown word, a missing `and`, a plural) is None.
    """
    words = text.lower().split()
    items: list[tuple[str, str]] = []
    i = 0
    while i < len(words):
        if items:
            if words[i] != "and":
                return None
            i += 1
        if i + 3 > len(words) or words[i] not in ("a", "an"):
            return None
        color, shape = words[i + 1], words[i + 2]
        if color not in COLORS or shape not in SHAPES:
            return None
        items.append((color, shape))
        i += 3
    return items or None


def caption_matches(text: str, scene: Scene) -> bool:
    """Whether a caption names exactly the scene's objects (a multiset: order free, duplicates counted)."""
    items = parse_caption(text)
    return items is not None and _same_multiset(items, scene_items(scene))


def _same_multiset(a: list[tuple[str, str]], b: list[tuple[str, str]]) -> bool:
    return sorted(a) == sorted(b)


def distractor_captions(scene: Scene, rng: random.Random, n: int) -> list[str]:
    """`n` distinct captions that each change one attribute (a colour or a shape) of one object."""
    items = scene_items(scene)
    candidates: list[list[tuple[str, str]]] = []
    for i, (c, s) in enumerate(items):
        for c2 in COLOR_NAMES:
            if c2 != c:
                candidates.append(items[:i] + [(c2, s)] + items[i + 1 :])
        for s2 in SHAPES:
            if s2 != s:
                candidates.append(items[:i] + [(c, s2)] + items[i + 1 :])
    unique: list[list[tuple[str, str]]] = []
    for cand in candidates:
        if not _same_multiset(cand, items) and not any(_same_multiset(cand, u) for u in unique):
            unique.append(cand)
    rng.shuffle(unique)
    out = [caption(u, rng) for u in unique[:n]]
    # A one-object scene has only 5 one-attribute variants: pad with other scenes' captions.
    while len(out) < n:
        extra = random_caption_negative(scene, rng)
        if extra not in out:
            out.append(extra)
    return out


def random_caption_negative(scene: Scene, rng: random.Random) -> str:
    """A caption of another random scene that does not describe this one."""
    while True:
        other = random_scene(rng)
        if not _same_multiset(scene_items(other), scene_items(scene)):
            return caption(scene_items(other), rng)
