"""Generation parameters: what a request may set, the checkpoint's defaults, and the rules `generate()` applies to them.

`GenerationParams` is what a caller sends (every field optional). `GenerationDefaults` is the
checkpoint's own generation config, recorded at import (`transformers`' `generation_config` of
the module that generates, merged with its global defaults), together with the special tokens
and the position table's size. `resolve` combines both exactly as
`transformers.GenerationMixin.generate` does (`_prepare_generation_config`,
`_prepare_generated_length`) into the `Resolved` settings one sequence decodes with, and
refuses what cannot run with a `SchemaViolation` naming the field (HTTP 422).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from serving.errors import SchemaViolation

MAX_BEAMS = 8
# transformers' own fallback when neither the caller nor the checkpoint sets a length: 20 new tokens.
DEFAULT_NEW_TOKENS = 20


@dataclass(frozen=True)
class GenerationParams:
    """What one request sets; None means "the checkpoint's default" (its generation config)."""

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    num_beams: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    length_penalty: float | None = None
    early_stopping: bool | str | None = None
    seed: int | None = None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every parameter a request may set."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationParams:
        """Parameters from a JSON object (Triton's PARAMETERS input); unknown keys are a 422 naming them."""
        unknown = sorted(set(d) - set(cls.names()))
        if unknown:
            raise SchemaViolation(
                f"unknown generation parameter(s) {', '.join(unknown)}: use {', '.join(cls.names())}"
            )
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """The parameters that are set."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class GenerationDefaults:
    """The checkpoint's generation config and special tokens, as recorded at import.

    Attributes:
        max_length: total length (prompt included) set by the checkpoint; None = transformers'
            default (20 new tokens, capped by the position table).
        bos_token_id: the token the decoder starts from (BLIP's `[DEC]`).
        eos_token_ids: tokens that end a sequence (BLIP: `[SEP]`).
        pad_token_id: the padding token (never generated on purpose).
        max_positions: the decoder's position table: no sequence may be longer.
    """

    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    max_positions: int
    max_length: int | None = None
    max_new_tokens: int | None = None
    min_length: int = 0
    min_new_tokens: int | None = None
    do_sample: bool = False
    num_beams: int = 1
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> GenerationDefaults:
        d = dict(d)
        d["eos_token_ids"] = tuple(int(x) for x in d["eos_token_ids"])
        return cls(**d)


@dataclass(frozen=True)
class Resolved:
    """Everything one sequence decodes with: lengths are totals, prompt included (as transformers counts them)."""

    prompt_length: int
    max_length: int
    min_length: int
    num_beams: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    no_repeat_ngram_size: int
    length_penalty: float
    early_stopping: bool | str
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def max_new_tokens(self) -> int:
        """Tokens that may be generated after the prompt."""
        return self.max_length - self.prompt_length


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SchemaViolation(message)


def _int(name: str, value: Any) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an integer, not {value!r}")


def _number(name: str, value: Any) -> None:
    _check(
        isinstance(value, (int, float)) and not isinstance(value, bool), f"{name} must be a number, not {value!r}"
    )


def validate_types(p: GenerationParams) -> None:
    """Each set parameter's type and range on its own (a 422 naming the field).

    Raises:
        SchemaViolation: a wrong type or a value out of range.
    """
    for name in ("max_new_tokens", "min_new_tokens", "num_beams", "top_k", "no_repeat_ngram_size", "seed"):
        v = getattr(p, name)
        if v is not None:
            _int(name, v)
    for name in ("temperature", "top_p", "repetition_penalty", "length_penalty"):
        v = getattr(p, name)
        if v is not None:
            _number(name, v)
    if p.do_sample is not None:
        _check(isinstance(p.do_sample, bool), f"do_sample must be true or false, not {p.do_sample!r}")
    if p.early_stopping is not None:
        _check(
            isinstance(p.early_stopping, bool) or p.early_stopping == "never",
            f"early_stopping must be true, false or \"never\", not {p.early_stopping!r}",
        )
    if p.max_new_tokens is not None:
        _check(p.max_new_tokens >= 1, f"max_new_tokens is {p.max_new_tokens}: use at least 1")
    if p.min_new_tokens is not None:
        _check(p.min_new_tokens >= 0, f"min_new_tokens is {p.min_new_tokens}: use 0 or more")
    if p.num_beams is not None:
        _check(1 <= p.num_beams <= MAX_BEAMS, f"num_beams is {p.num_beams}: use 1..{MAX_BEAMS}")
    if p.top_k is not None:
        _check(p.top_k >= 0, f"top_k is {p.top_k}: use 0 (off) or more")
    if p.top_p is not None:
        _check(0.0 < p.top_p <= 1.0, f"top_p is {p.top_p}: use a value in (0, 1]")
    if p.temperature is not None:
        _check(p.temperature > 0.0, f"temperature is {p.temperature}: use a positive value")
    if p.repetition_penalty is not None:
        _check(p.repetition_penalty > 0.0, f"repetition_penalty is {p.repetition_penalty}: use a positive value")
    if p.no_repeat_ngram_size is not None:
        _check(p.no_repeat_ngram_size >= 0, f"no_repeat_ngram_size is {p.no_repeat_ngram_size}: use 0 (off) or more")
    if p.seed is not None:
        _check(0 <= p.seed < 2**63, f"seed is {p.seed}: use 0 <= seed < 2**63")


def resolve(
    params: GenerationParams, defaults: GenerationDefaults, prompt_length: int, *, stream: bool = False
) -> Resolved:
    """The settings one sequence decodes with, as `generate()` derives them from its kwargs and generation config.

    Args:
        params: what the request set.
        defaults: the checkpoint's generation config and tokens.
        prompt_length: tokens the decoder starts with (the start token plus any prompt).
        stream: the caller streams tokens (then beam search is refused: beams change earlier tokens).

    Raises:
        SchemaViolation: a bad value, or a combination that cannot run (the message names the fields).
    """
    validate_types(params)
    merged = {f.name: getattr(defaults, f.name) for f in fields(defaults)}
    merged.update(params.to_dict())
    num_beams, do_sample = int(merged["num_beams"]), bool(merged["do_sample"])
    if do_sample:
        _check(float(merged["temperature"]) > 0.0, f"temperature is {merged['temperature']}: sampling needs > 0")
        _check(0.0 < float(merged["top_p"]) <= 1.0, f"top_p is {merged['top_p']}: sampling needs (0, 1]")
    if num_beams > 1 and do_sample:
        raise SchemaViolation(
            "do_sample with num_beams > 1 (beam sampling) is not supported: set num_beams 1 to sample, "
            "or do_sample false for beam search"
        )
    if stream and num_beams > 1:
        raise SchemaViolation(
            f"stream with num_beams {num_beams}: beam search can still change earlier tokens, so it cannot stream; "
            "set num_beams 1 or stream false"
        )
    # _prepare_generated_length: max_new_tokens wins; with no length set at all, 20 new tokens capped by positions.
    if merged["max_new_tokens"] is not None:
        max_length = int(merged["max_new_tokens"]) + prompt_length
    elif merged["max_length"] is None:
        max_length = min(DEFAULT_NEW_TOKENS + prompt_length, defaults.max_positions)
    else:
        max_length = int(merged["max_length"])
    min_length = int(merged["min_length"] or 0)
    if merged["min_new_tokens"] is not None:
        min_length = int(merged["min_new_tokens"]) + prompt_length
    _check(
        prompt_length < defaults.max_positions,
        f"the prompt is {prompt_length} tokens with the start token, over this model's {defaults.max_positions - 1}: "
        "shorten the prompt",
    )
    _check(
        max_length <= defaults.max_positions,
        f"max_new_tokens: {max_length - prompt_length} new tokens after a {prompt_length}-token prompt exceed this "
        f"model's {defaults.max_positions} positions: use max_new_tokens <= {defaults.max_positions - prompt_length}",
    )
    _check(
        prompt_length < max_length,
        f"the prompt is {prompt_length} tokens, not shorter than max_length {max_length}: raise max_new_tokens "
        "or shorten the prompt",
    )
    return Resolved(
        prompt_length=prompt_length,
        max_length=max_length,
        min_length=min_length,
        num_beams=num_beams,
        do_sample=do_sample,
        temperature=float(merged["temperature"]),
        top_k=int(merged["top_k"] or 0),
        top_p=float(merged["top_p"]),
        repetition_penalty=float(merged["repetition_penalty"]),
        no_repeat_ngram_size=int(merged["no_repeat_ngram_size"] or 0),
        length_penalty=float(merged["length_penalty"]),
        early_stopping=merged["early_stopping"],
        eos_token_ids=defaults.eos_token_ids,
        pad_token_id=defaults.pad_token_id,
        seed=params.seed,
    )

