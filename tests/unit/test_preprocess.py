"""Preprocessing: PNG/JPEG/WebP of any size → uint8 pixels; bad bytes → narrow errors; tokenizer round trip."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from serving.errors import PayloadTooLarge, SchemaViolation, UnsupportedMediaType
from serving.model.preprocess import check_image_header, decode_image, header_size, tokenize
from serving.model.tokenizer import build_tokenizer
from serving.shapes import world


def _encoded(side: int, fmt: str, mode: str = "RGB") -> bytes:
    img = world.render(world.random_scene(random.Random(side)), side).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("side", [64, 65, 300, 1024])
def test_any_size_and_format_decodes_to_model_size(fmt, side):
    px = decode_image(_encoded(side, fmt), 64)
    assert px.shape == (64, 64, 3) and px.dtype == np.uint8


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_other_modes_become_rgb(mode):
    assert decode_image(_encoded(80, "PNG", mode), 64).shape == (64, 64, 3)


def test_non_rectangular_is_resized():
    buf = io.BytesIO()
    Image.new("RGB", (200, 90), (230, 230, 230)).save(buf, format="PNG")
    assert decode_image(buf.getvalue(), 64).shape == (64, 64, 3)


def test_not_an_image_is_unsupported_media():
    with pytest.raises(UnsupportedMediaType, match="PNG, JPEG or WebP"):
        decode_image(b"this is text, not an image", 64)


def test_truncated_jpeg_is_unsupported_media():
    data = _encoded(256, "JPEG")
    with pytest.raises(UnsupportedMediaType):
        decode_image(data[: len(data) // 2], 64)


def test_gif_is_refused():
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="GIF")
    with pytest.raises(UnsupportedMediaType, match="GIF"):
        decode_image(buf.getvalue(), 64)


def _saved(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


HEADER_CASES = {
    "png rgb": lambda: _saved(Image.new("RGB", (300, 17)), "PNG"),
    "png rgba": lambda: _saved(Image.new("RGBA", (1, 4096)), "PNG"),
    "png 16-bit grey": lambda: _saved(Image.new("I;16", (65, 64)), "PNG"),
    "png palette": lambda: _saved(Image.new("P", (640, 480)), "PNG"),
    "jpeg baseline": lambda: _saved(Image.new("RGB", (1024, 768)), "JPEG"),
    "jpeg progressive": lambda: _saved(Image.new("RGB", (333, 222)), "JPEG", progressive=True),
    "jpeg grey": lambda: _saved(Image.new("L", (64, 65)), "JPEG"),
    "jpeg cmyk": lambda: _saved(Image.new("CMYK", (120, 90)), "JPEG"),
    "jpeg exif + icc": lambda: _saved(
        Image.new("RGB", (77, 99)), "JPEG", exif=Image.Exif().tobytes(), icc_profile=b"\0" * 5000
    ),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_header_read_directly_gives_pils_size(case):
    data = HEADER_CASES[case]()
    assert header_size(data) == Image.open(io.BytesIO(data)).size
    assert check_image_header(data) == Image.open(io.BytesIO(data)).size


@pytest.mark.parametrize(
    "data",
    [
        _encoded(64, "WEBP"),
        _encoded(64, "GIF"),
        b"hello world\n" * 50,
        b"",
        b"\x89PNG\r\n\x1a\n",  # a signature and nothing else
        b"\xff\xd8\xff\xe0\x00\x10JFIF",  # a JPEG cut before its frame header
    ],
)
def test_other_bytes_are_left_to_pil(data):
    assert header_size(data) is None


def test_header_check_keeps_the_errors_of_pil():
    assert check_image_header(_encoded(64, "WEBP")) == (64, 64)
    with pytest.raises(UnsupportedMediaType, match="GIF"):
        check_image_header(_encoded(64, "GIF"))
    with pytest.raises(UnsupportedMediaType, match="no known image header"):
        check_image_header(b"hello world\n" * 50)
    with pytest.raises(PayloadTooLarge, match="300x17 = 5100 pixels, over the limit of 5000"):
        check_image_header(HEADER_CASES["png rgb"](), max_pixels=5000)
    with pytest.raises(PayloadTooLarge, match="1024x768 = 786432 pixels"):
        check_image_header(HEADER_CASES["jpeg baseline"](), max_pixels=4096)


def test_decompression_bomb_refused_from_header():
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")  # tiny file, 400 M pixels
    with pytest.raises(PayloadTooLarge, match="pixels"):
        decode_image(buf.getvalue(), 64, max_pixels=4096 * 4096)
    with pytest.raises(PayloadTooLarge, match="pixels"):
        check_image_header(buf.getvalue(), max_pixels=4096 * 4096)
    # Over the limit of PIL's own guard too: refused as a bomb, not decoded.
    with pytest.raises(PayloadTooLarge, match="decompression bomb"):
        decode_image(buf.getvalue(), 64, max_pixels=10**12)
    # Between PIL's warning (89 M pixels) and its error: the warning refuses it as well.
    warned = io.BytesIO()
    Image.new("1", (10000, 10000)).save(warned, format="PNG")
    with pytest.raises(PayloadTooLarge, match="decompression bomb"):
        decode_image(warned.getvalue(), 64, max_pixels=10**12)


def test_tokenizer_round_trip_and_normalisation():
    tok = build_tokenizer()
    ids, mask = tokenize(tok, ["  What COLOR is the   circle?", "what color is the circle"], 24)
    np.testing.assert_array_equal(ids[0], ids[1])
    n = int(mask[0].sum())
    assert tok.decode(ids[0, :n].tolist()) == "what color is the circle"
    assert ids[0, 0] == tok.token_to_id("[CLS]") and ids[0, n - 1] == tok.token_to_id("[SEP]")
    assert (ids[0, n:] == 0).all()


def test_every_spec_word_is_in_vocabulary():
    tok = build_tokenizer()
    rng = random.Random(0)
    for _ in range(50):
        s = world.random_scene(rng)
        for text in [q.question for q in world.all_questions(s)] + [world.caption(world.scene_items(s), rng)]:
            assert "[UNK]" not in tok.encode(text).tokens, text


def test_token_limit_and_empty_text():
    tok = build_tokenizer()
    with pytest.raises(SchemaViolation, match="over the limit of 24"):
        tokenize(tok, ["a red circle and " * 10], 24)
    with pytest.raises(SchemaViolation, match="empty"):
        tokenize(tok, ["   "], 24)
