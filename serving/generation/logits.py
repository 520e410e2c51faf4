"""Logits processors and warpers in NumPy, each equal to its `transformers` counterpart on float32 scores.

Applied in `generate()`'s order (`GenerationMixin._get_logits_processor`): repetition penalty,
no-repeat n-grams, minimum length (the end token banned while the sequence is shorter), then,
when sampling only, temperature, top-k and top-p. Every function takes the rows' token
sequences so far (prompt included) and their scores `(rows, vocab)`, and returns new scores;
rows are independent of each other, so a row's result never depends on its batch-mates.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from serving.generation.params import Resolved

NEG_INF = np.float32(-np.inf)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32 (as `torch.nn.functional.log_softmax`)."""
    x = np.asarray(x, dtype=np.float32)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True, dtype=np.float32))


def softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32; -inf scores get probability 0."""
    x = np.asarray(x, dtype=np.float32)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True, dtype=np.float32)


def repetition_penalty(sequences: Sequence[Sequence[int]], scores: np.ndarray, penalty: float) -> np.ndarray:
    """`RepetitionPenaltyLogitsProcessor`: every token seen once in a row: negative × penalty, positive ÷ penalty."""
    out = scores.copy()
    vocab = scores.shape[-1]
    for r, seq in enumerate(sequences):
        ids = np.unique(np.asarray(seq, dtype=np.int64))
        ids = ids[(ids >= 0) & (ids < vocab)]
        s = out[r, ids]
        out[r, ids] = np.where(s < 0, s * np.float32(penalty), s / np.float32(penalty))
    return out


def no_repeat_ngram(sequences: Sequence[Sequence[int]], scores: np.ndarray, n: int) -> np.ndarray:
    """`NoRepeatNGramLogitsProcessor`: a token that would complete an n-gram already in the row is banned (-inf)."""
    out = scores.copy()
    vocab = scores.shape[-1]
    for r, seq in enumerate(sequences):
        cur = len(seq)
        if cur < n:
            continue
        prefix = tuple(seq[cur + 1 - n :])
        for i in range(cur - n + 1):
            if tuple(seq[i : i + n - 1]) == prefix and 0 <= seq[i + n - 1] < vocab:
                out[r, seq[i + n - 1]] = NEG_INF
    return out


def min_length(sequences: Sequence[Sequence[int]], scores: np.ndarray, minimum: int, eos: Sequence[int]) -> np.ndarray:
    """`MinLengthLogitsProcessor`: the end tokens are banned while a row is shorter than `minimum` (prompt included)."""
    out = scores.copy()
    for r, seq in enumerate(sequences):
        if len(seq) < minimum:
            out[r, list(eos)] = NEG_INF
    return out


def temperature(scores: np.ndarray, t: float) -> np.ndarray:
    """`TemperatureLogitsWarper`."""
    return scores / np.float32(t)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """`TopKLogitsWarper`: scores below the k-th largest of their row become -inf (ties with it are kept)."""
    k = min(k, scores.shape[-1])
    kth = -np.partition(-scores, k - 1, axis=-1)[:, k - 1 : k]
    return np.where(scores < kth, NEG_INF, scores)


def top_p(scores: np.ndarray, p: float, keep: int = 1) -> np.ndarray:
    """`TopPLogitsWarper`: keep the smallest set of best tokens whose probability reaches `p` (at least `keep`)."""
    order = np.argsort(scores, axis=-1, kind="stable")  # ascending, as torch.sort(descending=False)
    ranked = np.take_along_axis(scores, order, axis=-1)
    cumulative = np.cumsum(softmax(ranked), axis=-1, dtype=np.float32)
    remove = cumulative <= np.float32(1 - p)
    remove[:, -keep:] = False
    mask = np.zeros_like(remove)
    np.put_along_axis(mask, order, remove, axis=-1)
    return np.where(mask, NEG_INF, scores)


def process(sequences: Sequence[Sequence[int]], scores: np.ndarray, r: Resolved) -> np.ndarray:
    """Every processor (and, when sampling, every warper) `generate()` would apply with these settings."""
    out = np.asarray(scores, dtype=np.float32)
    if r.repetition_penalty != 1.0:
        out = repetition_penalty(sequences, out, r.repetition_penalty)
    if r.no_repeat_ngram_size > 0:
        out = no_repeat_ngram(sequences, out, r.no_repeat_ngram_size)
    if r.min_length > 0:
        out = min_length(sequences, out, r.min_length, r.eos_token_ids)
    if r.do_sample:
        if r.temperature != 1.0:
            out = temperature(out, r.temperature)
        if r.top_k != 0:
            out = top_k(out, r.top_k)
        if r.top_p < 1.0:
            out = top_p(out, r.top_p)
    return out
