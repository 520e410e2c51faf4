"""`BlipForImageTextRetrieval` as three engines (PyTorch modules); the split: export/hf/blip_retrieval.py."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from serving.families.graphs import EngineGraph, Normalize, Tensor
from serving.families.imported import ImageProcessing


def load_model(folder: str) -> nn.Module:
    """The checkpoint as `transformers` loads it, in eval mode, fp32."""
    from transformers import BlipForImageTextRetrieval

    return BlipForImageTextRetrieval.from_pretrained(folder, torch_dtype=torch.float32).eval()


class ImageEncoder(nn.Module):
    """PIXELS uint8 (B, H, W, 3) → IMAGE_FEATURES (B, T, Dv), IMAGE_EMBEDDING (B, E)."""

    def __init__(self, model: Any, image: ImageProcessing) -> None:
        super().__init__()
        self.model, self.normalize = model, Normalize(image)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model.vision_model(pixel_values=self.normalize(pixels)).last_hidden_state  # (B, T, Dv)
        return hidden, F.normalize(self.model.vision_proj(hidden[:, 0, :]), dim=-1)


class TextEncoder(nn.Module):
    """INPUT_IDS, ATTENTION_MASK int64 (B, L) → TEXT_EMBEDDING (B, E) (text-only mode, no cross-attention)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, Dt)
        return F.normalize(self.model.text_proj(hidden[:, 0, :]), dim=-1)


class Fusion(nn.Module):
    """IMAGE_FEATURES (B, T, Dv), INPUT_IDS, ATTENTION_MASK (B, L) → ITM_LOGITS (B, 2)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, feats: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        image_atts = torch.ones(feats.shape[:-1], dtype=torch.long, device=feats.device)  # (B, T): every token attends
        hidden = self.model.text_encoder(
            input_ids=ids, attention_mask=mask, encoder_hidden_states=feats, encoder_attention_mask=image_atts
        ).last_hidden_state  # (B, L, Dt)
        return self.model.itm_head(hidden[:, 0, :])


def image_tokens(config: dict[str, Any]) -> tuple[int, int]:
    """(tokens, width) of the vision tower's last hidden state: CLS + (image_size / patch)²."""
    v = config["vision_config"]
    return 1 + (int(v["image_size"]) // int(v["patch_size"])) ** 2, int(v["hidden_size"])


def graphs(model: Any, config: dict[str, Any], image: ImageProcessing, example_len: int = 8) -> list[EngineGraph]:
    """The three engines, traced at batch 2 with `example_len` tokens (both axes stay dynamic)."""
    if image.mode != "fixed":
        raise ValueError("BLIP's processor resizes to a fixed height and width: size.shortest_edge is not supported")
    tokens, width = image_tokens(config)
    embed = int(config.get("image_text_hidden_size", 256))
    pixels = torch.randint(0, 256, (2, image.height, image.width, 3), dtype=torch.uint8)
    ids = torch.randint(0, int(config["text_config"]["vocab_size"]), (2, example_len), dtype=torch.long)
    mask = torch.ones((2, example_len), dtype=torch.long)
    feats = torch.randn(2, tokens, width)
    pix_t = Tensor("PIXELS", "UINT8", (image.height, image.width, 3))
    ids_t, mask_t = Tensor("INPUT_IDS", "INT64", (-1,)), Tensor("ATTENTION_MASK", "INT64", (-1,))
    feats_t = Tensor("IMAGE_FEATURES", "FP32", (tokens, width))
    return [
        EngineGraph(
            "image_encoder",
            ImageEncoder(model, image),
            (pixels,),
            (pix_t,),
            (feats_t, Tensor("IMAGE_EMBEDDING", "FP32", (embed,))),
            max_batch_size=32,
        ),
        EngineGraph(
            "text_encoder",
            TextEncoder(model),
            (ids, mask),
            (ids_t, mask_t),
            (Tensor("TEXT_EMBEDDING", "FP32", (embed,)),),
        ),
        EngineGraph(
            "fusion", Fusion(model), (feats, ids, mask), (feats_t, ids_t, mask_t), (Tensor("ITM_LOGITS", "FP32", (2,)),)
        ),
    ]
