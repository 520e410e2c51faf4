"""The fusion model, top to bottom: config → blocks → towers → fusion stack → heads.

Three entry points match the three exported engines, so image features are computed once
and reused across many texts: `encode_image` (uint8 pixels → patch features + embedding),
`encode_text` (token ids + mask → token features + embedding) and `fuse` (both → VQA
logits, ITM logit, text-to-image cross-attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serving.model.config import PRESETS, FusionConfig

__all__ = ["PRESETS", "FusionConfig", "FusionModel", "build_model"]

# ImageNet-style normalisation, applied inside the image graph so clients send raw uint8.
PIXEL_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
PIXEL_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class Attention(nn.Module):
    """Multi-head attention; returns head-averaged weights when asked (for interpretability)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, ctx: torch.Tensor, key_mask: torch.Tensor | None = None, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, C = x.shape
        S = ctx.shape[1]
        hs = C // self.heads
        q = self.q(x).view(B, T, self.heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        k, v = self.kv(ctx).view(B, S, 2, self.heads, hs).permute(2, 0, 3, 1, 4)  # 2 × (B, nh, S, hs)
        if not need_weights:
            # Fused kernel (flash/memory-efficient on GPU) when the weights are not returned.
            m = None if key_mask is None else (key_mask[:, None, None, :] != 0)  # (B, 1, 1, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # (B, nh, T, hs)
            return self.out(y.transpose(1, 2).reshape(B, T, C)), None
        att = (q @ k.transpose(-2, -1)) * (hs**-0.5)  # (B, nh, T, S)
        if key_mask is not None:
            att = att.masked_fill(key_mask[:, None, None, :] == 0, -1e4)
        att = att.softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.out(y), att.mean(dim=1)  # weights: (B, T, S)


class MLP(nn.Module):
    """Two-layer GELU feed-forward block."""

    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim * ratio)
        self.proj = nn.Linear(dim * ratio, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention to a context, MLP."""

    def __init__(self, dim: int, heads: int, ratio: int, cross: bool = False) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.cross = cross
        if cross:
            self.ln_x = nn.LayerNorm(dim)
            self.ln_ctx = nn.LayerNorm(dim)
            self.xattn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, ratio)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        ctx: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.ln1(x)
        x = x + self.attn(h, h, mask)[0]
        weights = None
        if self.cross:
            assert ctx is not None, "a cross-attention block needs image features as context"
            y, weights = self.xattn(self.ln_x(x), self.ln_ctx(ctx), None, need_weights)
            x = x + y
        return x + self.mlp(self.ln2(x)), weights


class ImageTower(nn.Module):
    """uint8 pixels (B, H, W, 3) → patch features (B, P, D); normalisation happens here."""

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        if cfg.stem == "conv":
            # Strided conv stem: one 3x3 stride-2 conv per halving, widths ramping up to `dim`;
            # cheaper and more data-efficient than a patchify stem on small images.
            n = cfg.patch_size.bit_length() - 1  # patch 8 → 3 convs
            assert 2**n == cfg.patch_size, "a conv stem needs a power-of-two patch size"
            widths = [d // 2 ** (n - 1 - i) for i in range(n)]
            layers: list[nn.Module] = []
            ch = 3
            for i, w in enumerate(widths):
                layers.append(nn.Conv2d(ch, w, 3, stride=2, padding=1))
                if i < n - 1:
                    layers.append(nn.GELU())
                ch = w
            self.stem = nn.Sequential(*layers)
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, d, cfg.patch_size, stride=cfg.patch_size))
        self.pos = nn.Parameter(torch.zeros(1, cfg.num_patches, d))
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.vision_layers))
        self.ln = nn.LayerNorm(d)
        self.register_buffer("mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float()  # (B, 3, H, W)
        x = (x - self.mean) / self.std  # type: ignore[operator]  # registered buffers
        x = self.stem(x)  # (B, D, g, g)
        x = x.flatten(2).transpose(1, 2) + self.pos  # (B, P, D)
        for blk in self.blocks:
            x = blk(x)[0]
        return self.ln(x)


class TextTower(nn.Module):
    """Token ids (B, L) + mask → token features (B, L, D); position 0 is [CLS]."""

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Parameter(torch.zeros(1, cfg.max_text_len, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.text_layers))
        self.ln = nn.LayerNorm(cfg.dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos[:, : ids.shape[1]]  # (B, L, D)
        for blk in self.blocks:
            x = blk(x, mask)[0]
        return self.ln(x)


class FusionModel(nn.Module):
    """Image tower, text tower, text-to-image cross-attention stack, and the heads."""

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.image = ImageTower(cfg)
        self.text = TextTower(cfg)
        self.fusion = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_ratio, cross=True) for _ in range(cfg.fusion_layers))
        self.fusion_ln = nn.LayerNorm(d)
        self.vqa_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, cfg.num_answers))
        self.itm_head = nn.Linear(d, 1)
        self.image_proj = nn.Linear(d, cfg.embed_dim)
        self.text_proj = nn.Linear(d, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1/0.07), as CLIP
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=0.02)

    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, H, W, 3) → features (B, P, D), L2-normalised embedding (B, E)."""
        feats = self.image(pixels)
        emb = F.normalize(self.image_proj(feats.mean(dim=1)), dim=-1)
        return feats, emb

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 ids and mask (B, L) → features (B, L, D), L2-normalised [CLS] embedding (B, E)."""
        feats = self.text(ids, mask)
        emb = F.normalize(self.text_proj(feats[:, 0]), dim=-1)
        return feats, emb

    def fuse(
        self, image_feats: torch.Tensor, text_feats: torch.Tensor, mask: torch.Tensor, need_weights: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Text tokens cross-attend to patches → VQA logits (B, A), ITM logit (B, 1), attention (B, F, L, P).

        The attention holds every fusion layer's text-to-image weights, averaged over heads.
        With `need_weights=False` it is None and the cross-attention runs the fused kernel
        (the GPU engine's fast path when no request asked for the weights).
        """
        x = text_feats
        weights = []
        for blk in self.fusion:
            x, w = blk(x, mask, image_feats, need_weights=need_weights)
            weights.append(w)
        cls = self.fusion_ln(x)[:, 0]  # (B, D)
        attention = torch.stack(weights, dim=1) if need_weights else None  # type: ignore[arg-type]
        return self.vqa_head(cls), self.itm_head(cls), attention


def build_model(cfg: FusionConfig) -> FusionModel:
    """A model with the preset's seeded random weights."""
    torch.manual_seed(cfg.seed)
    return FusionModel(cfg).eval()
