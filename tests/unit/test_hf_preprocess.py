"""Imported checkpoints: vtfuse's preprocessing gives what the checkpoint's own `transformers` processor gives.

The served path decodes and resizes (`decode_for`) outside the engine, and the engine graph
rescales and normalises (x·rescale_factor − mean) / std in float32; together they must equal
`AutoProcessor(images=...)['pixel_values']` (same shape, same values) for every image a user
may send. Texts go through the checkpoint's tokenizer.json, padded to a multiple of 16.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("transformers")
pytest.importorskip("torch")

from export.hf.source import HfSource, image_processing, resolve_source, tokenizer_json  # noqa: E402
from serving.errors import PayloadTooLarge, SchemaViolation  # noqa: E402
from serving.families.imported import (  # noqa: E402
    PAD_MULTIPLE,
    ImageProcessing,
    decode_for,
    load_plain_tokenizer,
    tokenize_padded,
)
from tests.hf.checkpoints import build_blip, build_vilt  # noqa: E402

MAX_PIXELS = 10_000_000
TOLERANCE = 1e-5


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(w: int, h: int, seed: int) -> np.ndarray:
    """Random pixels plus a gradient: every resampling tap matters, and the image is not flat."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    grad = np.stack([255 * x / max(1, w - 1), 255 * y / max(1, h - 1), 128 + 0 * x], axis=-1)
    return np.clip(0.6 * grad + 0.4 * rng.integers(0, 256, (h, w, 3)), 0, 255).astype(np.uint8)


def _images() -> dict[str, bytes]:
    """What users send: squares, wide and tall images, large ones, transparency, JPEG, grayscale, a palette."""
    out = {}
    for i, (w, h) in enumerate([(64, 64), (100, 37), (37, 100), (300, 200), (64, 400), (400, 64), (1, 1), (17, 23)]):
        out[f"png_{w}x{h}"] = _encode(Image.fromarray(_noise(w, h, i)), "PNG")
    rgba = np.dstack([_noise(80, 50, 10), np.random.default_rng(11).integers(0, 256, (50, 80), dtype=np.uint8)])
    rgba[:10, :, 3] = 0  # fully transparent band: composited on white
    out["png_rgba_80x50"] = _encode(Image.fromarray(rgba, "RGBA"), "PNG")
    out["jpeg_90x70"] = _encode(Image.fromarray(_noise(90, 70, 12)), "JPEG", quality=85)
    out["jpeg_grayscale_77x45"] = _encode(Image.fromarray(_noise(77, 45, 13)[..., 0], "L"), "JPEG")
    out["png_grayscale_45x77"] = _encode(Image.fromarray(_noise(45, 77, 14)[..., 1], "L"), "PNG")
    pal = Image.fromarray(_noise(60, 40, 15)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    out["png_palette_transparent_60x40"] = _encode(pal, "PNG", transparency=0)
    return out


IMAGES = _images()


@pytest.fixture(scope="module")
def blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_blip(tmp_path_factory.mktemp("blip"))


@pytest.fixture(scope="module")
def vilt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vilt(tmp_path_factory.mktemp("vilt"))


@pytest.fixture(scope="module", params=["blip", "vilt"])
def checkpoint(request: pytest.FixtureRequest) -> tuple[str, Path]:
    return request.param, request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def source(checkpoint: tuple[str, Path]) -> HfSource:
    return resolve_source(str(checkpoint[1]))


@pytest.fixture(scope="module")
def processor(checkpoint: tuple[str, Path]):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(checkpoint[1]))


@pytest.fixture(scope="module")
def processing(source: HfSource) -> ImageProcessing:
    return image_processing(source)


def engine_normalise(pixels: np.ndarray, p: ImageProcessing) -> np.ndarray:
    """What the engine graph does to the uint8 (H, W, 3) pixels: float32 rescale, normalise, CHW."""
    x = pixels.astype(np.float32)
    if p.do_rescale:
        x = x * np.float32(p.rescale_factor)
    if p.do_normalize:
        x = (x - np.asarray(p.mean, np.float32)) / np.asarray(p.std, np.float32)
    return x.transpose(2, 0, 1)


def reference(processor, data: bytes) -> np.ndarray:
    """The processor's pixel_values for the image as a user's PIL opens it.

    ViLT's processor has no `do_convert_rgb` and refuses non-RGB images (4 or 1 channels
    against 3 means); for those it is asked to convert as BLIP's does (transparency on white).
    """
    img = Image.open(io.BytesIO(data))
    kwargs = {}
    if img.mode != "RGB" and not getattr(processor.image_processor, "do_convert_rgb", None):
        kwargs["do_convert_rgb"] = True
    return processor(images=img, return_tensors="np", **kwargs)["pixel_values"][0]


def test_families_read_the_processor_settings(checkpoint, processing):
    name, _ = checkpoint
    if name == "blip":
        assert (processing.mode, processing.height, processing.width) == ("fixed", 64, 64)
    else:
        assert (processing.mode, processing.shortest_edge, processing.size_divisor) == ("vilt", 64, 16)
    assert processing.resample == Image.Resampling.BICUBIC


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_pixels_equal_the_processors(checkpoint, processing, processor, image):
    data = IMAGES[image]
    pixels = decode_for(processing, data, MAX_PIXELS)
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    ours = engine_normalise(pixels, processing)
    ref = reference(processor, data)
    assert ours.shape == ref.shape, f"{checkpoint[0]} {image}: resized to {ours.shape}, processor {ref.shape}"
    err = float(np.abs(ours - ref.astype(np.float32)).max())
    assert err <= TOLERANCE, f"{checkpoint[0]} {image}: max abs difference {err:.3g}"


def test_vilt_sizes_keep_the_aspect_ratio_cap_the_longer_edge_and_divide_by_the_patch(vilt):
    p = image_processing(resolve_source(str(vilt)))
    cases = {  # (width, height) → processor's (height, width): shortest edge 64, longer ≤ int(64·1333/800) = 106
        (64, 64): (64, 64),
        (300, 200): (64, 96),
        (64, 400): (96, 16),  # capped: 64 × 400 would be 64 × 400, the longer edge 106 wins
        (400, 64): (16, 96),
    }
    for (w, h), expected in cases.items():
        got = decode_for(p, _encode(Image.fromarray(_noise(w, h, 0)), "PNG"), MAX_PIXELS).shape[:2]
        assert got == expected, f"{w}x{h}"
        assert got[0] % 16 == 0 and got[1] % 16 == 0 and max(got) <= 106


def test_vilt_image_too_elongated_for_the_model_is_a_422_not_a_corrupt_image(vilt):
    # 10 × 120 resizes to 8.8 × 106 → 0 columns after the size divisor: transformers itself fails.
    p = image_processing(resolve_source(str(vilt)))
    data = _encode(Image.fromarray(_noise(10, 120, 0)), "PNG")
    with pytest.raises(SchemaViolation) as e:
        decode_for(p, data, MAX_PIXELS)
    assert e.value.http_status == 422
    assert "10x120" in e.value.message


def test_over_the_pixel_limit_is_a_413(checkpoint, processing):
    with pytest.raises(PayloadTooLarge):
        decode_for(processing, IMAGES["png_300x200"], max_pixels=300 * 200 - 1)


# -- tokenizer ----------------------------------------------------------------------------

TEXTS = [
    "what color is the circle?",
    "Is there a RED Square?",
    "How many Zebras and giraffes are there?",  # unknown words → [UNK] / word pieces
    "a",
    "are there 3 yellow triangles and 2 blue circles?",
]


@pytest.fixture(scope="module")
def plain(source: HfSource, tmp_path_factory: pytest.TempPathFactory):
    text, max_tokens = tokenizer_json(source)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(text)
    return load_plain_tokenizer(path), max_tokens


def test_token_limit_is_the_text_position_table(checkpoint, plain):
    name, _ = checkpoint
    _, max_tokens = plain
    assert max_tokens == {"blip": 48, "vilt": 40}[name]  # tests/hf/checkpoints.py max_position_embeddings


def test_ids_and_mask_equal_the_processors_tokenizer(processor, plain):
    tok, max_tokens = plain
    ids, mask = tokenize_padded(tok, TEXTS, max_tokens)
    ref = [processor.tokenizer(t) for t in TEXTS]
    longest = max(len(r["input_ids"]) for r in ref)
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids.shape == mask.shape == (len(TEXTS), -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
    unk = processor.tokenizer.unk_token_id
    assert any(unk in r["input_ids"] for r in ref), "the texts should include a word the vocabulary lacks"
    for i, r in enumerate(ref):
        n = len(r["input_ids"])
        assert ids[i, :n].tolist() == r["input_ids"], TEXTS[i]
        assert mask[i, :n].tolist() == r["attention_mask"], TEXTS[i]
        assert not ids[i, n:].any() and not mask[i, n:].any(), f"{TEXTS[i]}: padding is masked out"


def test_one_text_alone_is_not_padded_to_the_models_limit(processor, plain):
    tok, max_tokens = plain
    ids, mask = tokenize_padded(tok, ["what color is the circle?"], max_tokens)
    assert ids.shape == (1, PAD_MULTIPLE)
    assert int(mask.sum()) == len(processor.tokenizer("what color is the circle?")["input_ids"])


def test_a_text_of_exactly_the_limit_is_taken_and_the_width_never_exceeds_it(plain):
    tok, max_tokens = plain
    text = " ".join(["red"] * (max_tokens - 2))  # + [CLS] and [SEP]
    ids, mask = tokenize_padded(tok, [text, "a"], max_tokens)
    assert ids.shape == (2, max_tokens)
    assert int(mask[0].sum()) == max_tokens


def test_a_text_over_the_limit_is_a_422_naming_the_limit(plain):
    tok, max_tokens = plain
    text = " ".join(["red"] * (max_tokens - 1))
    with pytest.raises(SchemaViolation) as e:
        tokenize_padded(tok, ["a", text], max_tokens)
    assert e.value.http_status == 422
    assert f"limit of {max_tokens}" in e.value.message
    assert "text 1" in e.value.message


def test_an_empty_text_is_a_422(plain):
    tok, max_tokens = plain
    with pytest.raises(SchemaViolation, match="empty"):
        tokenize_padded(tok, ["a red circle", "   "], max_tokens)


def test_saved_padding_and_truncation_are_turned_off(source: HfSource, plain, tmp_path: Path):
    # A tokenizer.json saved with padding to 512 and truncation must not pad nor cut silently.
    from tokenizers import Tokenizer

    text, max_tokens = tokenizer_json(source)
    tok = Tokenizer.from_str(text)
    tok.enable_padding(length=max_tokens)
    tok.enable_truncation(max_length=4)
    path = tmp_path / "tokenizer.json"
    path.write_text(tok.to_str())
    loaded = load_plain_tokenizer(path)
    ids, _ = tokenize_padded(loaded, ["a red circle"], max_tokens)
    assert ids.shape == (1, PAD_MULTIPLE)
    with pytest.raises(SchemaViolation):
        tokenize_padded(loaded, [" ".join(["red"] * max_tokens)], max_tokens)


# Just enough of torchvision for transformers to find it importable and import its torchvision code paths.
TORCHVISION_STUB_FILES = {
    "torchvision/__init__.py": '__version__ = "0.29.1"\n\n\ndef io(*args, **kwargs):\n    raise NotImplementedError\n',
    "torchvision/transforms/__init__.py": (
        "import enum\n\n\nclass InterpolationMode(enum.Enum):\n"
        + "".join(f"    {m} = {m.lower()!r}\n" for m in ("NEAREST", "NEAREST_EXACT", "BILINEAR", "BICUBIC", "BOX",
                                                          "HAMMING", "LANCZOS"))
    ),
    "torchvision/transforms/functional.py": "def pil_to_tensor(*args, **kwargs):\n    raise NotImplementedError\n",
    "torchvision/transforms/v2/__init__.py": "",
    "torchvision/transforms/v2/functional.py": "",
    "torchvision-0.29.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: torchvision\nVersion: 0.29.1\n",
}
PROCESSOR_CLASSES = """
import json, sys
from export.hf.importer import _processor
from export.hf.source import image_processing, resolve_source
src = resolve_source(sys.argv[1])
print(json.dumps({"image_processor": type(_processor(src).image_processor).__name__,
                  "height": image_processing(src).height}))
"""


def test_processors_keep_the_pil_backend_when_torchvision_is_importable(blip, tmp_path):
    """transformers 5 prefers its torchvision backend when torchvision imports: vtfuse asks for PIL explicitly."""
    import json
    import os
    import subprocess
    import sys

    for name, text in TORCHVISION_STUB_FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)])}
    done = subprocess.run([sys.executable, "-c", PROCESSOR_CLASSES, str(blip)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got == {"image_processor": "BlipImageProcessorPil", "height": 64}
