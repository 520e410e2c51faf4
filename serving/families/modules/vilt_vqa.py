"""`ViltForQuestionAnswering` as one single-stream engine (a PyTorch module); see export/hf/vilt_vqa.py."""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from serving.families.graphs import EngineGraph, Normalize, Tensor
from serving.families.imported import ImageProcessing


def load_model(folder: str) -> nn.Module:
    """The checkpoint as `transformers` loads it, in eval mode, fp32."""
    from transformers import ViltForQuestionAnswering

    return ViltForQuestionAnswering.from_pretrained(folder, torch_dtype=torch.float32).eval()


def visual_embed_all_patches(
    self: Any, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, max_image_length: int = -1
) -> tuple[torch.Tensor, torch.Tensor, None]:
    """`ViltEmbeddings.visual_embed` for unpadded images: every patch, in grid order."""
    x = self.patch_embeddings(pixel_values)  # (B, D, h, w)
    b, d, h, w = x.shape
    g = self.config.image_size // self.config.patch_size
    spatial = self.position_embeddings[:, 1:, :].transpose(1, 2).view(1, d, g, g)  # (1, D, g, g)
    pos = F.interpolate(spatial, size=(h, w), mode="bilinear", align_corners=True)  # (1, D, h, w)
    pos = pos.flatten(2).transpose(1, 2).expand(b, -1, -1)  # (B, h·w, D)
    x = x.flatten(2).transpose(1, 2)  # (B, h·w, D)
    x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
    pos = torch.cat((self.position_embeddings[:, 0, :][:, None, :].expand(b, -1, -1), pos), dim=1)
    x = x + pos
    return x, torch.ones(x.shape[:2], dtype=torch.long, device=x.device), None


class SingleStream(nn.Module):
    """PIXELS uint8 (B, H, W, 3), INPUT_IDS, ATTENTION_MASK (B, L) → VQA_LOGITS (B, A)."""

    def __init__(self, model: Any, image: ImageProcessing) -> None:
        super().__init__()
        self.model, self.normalize = model, Normalize(image)
        emb = model.vilt.embeddings
        emb.visual_embed = types.MethodType(visual_embed_all_patches, emb)

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.normalize(pixels)  # (B, 3, H, W)
        return self.model(
            input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), pixel_values=x
        ).logits


def graphs(model: Any, config: dict[str, Any], image: ImageProcessing, example_len: int = 8) -> list[EngineGraph]:
    """The single-stream engine, traced at batch 2 (batch, image height/width and tokens stay dynamic)."""
    s = image.shortest_edge
    pixels = torch.randint(0, 256, (2, s, s + image.size_divisor, 3), dtype=torch.uint8)
    ids = torch.randint(0, int(config["vocab_size"]), (2, example_len), dtype=torch.long)
    mask = torch.ones((2, example_len), dtype=torch.long)
    labels = len(config.get("id2label") or {}) or int(config.get("num_labels", 2))
    return [
        EngineGraph(
            "single_stream",
            SingleStream(model, image),
            (pixels, ids, mask),
            (
                Tensor("PIXELS", "UINT8", (-1, -1, 3)),
                Tensor("INPUT_IDS", "INT64", (-1,)),
                Tensor("ATTENTION_MASK", "INT64", (-1,)),
            ),
            (Tensor("VQA_LOGITS", "FP32", (labels,)),),
            max_batch_size=32,
        )
    ]
