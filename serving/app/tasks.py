"""Protocol-neutral tasks (what HTTP JSON, multipart and gRPC requests become) and the limits they must meet."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field

from serving.app import schemas
from serving.app.settings import Limits
from serving.errors import InvalidBase64, PayloadTooLarge, SchemaViolation, UnknownModel
from serving.generation.params import GenerationParams


@dataclass(frozen=True)
class VqaTask:
    """Answer `questions` about `image`."""

    model: str
    image: bytes
    questions: list[str]
    top_k: int = 1
    return_attention: bool = False


@dataclass(frozen=True)
class MatchTask:
    """ITM probability of each text for `image`."""

    model: str
    image: bytes
    texts: list[str]


@dataclass(frozen=True)
class RetrieveTask:
    """Rank `texts` for `image` (image form) or `images` for `text` (text form)."""

    model: str
    top_k: int = 1
    image: bytes | None = None
    texts: list[str] | None = None
    text: str | None = None
    images: list[bytes] | None = None
    shortlist: int | str | None = None  # None: max(16, 4·top_k); a number; "all": ITM on every candidate

    @property
    def image_form(self) -> bool:
        """True when ranking texts for an image."""
        return self.image is not None


@dataclass(frozen=True)
class EmbedTask:
    """Embeddings of `images` and `texts` (either may be empty, not both)."""

    model: str
    images: list[bytes] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CaptionTask:
    """Generate a caption for `image` (after `prompt`, if any) with these generation parameters."""

    model: str
    image: bytes
    prompt: str | None = None
    params: GenerationParams = field(default_factory=GenerationParams)
    stream: bool = False


Task = VqaTask | MatchTask | RetrieveTask | EmbedTask | CaptionTask

_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)


def decode_b64(value: str, what: str) -> bytes:
    """Strict base64 (whitespace and a `data:...;base64,` prefix tolerated) → bytes.

    Raises:
        InvalidBase64: not valid base64 (HTTP 400).
    """
    s = _DATA_URL.sub("", value.strip(), count=1)
    s = "".join(s.split())
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidBase64(f"{what} is not valid base64 ({e}): send base64 of the image file bytes") from e


def resolve_model(name: str | None, served: dict[str, object] | list[str], default: str) -> str:
    """The served model a request names (or the default).

    Raises:
        UnknownModel: the name is not served (HTTP 422).
    """
    if name is None or name == "":
        return default
    if name not in served:
        raise UnknownModel(f"model {name!r} is not served: use one of {', '.join(sorted(served))} or omit `model`")
    return name


def from_http(body: schemas._Request, model: str) -> Task:
    """A validated HTTP body → task (base64 decoded here: bad base64 is 400, not 422)."""
    if isinstance(body, schemas.VqaRequest):
        return VqaTask(model, decode_b64(body.image, "image"), list(body.questions), body.top_k, body.return_attention)
    if isinstance(body, schemas.MatchRequest):
        return MatchTask(model, decode_b64(body.image, "image"), list(body.texts))
    if isinstance(body, schemas.RetrieveRequest):
        if body.image is not None:
            return RetrieveTask(model, body.top_k, image=decode_b64(body.image, "image"), texts=list(body.texts or []),
                                shortlist=body.shortlist)
        images = [decode_b64(b, f"images[{i}]") for i, b in enumerate(body.images or [])]
        return RetrieveTask(model, body.top_k, text=body.text, images=images, shortlist=body.shortlist)
    if isinstance(body, schemas.EmbedRequest):
        images = [decode_b64(b, f"images[{i}]") for i, b in enumerate(body.images or [])]
        return EmbedTask(model, images, list(body.texts or []))
    if isinstance(body, schemas.CaptionRequest):
        return CaptionTask(model, decode_b64(body.image, "image"), body.prompt, body.generation_params(), body.stream)
    raise TypeError(f"no task for {type(body).__name__}")


def _count(items: list | None, what: str, limit: int, setting: str) -> None:
    if items is not None and len(items) > limit:
        raise PayloadTooLarge(f"{len(items)} {what} in one request, over the limit of {limit} (limits.{setting})")


def _nonempty(items: list | None, what: str) -> None:
    if items is not None and len(items) == 0:
        raise SchemaViolation(f"`{what}` is empty: send at least one")


def _texts(texts: list[str] | None, what: str, limits: Limits) -> None:
    for i, t in enumerate(texts or []):
        if not t.strip():
            raise SchemaViolation(f"{what}[{i}] is empty: send at least one word")
        if len(t) > limits.max_text_chars:
            raise SchemaViolation(
                f"{what}[{i}] has {len(t)} characters, over the limit of {limits.max_text_chars} "
                "(limits.max_text_chars): shorten it"
            )


def _image(data: bytes | None, what: str) -> None:
    if data is not None and len(data) == 0:
        raise SchemaViolation(f"`{what}` is empty: send the image file bytes")


def _top_k(top_k: int, limits: Limits) -> None:
    if top_k < 1 or top_k > limits.max_top_k:
        raise SchemaViolation(f"top_k is {top_k}: use 1..{limits.max_top_k} (limits.max_top_k)")


def check_limits(task: Task, limits: Limits) -> None:
    """Counts, sizes and emptiness the same for every protocol (the HTTP schema already caught most of it).

    Raises:
        SchemaViolation: an empty list/text/image, a text over max_text_chars, a bad top_k (422).
        PayloadTooLarge: more questions/texts/images than the limits allow (413).
    """
    if isinstance(task, VqaTask):
        _image(task.image, "image")
        _nonempty(task.questions, "questions")
        _count(task.questions, "questions", limits.max_questions, "max_questions")
        _texts(task.questions, "questions", limits)
        _top_k(task.top_k, limits)
    elif isinstance(task, MatchTask):
        _image(task.image, "image")
        _nonempty(task.texts, "texts")
        _count(task.texts, "texts", limits.max_texts, "max_texts")
        _texts(task.texts, "texts", limits)
    elif isinstance(task, RetrieveTask):
        _top_k(task.top_k, limits)
        if task.image is not None:
            _image(task.image, "image")
            _nonempty(task.texts, "texts")
            _count(task.texts, "texts", limits.max_texts, "max_texts")
            _texts(task.texts, "texts", limits)
        else:
            _texts([task.text or ""], "text", limits)
            _nonempty(task.images, "images")
            _count(task.images, "images", limits.max_images, "max_images")
            for i, img in enumerate(task.images or []):
                _image(img, f"images[{i}]")
    elif isinstance(task, CaptionTask):
        _image(task.image, "image")
        if task.prompt is not None:
            _texts([task.prompt], "prompt", limits)
    elif isinstance(task, EmbedTask):
        if not task.images and not task.texts:
            raise SchemaViolation("send `images` and/or `texts` to embed")
        _count(task.images, "images", limits.max_images, "max_images")
        _count(task.texts, "texts", limits.max_texts, "max_texts")
        _texts(task.texts, "texts", limits)
        for i, img in enumerate(task.images):
            _image(img, f"images[{i}]")
