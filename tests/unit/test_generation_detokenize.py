"""Decoding equals `processor.decode(ids, skip_special_tokens=True)`; streamed deltas add up to the final text."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer

from serving.generation.detokenize import TextDecoder


@pytest.fixture(scope="module")
def tokenizers():
    from tests.hf.checkpoints import generation_tokenizer

    theirs = generation_tokenizer()
    ours = Tokenizer.from_str(theirs.backend_tokenizer.to_str())
    return theirs, TextDecoder(ours, clean_up_spaces=bool(theirs.clean_up_tokenization_spaces))


def _sequences(vocab: int, n: int = 300, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randrange(1, 14))] for _ in range(n)]


def test_decode_equals_the_processor(tokenizers):
    theirs, ours = tokenizers
    for ids in _sequences(len(theirs)):
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), ids


def test_stream_deltas_add_up_to_the_final_text(tokenizers):
    theirs, ours = tokenizers
    bos = theirs.bos_token_id
    for ids in _sequences(len(theirs), seed=1):
        stream = ours.stream([bos])
        text = "".join(stream.push(t) for t in ids) + stream.finish()
        assert text == theirs.decode([bos, *ids], skip_special_tokens=True), ids


def test_held_back_text_is_only_the_word_still_forming(tokenizers):
    theirs, ours = tokenizers
    vocab = theirs.get_vocab()
    stream = ours.stream([theirs.bos_token_id])
    assert stream.push(vocab["a"]) == ""  # "a" may still grow ("a" + "##s")
    assert stream.push(vocab["red"]) == "a"
    assert stream.push(vocab["circle"]) == " red"
    assert stream.push(vocab["##s"]) == ""
    assert stream.push(vocab["?"]) == ""  # the clean-up pulls "?" onto "circles"
    assert stream.finish() == " circles?"
