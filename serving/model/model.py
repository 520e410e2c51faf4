"""The fusion model, top to bottom: config → blocks → towers → fusion stack → heads → caption decoder.

Three entry points match the three exported engines, so image features are computed once
and reused across many texts: `encode_image` (uint8 pixels → patch features + embedding),
`encode_text` (token ids + mask → token features + embedding) and `fuse` (both → VQA
logits, ITM logit, text-to-image cross-attention).

A preset with `decoder_layers` > 0 (`tiny`) also has a `CaptionDecoder`: its own module, with
its own weights file, that cross-attends to `encode_image`'s features. One `decode` method
computes teacher-forced sequences (training) and the serving split (`cross_kv` once per image,
then `step`, one token per row with its own position, masks and cache), so both are the same code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serving.model.config import PRESETS, FusionConfig

__all__ = ["PRESETS", "CaptionDecoder", "FusionConfig", "FusionModel", "build_decoder", "build_model"]

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


def init_weights(m: nn.Module) -> None:
    """Truncated-normal (std 0.02) linear and embedding weights, zero biases (BERT/ViT style)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.trunc_normal_(m.weight, std=0.02)


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
        self.apply(init_weights)

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


# Masked attention scores: a large finite negative (not -inf), so exp() is exactly 0 and never NaN.
MASKED = -1.0e9


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    B, T, C = x.shape
    return x.view(B, T, heads, C // heads).transpose(1, 2)  # (B, nh, T, hs)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q (B, nh, T, hs) over k, v (B, nh, K, hs) where `mask` (B, T, K) is true → (B, T, nh·hs).

    Keys no query attends to are zeroed first: a serving cache holds whatever memory it was given
    at masked positions (NaN included), and a zero attention weight times NaN would still be NaN.
    """
    B, nh, T, hs = q.shape
    unused = ~mask.any(dim=1)[:, None, :, None]  # (B, 1, K, 1)
    k, v = k.masked_fill(unused, 0.0), v.masked_fill(unused, 0.0)
    att = (q @ k.transpose(-2, -1)) * (hs**-0.5)  # (B, nh, T, K)
    att = att.masked_fill(~mask[:, None], MASKED).softmax(dim=-1)
    return (att @ v).transpose(1, 2).reshape(B, T, nh * hs)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: causal self-attention over the cache + new tokens, cross-attention to the image, MLP."""

    def __init__(self, dim: int, heads: int, ratio: int, encoder_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.self_out = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.cross_q = nn.Linear(dim, dim)
        # The image features end in the tower's LayerNorm: projected as they are, once per image.
        self.cross_kv = nn.Linear(encoder_dim, 2 * dim)
        self.cross_out = nn.Linear(dim, dim)
        self.ln3 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, ratio)

    def cross_keys_values(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image features (n, S, D_enc) → K, V (n, nh, S, hs)."""
        k, v = self.cross_kv(states).chunk(2, dim=-1)  # 2 × (n, S, dim)
        return _split_heads(k, self.heads), _split_heads(v, self.heads)

    def forward(
        self,
        x: torch.Tensor,
        self_mask: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
        cross_k: torch.Tensor,
        cross_v: torch.Tensor,
        cross_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, dim) with its self mask (B, T, P + T) and cross mask (B, 1, S) → x, and the T new K, V."""
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(self.ln1(x)).chunk(3, dim=-1))  # (B, nh, T, hs)
        keys = torch.cat([past_k, k], dim=2)  # (B, nh, P + T, hs)
        values = torch.cat([past_v, v], dim=2)
        x = x + self.self_out(_attend(q, keys, values, self_mask))
        q = _split_heads(self.cross_q(self.ln2(x)), self.heads)
        x = x + self.cross_out(_attend(q, cross_k, cross_v, cross_mask))
        return x + self.mlp(self.ln3(x)), k, v


class CaptionDecoder(nn.Module):
    """Token + learned position embeddings → decoder layers cross-attending to image features → LM head.

    Three entry points, one computation (`decode`):
    - `forward`: teacher forcing, token ids (B, T) and image features → logits (B, T, vocab);
    - `cross_kv`: image features (n, S, D_enc) → [K_0, V_0, K_1, …] each (n, nh, S, hs), once per image;
    - `step`: one token per row with its position, self mask over its cache + the new position,
      cross mask, cache and cross K/V → that token's next-token logits and its K/V (the serving contract).
    """

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        assert cfg.has_decoder, f"preset {cfg.name} has no caption decoder"
        d = cfg.decoder_dim
        self.cfg = cfg
        self.heads = cfg.decoder_heads
        self.head_dim = d // cfg.decoder_heads
        self.tok = nn.Embedding(cfg.vocab_size, d)
        self.pos = nn.Embedding(cfg.max_text_len, d)
        self.layers = nn.ModuleList(
            DecoderLayer(d, cfg.decoder_heads, cfg.mlp_ratio, cfg.dim) for _ in range(cfg.decoder_layers)
        )
        self.ln = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, cfg.vocab_size)
        self.apply(init_weights)

    def cross_kv(self, states: torch.Tensor) -> list[torch.Tensor]:
        """Image features (n, S, D_enc) → [K_0, V_0, K_1, V_1, …] each (n, nh, S, hs)."""
        out: list[torch.Tensor] = []
        for layer in self.layers:
            assert isinstance(layer, DecoderLayer)  # for mypy: a ModuleList holds any Module
            out += layer.cross_keys_values(states)
        return out

    def decode(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        self_mask: torch.Tensor,
        cross_mask: torch.Tensor,
        past: list[torch.Tensor],
        cross: list[torch.Tensor],
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """T new tokens per row after P cached ones → logits (B, T, vocab) and their K/V [K_0, V_0, …] (B, nh, T, hs).

        ids, positions (B, T); self_mask bool (B, T, P + T); cross_mask bool (B, S); past and cross
        as `cross_kv` orders them (past (B, nh, P, hs), P may be 0).
        """
        x = self.tok(ids) + self.pos(positions)  # (B, T, d)
        xmask = cross_mask[:, None, :]  # (B, 1, S): the same image positions for every new token
        new: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, self_mask, past[2 * i], past[2 * i + 1], cross[2 * i], cross[2 * i + 1], xmask)
            new += [k, v]
        return self.lm_head(self.ln(x)), new

    def forward(self, ids: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: ids (B, T) from position 0, image features (B, S, D_enc) → logits (B, T, vocab).

        Causal: position t sees tokens 0..t, so padding after a sequence's end changes none of its logits.
        """
        B, T = ids.shape
        positions = torch.arange(T, device=ids.device).expand(B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril().expand(B, T, T)
        cross_mask = torch.ones(B, states.shape[1], dtype=torch.bool, device=ids.device)
        empty = states.new_zeros(B, self.heads, 0, self.head_dim)
        past = [empty] * (2 * len(self.layers))
        return self.decode(ids, positions, causal, cross_mask, past, self.cross_kv(states))[0]

    def step(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        self_mask: torch.Tensor,
        cross_mask: torch.Tensor,
        past: list[torch.Tensor],
        cross: list[torch.Tensor],
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One token per row: ids, positions (B, 1), int masks self (B, P + 1) and cross (B, S) → logits (B, V), K/V."""
        logits, new = self.decode(ids, positions, (self_mask != 0)[:, None, :], cross_mask != 0, past, cross)
        return logits[:, -1], new

    @torch.no_grad()
    def greedy(self, states: torch.Tensor, bos: int, eos: int, max_new_tokens: int) -> list[list[int]]:
        """Plain greedy decoding by re-running `forward` on the whole sequence each step (no cache).

        Returns each row's tokens as `generate()` does: the start token, the generated ones, the end
        token when it stopped on one.
        """
        B = states.shape[0]
        ids = torch.full((B, 1), bos, dtype=torch.long, device=states.device)
        done = torch.zeros(B, dtype=torch.bool, device=states.device)
        n = min(max_new_tokens, self.cfg.max_text_len - 1)
        for _ in range(n):
            nxt = self(ids, states)[:, -1].argmax(-1)  # (B,)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == eos
            if bool(done.all()):
                break
        out = []
        for row in ids.tolist():
            end = row.index(eos, 1) + 1 if eos in row[1:] else len(row)
            out.append(row[:end])
        return out


def build_model(cfg: FusionConfig) -> FusionModel:
    """A model with the preset's seeded random weights."""
    torch.manual_seed(cfg.seed)
    return FusionModel(cfg).eval()


def build_decoder(cfg: FusionConfig) -> CaptionDecoder:
    """The preset's caption decoder with seeded random weights."""
    torch.manual_seed(cfg.seed)
    return CaptionDecoder(cfg).eval()
