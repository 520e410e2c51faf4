"""Typed results of the API calls, the same classes from HTTP (JSON) and gRPC (protos).

Frozen dataclasses: attribute access, `==`, and `to_dict()` for JSON. Each result also
carries the request id the server answered with (None where it sent none).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class _Result:
    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON-able data, shaped like the HTTP API's JSON (fields that are None left out)."""
        return dataclasses.asdict(self, dict_factory=lambda items: {k: v for k, v in items if v is not None})


@dataclass(frozen=True)
class Answer(_Result):
    """One candidate answer and its score."""

    answer: str
    score: float


@dataclass(frozen=True)
class VqaAnswer(_Result):
    """The answer to one question: the best answer, its score, and the `top_k` best (best first).

    `attention` (rows x cols patch attention) and `tokens` are set only with `return_attention`.
    """

    question: str
    answer: str
    score: float
    top_k: list[Answer]
    attention: list[list[float]] | None = None
    tokens: list[str] | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VqaAnswer:
        return cls(
            question=d["question"],
            answer=d["answer"],
            score=float(d["score"]),
            top_k=[Answer(t["answer"], float(t["score"])) for t in d.get("top_k") or []],
            attention=d.get("attention"),
            tokens=d.get("tokens"),
        )

    @classmethod
    def from_proto(cls, a: Any) -> VqaAnswer:
        attention = None
        if a.HasField("attention"):
            rows, cols, values = a.attention.rows, a.attention.cols, list(a.attention.values)
            attention = [values[r * cols : (r + 1) * cols] for r in range(rows)]
        return cls(
            question=a.question,
            answer=a.answer,
            score=a.score,
            top_k=[Answer(t.answer, t.score) for t in a.top_k],
            attention=attention,
            tokens=list(a.tokens) or None,
        )


@dataclass(frozen=True)
class VqaResult(_Result):
    """One `vqa` call: an answer per question, in request order.

    `answer`, `score` and `top_k` are the first question's, for the common one-question call.
    """

    model: str
    answers: list[VqaAnswer]
    request_id: str | None = None

    @property
    def answer(self) -> str:
        return self.answers[0].answer

    @property
    def score(self) -> float:
        return self.answers[0].score

    @property
    def top_k(self) -> list[Answer]:
        return self.answers[0].top_k

    @classmethod
    def from_json(cls, d: dict[str, Any], request_id: str | None = None) -> VqaResult:
        return cls(d["model"], [VqaAnswer.from_json(a) for a in d["answers"]], request_id)

    @classmethod
    def from_proto(cls, m: Any, request_id: str | None = None) -> VqaResult:
        return cls(m.model, [VqaAnswer.from_proto(a) for a in m.answers], request_id)


@dataclass(frozen=True)
class MatchResult(_Result):
    """One `match` call: the ITM probability (0..1) of each text for the image, in request order."""

    model: str
    scores: list[float]
    request_id: str | None = None

    @property
    def best(self) -> int:
        """Index of the best-matching text."""
        return max(range(len(self.scores)), key=self.scores.__getitem__)

    @classmethod
    def from_json(cls, d: dict[str, Any], request_id: str | None = None) -> MatchResult:
        return cls(d["model"], [float(s) for s in d["scores"]], request_id)

    @classmethod
    def from_proto(cls, m: Any, request_id: str | None = None) -> MatchResult:
        return cls(m.model, list(m.scores), request_id)


@dataclass(frozen=True)
class RetrieveHit(_Result):
    """One ranked candidate: its 0-based index into the request's texts or images, its ITM probability.

    `text` is the ranked text in the image + texts form, None in the text + images form.
    """

    index: int
    score: float
    text: str | None = None


@dataclass(frozen=True)
class RetrieveResult(_Result):
    """One `retrieve` call: the `top_k` best candidates, best first."""

    model: str
    results: list[RetrieveHit]
    request_id: str | None = None

    @property
    def best(self) -> RetrieveHit:
        return self.results[0]

    @classmethod
    def from_json(cls, d: dict[str, Any], request_id: str | None = None) -> RetrieveResult:
        hits = [RetrieveHit(int(r["index"]), float(r["score"]), r.get("text")) for r in d["results"]]
        return cls(d["model"], hits, request_id)

    @classmethod
    def from_proto(cls, m: Any, request_id: str | None = None) -> RetrieveResult:
        return cls(m.model, [RetrieveHit(r.index, r.score, r.text or None) for r in m.results], request_id)


@dataclass(frozen=True)
class EmbedResult(_Result):
    """One `embed` call: L2-normalised embeddings, one row per image and per text, in request order."""

    model: str
    image_embeddings: list[list[float]]
    text_embeddings: list[list[float]]
    request_id: str | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any], request_id: str | None = None) -> EmbedResult:
        return cls(d["model"], d.get("image_embeddings") or [], d.get("text_embeddings") or [], request_id)

    @classmethod
    def from_proto(cls, m: Any, request_id: str | None = None) -> EmbedResult:
        return cls(
            m.model,
            [list(e.values) for e in m.image_embeddings],
            [list(e.values) for e in m.text_embeddings],
            request_id,
        )


@dataclass(frozen=True)
class ModelInfo(_Result):
    """A served model: its family, tasks, engines (role → Triton model), precision, source and parity figures."""

    name: str
    family: str
    architecture: str
    tasks: list[str]
    engines: dict[str, str]
    precision: str
    source: str
    parity: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelInfo:
        return cls(
            d["name"],
            d["family"],
            d["architecture"],
            list(d["tasks"]),
            dict(d["engines"]),
            d["precision"],
            d["source"],
            dict(d.get("parity") or {}),
        )

    @classmethod
    def from_proto(cls, m: Any) -> ModelInfo:
        parity = json.loads(m.parity_json) if m.parity_json else {}
        return cls(m.name, m.family, m.architecture, list(m.tasks), dict(m.engines), m.precision, m.source, parity)


@dataclass(frozen=True)
class ModelList(_Result):
    """The served models, and the one a request that names none goes to."""

    default: str
    models: list[ModelInfo]
    request_id: str | None = None

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def get(self, name: str) -> ModelInfo | None:
        """The model called `name`, or None."""
        return next((m for m in self.models if m.name == name), None)

    @classmethod
    def from_json(cls, d: dict[str, Any], request_id: str | None = None) -> ModelList:
        return cls(d["default"], [ModelInfo.from_json(m) for m in d["models"]], request_id)

    @classmethod
    def from_proto(cls, m: Any, request_id: str | None = None) -> ModelList:
        return cls(m.default_model, [ModelInfo.from_proto(i) for i in m.models], request_id)


@dataclass(frozen=True)
class CaptionUsage(_Result):
    """Token counts of one caption: the decoder's start and prompt tokens, and those generated after them."""

    prompt_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class CaptionResult(_Result):
    """One `caption` call: the text (the prompt included), the token ids, why generation stopped, the counts.

    `finish_reason` is `stop` (the end token) or `length` (max tokens reached).
    """

    model: str
    caption: str
    token_ids: list[int]
    finish_reason: str
    usage: CaptionUsage
    request_id: str | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any], request_id: str | None = None) -> CaptionResult:
        usage = d.get("usage") or {}
        return cls(
            d["model"],
            d["caption"],
            [int(t) for t in d["token_ids"]],
            d["finish_reason"],
            CaptionUsage(int(usage.get("prompt_tokens", 0)), int(usage.get("generated_tokens", 0))),
            d.get("request_id") or request_id,
        )

    @classmethod
    def from_proto(cls, m: Any, request_id: str | None = None) -> CaptionResult:
        usage = CaptionUsage(m.usage.prompt_tokens, m.usage.generated_tokens)
        return cls(m.model, m.caption, list(m.token_ids), m.finish_reason, usage, m.request_id or request_id)


@dataclass(frozen=True)
class CaptionEvent(_Result):
    """One event of `caption_stream`: a token (`index`, `token_id`, `delta`), or the last one (`delta`, `result`).

    The `delta`s of all events add up to `result.caption`; only the last event has a `result`
    (and no index or token id: its `delta` is text the token events held back, often "").
    """

    index: int | None
    token_id: int | None
    delta: str
    result: CaptionResult | None = None

    @property
    def last(self) -> bool:
        """Whether this is the stream's last event, the one with the whole result."""
        return self.result is not None

    def to_dict(self) -> dict[str, Any]:
        """The event as the HTTP stream's `data:` JSON: the last one is the result's fields plus `delta`."""
        if self.result is not None:
            return {"delta": self.delta, **self.result.to_dict()}
        return super().to_dict()

    @classmethod
    def from_json(cls, d: dict[str, Any], request_id: str | None = None) -> CaptionEvent:
        if "caption" in d:
            return cls(None, None, d.get("delta") or "", CaptionResult.from_json(d, request_id))
        return cls(int(d["index"]), int(d["token_id"]), d.get("delta") or "")

    @classmethod
    def from_proto(cls, m: Any, request_id: str | None = None) -> CaptionEvent:
        if m.HasField("result"):
            return cls(None, None, m.delta, CaptionResult.from_proto(m.result, request_id))
        return cls(m.index, m.token_id, m.delta)
