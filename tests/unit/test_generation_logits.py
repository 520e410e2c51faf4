"""The NumPy logits processors and warpers against transformers' own, on the same scores and sequences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from serving.errors import SchemaViolation
from serving.generation import logits as lp
from serving.generation.params import GenerationDefaults, GenerationParams, resolve

VOCAB = 30


def _case(seed: int, rows: int = 4, length: int = 9) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    seqs = rng.integers(0, 8, size=(rows, length))  # few distinct ids: repeats and n-grams occur
    scores = (rng.standard_normal((rows, VOCAB)) * 3).astype(np.float32)
    return seqs, scores


def _theirs(processor, seqs: np.ndarray, scores: np.ndarray) -> np.ndarray:
    return processor(torch.from_numpy(seqs), torch.from_numpy(scores.copy())).numpy()


@pytest.mark.parametrize("seed", range(5))
def test_processors_equal_transformers(seed):
    seqs, scores = _case(seed)
    lists = [list(map(int, s)) for s in seqs]
    np.testing.assert_array_equal(
        lp.repetition_penalty(lists, scores, 1.7), _theirs(RepetitionPenaltyLogitsProcessor(1.7), seqs, scores)
    )
    for n in (1, 2, 3):
        np.testing.assert_array_equal(
            lp.no_repeat_ngram(lists, scores, n), _theirs(NoRepeatNGramLogitsProcessor(n), seqs, scores)
        )
    for minimum in (5, 12):
        np.testing.assert_array_equal(
            lp.min_length(lists, scores, minimum, (3,)), _theirs(MinLengthLogitsProcessor(minimum, 3), seqs, scores)
        )
    np.testing.assert_allclose(lp.temperature(scores, 0.7), _theirs(TemperatureLogitsWarper(0.7), seqs, scores),
                               rtol=1e-6)
    for k in (1, 5, VOCAB + 3):
        np.testing.assert_array_equal(lp.top_k(scores, k), _theirs(TopKLogitsWarper(k), seqs, scores))
    for p in (0.3, 0.9, 1.0):
        np.testing.assert_array_equal(lp.top_p(scores, p), _theirs(TopPLogitsWarper(p), seqs, scores))


def test_log_softmax_matches_torch():
    _, scores = _case(9)
    ours = lp.log_softmax(scores)
    theirs = torch.log_softmax(torch.from_numpy(scores), dim=-1).numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-6)


DEFAULTS = GenerationDefaults(bos_token_id=30, eos_token_ids=(3,), pad_token_id=0, max_positions=40)


def test_lengths_resolve_as_generate_does():
    assert resolve(GenerationParams(), DEFAULTS, 1).max_length == 21  # 20 new tokens by default
    assert resolve(GenerationParams(), DEFAULTS, 30).max_length == 40  # capped by the position table
    r = resolve(GenerationParams(max_new_tokens=5, min_new_tokens=3), DEFAULTS, 4)
    assert (r.max_length, r.min_length, r.max_new_tokens) == (9, 7, 5)
    checkpoint = GenerationDefaults(bos_token_id=30, eos_token_ids=(3,), pad_token_id=0, max_positions=40,
                                    max_length=12, num_beams=3)
    assert resolve(GenerationParams(), checkpoint, 2).max_length == 12  # a checkpoint's own max_length wins
    assert resolve(GenerationParams(), checkpoint, 2).num_beams == 3


@pytest.mark.parametrize(
    ("params", "stream", "names"),
    [
        (GenerationParams(max_new_tokens=45), False, "max_new_tokens"),
        (GenerationParams(num_beams=9), False, "num_beams"),
        (GenerationParams(num_beams=3), True, "stream"),
        (GenerationParams(temperature=0.0), False, "temperature"),
        (GenerationParams(top_p=1.5), False, "top_p"),
        (GenerationParams(top_p=0.0), False, "top_p"),
        (GenerationParams(do_sample=True, num_beams=2), False, "num_beams"),
        (GenerationParams(max_new_tokens=0), False, "max_new_tokens"),
        (GenerationParams(repetition_penalty=-1.0), False, "repetition_penalty"),
    ],
)
def test_bad_parameters_are_a_422_naming_the_field(params, stream, names):
    with pytest.raises(SchemaViolation) as e:
        resolve(params, DEFAULTS, 2, stream=stream)
    assert names in e.value.message


def test_unknown_parameters_are_refused_naming_them():
    with pytest.raises(SchemaViolation) as e:
        GenerationParams.from_dict({"max_new_tokens": 3, "beams": 2})
    assert "beams" in e.value.message and "num_beams" in e.value.message


def test_a_prompt_too_long_for_the_positions_is_refused():
    with pytest.raises(SchemaViolation) as e:
        resolve(GenerationParams(), DEFAULTS, 40)
    assert "prompt" in e.value.message
