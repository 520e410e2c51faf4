"""tiny's caption decoder: one module for teacher forcing and the cached serving step; its config and weights file."""

from __future__ import annotations

import random

import pytest
import torch

from serving.model.checkpoint import DECODER_WEIGHTS, load_checkpoint, random_checkpoint, save_checkpoint
from serving.model.model import CaptionDecoder, FusionConfig, build_decoder
from serving.shapes import world

TINY = FusionConfig.preset("tiny")


@pytest.fixture(scope="module")
def decoder() -> CaptionDecoder:
    """Seeded random weights, spread so that logits differ from position to position and row to row."""
    dec = build_decoder(TINY)
    torch.manual_seed(3)
    for p in dec.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return dec.eval()


def _cached(dec: CaptionDecoder, ids: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """Logits of every position, fed one token per step through `step` with a growing cache."""
    B, T = ids.shape
    cross = dec.cross_kv(states)
    past = [torch.zeros(B, dec.heads, 0, dec.head_dim)] * (2 * TINY.decoder_layers)
    cross_mask = torch.ones(B, states.shape[1], dtype=torch.long)
    out = []
    for t in range(T):
        logits, new = dec.step(ids[:, t : t + 1], torch.full((B, 1), t), torch.ones(B, t + 1, dtype=torch.long),
                               cross_mask, past, cross)
        past = [torch.cat([p, n], dim=2) for p, n in zip(past, new)]
        out.append(logits)
    return torch.stack(out, dim=1)


def test_only_tiny_has_a_decoder():
    assert TINY.has_decoder and (TINY.decoder_layers, TINY.decoder_heads) == (2, 4)
    assert TINY.decoder_dim % TINY.decoder_heads == 0
    for name in ("small", "base"):
        assert not FusionConfig.preset(name).has_decoder
    assert random_checkpoint("small").decoder is None


def test_teacher_forcing_equals_the_step_by_step_cached_decode(decoder):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TINY.vocab_size, (3, 9), generator=g)
    states = torch.randn(3, TINY.num_patches, TINY.dim, generator=g)
    with torch.no_grad():
        full = decoder(ids, states)
        stepped = _cached(decoder, ids, states)
    assert full.shape == (3, 9, TINY.vocab_size)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)
    assert (full[0, 1] - full[0, 2]).abs().max() > 1e-2 and (full[0, 1] - full[1, 1]).abs().max() > 1e-2


def test_a_step_with_padded_caches_and_masks_equals_each_row_alone(decoder):
    """Rows with caches of different lengths, padded to the longest and masked, as the scheduler batches them."""
    g = torch.Generator().manual_seed(1)
    lengths = [1, 4, 7]  # tokens fed so far, the last one is this step's
    states = torch.randn(3, TINY.num_patches, TINY.dim, generator=g)
    rows = [torch.randint(4, TINY.vocab_size, (n,), generator=g) for n in lengths]
    p = max(lengths) - 1
    h, d, layers = decoder.heads, decoder.head_dim, TINY.decoder_layers
    past = [torch.zeros(3, h, p, d) for _ in range(2 * layers)]
    self_mask = torch.zeros(3, p + 1, dtype=torch.long)
    self_mask[:, p] = 1
    alone = []
    with torch.no_grad():
        cross = decoder.cross_kv(states)
        for i, r in enumerate(rows):
            m = len(r) - 1
            self_mask[i, :m] = 1
            full = decoder(r[None], states[i : i + 1])
            alone.append(full[0, -1])
            if m:  # this row's cache: the K/V of its earlier tokens, teacher-forced
                _, kv = decoder.decode(r[None, :m], torch.arange(m)[None], torch.ones(1, m, m, dtype=torch.bool).tril(),
                                       torch.ones(1, TINY.num_patches, dtype=torch.bool),
                                       [torch.zeros(1, h, 0, d)] * (2 * layers), [c[i : i + 1] for c in cross])
                for buf, t in zip(past, kv):
                    buf[i, :, :m] = t[0]
        logits, new = decoder.step(
            torch.tensor([[int(r[-1])] for r in rows]), torch.tensor([[n - 1] for n in lengths]), self_mask,
            torch.ones(3, TINY.num_patches, dtype=torch.long), past, cross,
        )
    assert logits.shape == (3, TINY.vocab_size)
    assert [tuple(t.shape) for t in new] == [(3, h, 1, d)] * (2 * layers)
    torch.testing.assert_close(logits, torch.stack(alone), atol=1e-5, rtol=1e-5)


def test_masked_cache_positions_may_hold_any_bits(decoder):
    """The scheduler's cache buffers are uninitialised memory where rows are masked: NaN there changes nothing."""
    g = torch.Generator().manual_seed(6)
    states = torch.randn(2, TINY.num_patches, TINY.dim, generator=g)
    h, d, layers = decoder.heads, decoder.head_dim, TINY.decoder_layers
    past = [torch.randn(2, h, 4, d, generator=g) for _ in range(2 * layers)]
    self_mask = torch.tensor([[1, 1, 0, 0, 1], [1, 1, 1, 1, 1]])
    args = (torch.tensor([[7], [9]]), torch.tensor([[2], [4]]), self_mask, torch.ones(2, TINY.num_patches,
                                                                                      dtype=torch.long))
    with torch.no_grad():
        cross = decoder.cross_kv(states)
        ref, _ = decoder.step(*args, past, cross)
        for t in past:
            t[0, :, 2:] = float("nan")
            t[0, :, 3] = float("inf")
        got, _ = decoder.step(*args, past, cross)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref)


def test_cross_mask_hides_image_positions(decoder):
    g = torch.Generator().manual_seed(2)
    states = torch.randn(1, TINY.num_patches, TINY.dim, generator=g)
    padded = torch.cat([states, torch.randn(1, 5, TINY.dim, generator=g)], dim=1)  # 5 junk positions
    mask = torch.ones(1, TINY.num_patches + 5, dtype=torch.long)
    mask[0, TINY.num_patches :] = 0
    empty = [torch.zeros(1, decoder.heads, 0, decoder.head_dim)] * (2 * TINY.decoder_layers)
    one = torch.ones(1, 1, dtype=torch.long)
    with torch.no_grad():
        ref, _ = decoder.step(one * 2, one * 0, one, torch.ones(1, TINY.num_patches, dtype=torch.long), empty,
                              decoder.cross_kv(states))
        got, _ = decoder.step(one * 2, one * 0, one, mask, empty, decoder.cross_kv(padded))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_greedy_stops_at_the_end_token_and_is_capped_by_positions(decoder):
    states = torch.randn(4, TINY.num_patches, TINY.dim, generator=torch.Generator().manual_seed(4))
    out = decoder.greedy(states, bos=2, eos=3, max_new_tokens=50)
    for row in out:
        assert row[0] == 2 and len(row) <= TINY.max_text_len
        assert 3 not in row[1:-1]
    assert len({tuple(r) for r in out}) > 1, "spread random weights give each image its own tokens"


def test_the_decoder_has_its_own_weights_file(tmp_path):
    ckpt = random_checkpoint("tiny")
    assert ckpt.decoder is not None
    save_checkpoint(ckpt, tmp_path)
    assert (tmp_path / DECODER_WEIGHTS).exists()
    loaded = load_checkpoint(tmp_path)
    assert loaded.decoder is not None
    for k, v in ckpt.decoder.state_dict().items():
        assert torch.equal(v, loaded.decoder.state_dict()[k]), k
    assert not any(k.startswith("decoder") for k in ckpt.model.state_dict())  # the towers' file is the towers alone
    (tmp_path / DECODER_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=DECODER_WEIGHTS):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("text", "items"),
    [
        ("a red circle", [("red", "circle")]),
        ("a red circle and a blue square", [("red", "circle"), ("blue", "square")]),
        ("  A Yellow Triangle  and an green circle", [("yellow", "triangle"), ("green", "circle")]),
        ("", None),
        ("a red circle and", None),
        ("a red circle a blue square", None),
        ("a purple circle", None),
        ("two red circles", None),
    ],
)
def test_parse_caption(text, items):
    assert world.parse_caption(text) == items


def test_canonical_caption_orders_by_colour_then_shape_and_parses_back():
    items = [("yellow", "circle"), ("red", "triangle"), ("red", "circle"), ("red", "circle")]
    text = world.canonical_caption(items)
    assert text == "a red circle and a red circle and a red triangle and a yellow circle"
    assert sorted(world.parse_caption(text) or []) == sorted(items)
    scene = world.random_scene(random.Random(5), n_objects=3)
    assert world.caption_matches(world.caption(world.scene_items(scene)), scene)
    assert not world.caption_matches(world.caption(world.scene_items(scene)[:2]), scene)
