"""The shipped `tiny` checkpoint answers fresh renders; the same architecture untrained falls to chance."""

from __future__ import annotations

import pytest

from export.evaluate import evaluate
from serving.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, random_checkpoint


def test_shipped_checkpoint_is_small_and_complete():
    files = {p.name: p.stat().st_size for p in DEFAULT_CHECKPOINT.iterdir()}
    for name in ("model.safetensors", "config.json", "tokenizer.json", "answers.json"):
        assert name in files, f"{name} missing from {DEFAULT_CHECKPOINT}"
    assert sum(files.values()) < 20 * 1024 * 1024


def test_shipped_tiny_answers_93_percent_of_300_fresh_renders():
    m = evaluate(load_checkpoint(), n=300, seed=31337, n_captions=100)
    assert m["vqa_accuracy"] >= 0.93, m
    assert m["caption_first_of_8"] >= 0.85, m


@pytest.mark.parametrize("seed", [0, 1])
def test_random_weights_fall_to_chance(seed):
    """No rule-based shortcut anywhere: without training, the heads know nothing."""
    ckpt = random_checkpoint("tiny")
    import torch

    torch.manual_seed(seed)
    for p in ckpt.model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    m = evaluate(ckpt, n=300, seed=31337, n_captions=50)
    assert m["vqa_accuracy"] <= 0.4, m
    assert m["caption_first_of_8"] <= 0.4, m
