"""The shipped `tiny` checkpoint answers and captions fresh renders; the same architecture untrained falls to chance."""

from __future__ import annotations

import numpy as np
import pytest

from export.evaluate import evaluate, generate_captions
from serving.model.checkpoint import DEFAULT_CHECKPOINT, Checkpoint, load_checkpoint, random_checkpoint
from serving.shapes import world
from tests.helpers import fresh_samples


def test_shipped_checkpoint_is_small_and_complete():
    files = {p.name: p.stat().st_size for p in DEFAULT_CHECKPOINT.iterdir()}
    for name in ("model.safetensors", "caption_decoder.safetensors", "config.json", "tokenizer.json", "answers.json"):
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


def caption_accuracy(ckpt: Checkpoint, n: int, seed: int) -> float:
    """Share of fresh renders (64-256 px, PNG and JPEG) whose greedy caption names exactly the scene's objects."""
    samples = fresh_samples(n, seed)
    ids = generate_captions(ckpt, [data for data, _, _ in samples])
    texts = [ckpt.tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    return float(np.mean([world.caption_matches(t, scene) for t, (_, _, scene) in zip(texts, samples)]))


def test_shipped_tiny_captions_name_the_objects_of_90_percent_of_150_fresh_renders():
    assert caption_accuracy(load_checkpoint(), n=150, seed=2718) >= 0.90


@pytest.mark.parametrize("seed", [0, 1])
def test_random_caption_weights_name_almost_no_scene(seed):
    """The caption comes from the decoder's weights: untrained, it names almost no scene's objects."""
    import torch

    ckpt = random_checkpoint("tiny")
    assert ckpt.decoder is not None
    torch.manual_seed(seed)
    for p in [*ckpt.model.parameters(), *ckpt.decoder.parameters()]:
        torch.nn.init.normal_(p, std=0.05)
    assert caption_accuracy(ckpt, n=100, seed=2718) <= 0.1
