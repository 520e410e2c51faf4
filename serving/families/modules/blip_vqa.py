"""`BlipForQuestionAnswering` as vision tower, question encoder and decoder; the split: export/hf/blip_vqa.py."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from serving.families.graphs import EngineGraph, Tensor
from serving.families.imported import ImageProcessing
from serving.families.modules import blip_caption, blip_decoder


def load_model(folder: str) -> nn.Module:
    """The checkpoint as `transformers` loads it, in eval mode, fp32."""
    from transformers import BlipForQuestionAnswering

    return BlipForQuestionAnswering.from_pretrained(folder, torch_dtype=torch.float32).eval()


class QuestionEncoder(nn.Module):
    """IMAGE_FEATURES (B, T, Dv), INPUT_IDS, ATTENTION_MASK (B, L) → QUESTION_STATES (B, L, Dt)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, feats: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        image_atts = torch.ones(feats.shape[:-1], dtype=torch.long, device=feats.device)  # (B, T)
        return self.model.text_encoder(
            input_ids=ids, attention_mask=mask, encoder_hidden_states=feats, encoder_attention_mask=image_atts
        ).last_hidden_state


def graphs(model: Any, config: dict[str, Any], image: ImageProcessing, example_len: int = 8) -> list[EngineGraph]:
    """image_encoder, question_encoder, then the decoder's cross_kv and decoder_step."""
    tokens, width = blip_caption.image_tokens(config)
    tc = config["text_config"]
    hidden = int(tc.get("hidden_size", 768))
    shape = blip_decoder.shape_of(tc, hidden)
    feats = torch.randn(2, tokens, width)
    ids = torch.randint(0, int(tc["vocab_size"]), (2, example_len), dtype=torch.long)
    mask = torch.ones((2, example_len), dtype=torch.long)
    question = EngineGraph(
        "question_encoder",
        QuestionEncoder(model),
        (feats, ids, mask),
        (
            Tensor("IMAGE_FEATURES", "FP32", (tokens, width)),
            Tensor("INPUT_IDS", "INT64", (-1,)),
            Tensor("ATTENTION_MASK", "INT64", (-1,)),
        ),
        (Tensor("QUESTION_STATES", "FP32", (-1, hidden)),),
    )
    return [
        blip_caption.vision_graph(model, config, image),
        question,
        *blip_decoder.decoder_graphs(model.text_decoder, shape, example_len),
    ]


def decoder_shape(config: dict[str, Any]):  # noqa: ANN201 - DecoderShape
    """The decoder's sizes (the scheduler's caches)."""
    tc = config["text_config"]
    return blip_decoder.shape_of(tc, int(tc.get("hidden_size", 768)))
