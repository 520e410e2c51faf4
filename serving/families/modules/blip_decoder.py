"""BLIP's text decoder as the two graphs the decode scheduler drives (cross K/V once, one token per step).

See export/hf/blip_decoder.py for what they compute and how they are checked against transformers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from serving.families.graphs import EngineGraph, Tensor
from serving.generation.engine import DecoderShape, cross_names, new_names, past_names


def shape_of(text_config: dict[str, Any], encoder_dim: int) -> DecoderShape:
    """Layers, heads, head size, vocabulary and cross-attention input width of a BLIP text decoder."""
    heads = int(text_config.get("num_attention_heads", 12))
    hidden = int(text_config.get("hidden_size", 768))
    return DecoderShape(
        layers=int(text_config.get("num_hidden_layers", 12)),
        heads=heads,
        head_dim=hidden // heads,
        vocab=int(text_config["vocab_size"]),
        encoder_dim=encoder_dim,
    )


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.view(b, t, heads, d // heads).transpose(1, 2)  # (B, nh, T, hs)


def _additive(mask: torch.Tensor) -> torch.Tensor:
    """1/0 int mask (B, T) → additive float mask (B, 1, 1, T): 0 where attended, float32's minimum elsewhere."""
    return (1.0 - mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min


class BlipCrossKV(nn.Module):
    """ENCODER_STATES (n, S, De) → CROSS_K_l, CROSS_V_l (n, heads, S, head_dim) of every decoder layer."""

    def __init__(self, text_decoder: Any) -> None:
        super().__init__()
        self.layers = text_decoder.bert.encoder.layer
        self.heads = int(text_decoder.config.num_attention_heads)

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = []
        for layer in self.layers:
            att = layer.crossattention.self
            out += [_heads(att.key(states), self.heads), _heads(att.value(states), self.heads)]
        return tuple(out)


class BlipDecoderStep(nn.Module):
    """One token per row with its own position, masks and caches → next-token logits and the token's K/V."""

    def __init__(self, text_decoder: Any) -> None:
        super().__init__()
        self.bert = text_decoder.bert
        self.cls = text_decoder.cls
        self.heads = int(text_decoder.config.num_attention_heads)
        self.n_layers = len(self.bert.encoder.layer)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + mask  # (B, nh, 1, T)
        ctx = torch.matmul(scores.softmax(dim=-1), v)  # (B, nh, 1, hs)
        b = ctx.shape[0]
        return ctx.permute(0, 2, 1, 3).reshape(b, 1, -1)  # (B, 1, D)

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, self_mask: torch.Tensor, cross_mask: torch.Tensor,
        *kv: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        n = 2 * self.n_layers
        past, cross = kv[:n], kv[n:]
        emb = self.bert.embeddings
        h = emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings(positions))  # (B, 1, D)
        self_add, cross_add = _additive(self_mask), _additive(cross_mask)
        new = []
        for i, layer in enumerate(self.bert.encoder.layer):
            sa = layer.attention.self
            k_new, v_new = _heads(sa.key(h), self.heads), _heads(sa.value(h), self.heads)  # (B, nh, 1, hs)
            k = torch.cat([past[2 * i], k_new], dim=2)  # (B, nh, P + 1, hs)
            v = torch.cat([past[2 * i + 1], v_new], dim=2)
            attn = layer.attention.output(self._attend(_heads(sa.query(h), self.heads), k, v, self_add), h)
            ca = layer.crossattention.self
            ctx = self._attend(_heads(ca.query(attn), self.heads), cross[2 * i], cross[2 * i + 1], cross_add)
            x = layer.crossattention.output(ctx, attn)
            h = layer.output(layer.intermediate(x), x)
            new += [k_new, v_new]
        return (self.cls(h)[:, 0, :], *new)  # LOGITS (B, V)


def decoder_graphs(text_decoder: Any, shape: DecoderShape, encoder_len: int, max_batch_size: int = 64
                   ) -> list[EngineGraph]:
    """`cross_kv` and `decoder_step`, traced at batch 2 (rows, past length and encoder length stay dynamic)."""
    layers, h, d = shape.layers, shape.heads, shape.head_dim
    states = torch.randn(2, encoder_len, shape.encoder_dim)
    past_len = 3
    kv_dims = (h, -1, d)
    step_example = (
        torch.randint(0, shape.vocab, (2, 1)),
        torch.tensor([[3], [1]]),
        torch.tensor([[1, 1, 1, 1], [1, 0, 0, 1]]),
        torch.ones(2, encoder_len, dtype=torch.long),
        *[torch.randn(2, h, past_len, d) for _ in range(2 * layers)],
        *[torch.randn(2, h, encoder_len, d) for _ in range(2 * layers)],
    )
    return [
        EngineGraph(
            "cross_kv",
            BlipCrossKV(text_decoder),
            (states,),
            (Tensor("ENCODER_STATES", "FP32", (-1, shape.encoder_dim)),),
            tuple(Tensor(n, "FP32", kv_dims) for n in cross_names(layers)),
            max_batch_size=max_batch_size,
            model_role="generate",
            filename="cross_kv.onnx",
        ),
        EngineGraph(
            "decoder_step",
            BlipDecoderStep(text_decoder),
            step_example,
            (
                Tensor("INPUT_IDS", "INT64", (1,)),
                Tensor("POSITION_IDS", "INT64", (1,)),
                Tensor("SELF_MASK", "INT64", (-1,)),
                Tensor("CROSS_MASK", "INT64", (-1,)),
                *[Tensor(n, "FP32", kv_dims) for n in past_names(layers)],
                *[Tensor(n, "FP32", kv_dims) for n in cross_names(layers)],
            ),
            (Tensor("LOGITS", "FP32", (shape.vocab,)), *[Tensor(n, "FP32", (h, 1, d)) for n in new_names(layers)]),
            max_batch_size=max_batch_size,
            model_role="generate",
            filename="decoder_step.onnx",
        ),
    ]
