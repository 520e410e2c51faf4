"""The fusion model: shapes of every entry point, masks, presets, attention as a distribution."""

from __future__ import annotations

import pytest
import torch

from serving.model.model import PRESETS, FusionConfig, build_model


@pytest.fixture(scope="module")
def tiny():
    return build_model(FusionConfig.preset("tiny"))


def _inputs(cfg: FusionConfig, b: int = 3):
    px = torch.randint(0, 256, (b, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8)
    ids = torch.randint(4, 30, (b, cfg.max_text_len))
    mask = torch.zeros_like(ids)
    mask[:, :6] = 1
    return px, ids, mask


def test_entry_point_shapes(tiny):
    cfg = tiny.cfg
    px, ids, mask = _inputs(cfg)
    with torch.no_grad():
        f, e = tiny.encode_image(px)
        t, te = tiny.encode_text(ids, mask)
        v, itm, att = tiny.fuse(f, t, mask)
    assert f.shape == (3, cfg.num_patches, cfg.dim) and e.shape == (3, cfg.embed_dim)
    assert t.shape == (3, cfg.max_text_len, cfg.dim) and te.shape == (3, cfg.embed_dim)
    assert v.shape == (3, cfg.num_answers) and itm.shape == (3, 1)
    assert att.shape == (3, cfg.fusion_layers, cfg.max_text_len, cfg.num_patches)
    torch.testing.assert_close(att.sum(-1), torch.ones(3, cfg.fusion_layers, cfg.max_text_len))
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(te.norm(dim=-1), torch.ones(3))


def test_padding_is_masked_out(tiny):
    """Tokens after the mask must not change what the model says."""
    cfg = tiny.cfg
    px, ids, mask = _inputs(cfg, 1)
    ids2 = ids.clone()
    ids2[:, 6:] = 1  # change only padded positions
    with torch.no_grad():
        f, _ = tiny.encode_image(px)
        a = tiny.fuse(f, tiny.encode_text(ids, mask)[0], mask)[0]
        b = tiny.fuse(f, tiny.encode_text(ids2, mask)[0], mask)[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_batch_items_are_independent(tiny):
    cfg = tiny.cfg
    px, ids, mask = _inputs(cfg, 4)
    with torch.no_grad():
        full = tiny.encode_image(px)[0]
        one = tiny.encode_image(px[2:3])[0]
    torch.testing.assert_close(full[2:3], one, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_size(name):
    cfg = FusionConfig.preset(name)
    n = sum(p.numel() for p in build_model(cfg).parameters()) if name != "base" else None
    if name == "tiny":
        assert 1_000_000 <= n <= 3_000_000
        assert cfg.image_size == 64
    else:
        assert cfg.image_size == 224 and cfg.patch_size == 16


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="tiny, small, base"):
        FusionConfig.preset("huge")
