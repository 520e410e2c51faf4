"""Preprocessing, numpy in and out: image bytes → uint8 pixels, text → token ids and mask.

One module shared by training, the Triton Python models and the Ray Serve layer, so all
three see exactly the same tensors.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError
from tokenizers import Tokenizer

from serving.errors import PayloadTooLarge, SchemaViolation, UnsupportedMediaType

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
DEFAULT_MAX_PIXELS = 4096 * 4096
# The resampling filter used when serving; training draws from several so any filter works.
RESAMPLE = Image.Resampling.BILINEAR
T = TypeVar("T")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, extended, progressive, lossless; not DHT C4, JPG C8, DAC CC).
JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open an image lazily (header only) and check its format and pixel count."""
    img: Image.Image = Image.open(io.BytesIO(data))
    if img.format not in ALLOWED_FORMATS:
        raise UnsupportedMediaType(f"image format {img.format} is not accepted: send PNG, JPEG or WebP bytes")
    _check_pixels(img.size, max_pixels)
    return img


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w * h > max_pixels:
        raise PayloadTooLarge(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")


def checked_image_op(fn: Callable[[], T], size: tuple[int, int] | None = None) -> T:
    """Run an image operation, turning PIL's failures into the API's 413/415 errors.

    PIL's DecompressionBombWarning counts as an error. Where the header already gave a
    `size` PIL does not warn about, the warning filter is skipped: `warnings.catch_warnings()`
    per image costs time on the request path and swaps the process-wide filters under other threads.
    """
    try:
        if size is not None and size[0] * size[1] <= (Image.MAX_IMAGE_PIXELS or 0):
            return fn()
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return fn()
    except (PayloadTooLarge, UnsupportedMediaType):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise PayloadTooLarge(f"image refused as a decompression bomb: {e}") from e
    except UnidentifiedImageError as e:  # its text holds the repr of our buffer: say what it means
        raise UnsupportedMediaType("bytes are not a readable PNG, JPEG or WebP image (no known image header)") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise UnsupportedMediaType(f"bytes are not a readable PNG, JPEG or WebP image ({e})") from e


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) read straight from a PNG's IHDR or a JPEG's start-of-frame segment.

    None for anything else or anything unusual (WebP, a JPEG whose frame header is not where
    it should be): PIL then reads the header. The sizes are the ones PIL reports.
    """
    if data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return (width, height) if width and height else None
    if data[:3] != b"\xff\xd8\xff":
        return None
    i, n = 2, len(data)
    while i + 4 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if marker in JPEG_FRAME_MARKERS:
            if i + 9 > n:
                return None
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return (width, height) if width and height else None
        if marker == 0xDA or length < 2:  # scan data before any frame header: let PIL judge
            return None
        i += 2 + length
    return None


def check_image_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the header alone, no pixel decoded: format and pixel limit checked.

    PNG and JPEG headers are read here directly (PIL's plugin probing is most of the cost of
    this check on the request path); other bytes go through PIL.

    Raises:
        UnsupportedMediaType: not an image of an allowed format (a corrupt body passes: only decoding finds it).
        PayloadTooLarge: more pixels than `max_pixels`.
    """
    size = header_size(data)
    if size is None:
        return checked_image_op(lambda: open_image(data, max_pixels).size)
    _check_pixels(size, max_pixels)
    return size


def decode_image(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode PNG/JPEG/WebP bytes and resize to (size, size, 3) uint8.

    Raises:
        UnsupportedMediaType: not an image of an allowed format, or truncated/corrupt.
        PayloadTooLarge: more pixels than `max_pixels` (a decompression bomb is refused
            from its header, before any pixel is decoded).
    """

    def decode() -> np.ndarray:
        img = open_image(data, max_pixels)
        img.draft("RGB", (size, size))  # JPEG: decode at reduced scale when much larger
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), RESAMPLE)
        return np.asarray(img, dtype=np.uint8)

    header = header_size(data)
    if header is not None:
        _check_pixels(header, max_pixels)
    return checked_image_op(decode, header)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json."""
    return Tokenizer.from_file(str(path))


def tokenize(tokenizer: Tokenizer, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Texts → (ids, mask), each int64 (N, max_len), padded with 0.

    Raises:
        SchemaViolation: a text is empty or longer than `max_len` tokens (with [CLS] and [SEP]).
    """
    ids = np.zeros((len(texts), max_len), dtype=np.int64)
    mask = np.zeros((len(texts), max_len), dtype=np.int64)
    for i, enc in enumerate(tokenizer.encode_batch(list(texts))):
        n = len(enc.ids)
        if n <= 2:
            raise SchemaViolation(f"text {i} is empty: send at least one word")
        if n > max_len:
            raise SchemaViolation(
                f"text {i} has {n} tokens with [CLS] and [SEP], over the limit of {max_len}: shorten it"
            )
        ids[i, :n] = enc.ids
        mask[i, :n] = 1
    return ids, mask
