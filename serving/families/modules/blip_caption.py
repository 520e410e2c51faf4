"""`BlipForConditionalGeneration` as a vision tower and a decoder (PyTorch modules); see export/hf/blip_caption.py."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from serving.families.graphs import EngineGraph, Normalize, Tensor
from serving.families.imported import ImageProcessing
from serving.families.modules import blip_decoder


def load_model(folder: str) -> nn.Module:
    """The checkpoint as `transformers` loads it, in eval mode, fp32."""
    from transformers import BlipForConditionalGeneration

    return BlipForConditionalGeneration.from_pretrained(folder, torch_dtype=torch.float32).eval()


class VisionTower(nn.Module):
    """PIXELS uint8 (B, H, W, 3) → IMAGE_FEATURES (B, T, Dv)."""

    def __init__(self, model: Any, image: ImageProcessing) -> None:
        super().__init__()
        self.model, self.normalize = model, Normalize(image)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.vision_model(pixel_values=self.normalize(pixels)).last_hidden_state


def image_tokens(config: dict[str, Any]) -> tuple[int, int]:
    """(tokens, width) of the vision tower's output: CLS + (image_size / patch)²."""
    v = config["vision_config"]
    return 1 + (int(v["image_size"]) // int(v["patch_size"])) ** 2, int(v["hidden_size"])


def vision_graph(model: Any, config: dict[str, Any], image: ImageProcessing) -> EngineGraph:
    """The vision tower, traced at batch 2."""
    if image.mode != "fixed":
        raise ValueError("BLIP's processor resizes to a fixed height and width: size.shortest_edge is not supported")
    tokens, width = image_tokens(config)
    return EngineGraph(
        "image_encoder",
        VisionTower(model, image),
        (torch.randint(0, 256, (2, image.height, image.width, 3), dtype=torch.uint8),),
        (Tensor("PIXELS", "UINT8", (image.height, image.width, 3)),),
        (Tensor("IMAGE_FEATURES", "FP32", (tokens, width)),),
        max_batch_size=32,
    )


def graphs(model: Any, config: dict[str, Any], image: ImageProcessing) -> list[EngineGraph]:
    """image_encoder, then the decoder's cross_kv and decoder_step."""
    tokens, width = image_tokens(config)
    shape = blip_decoder.shape_of(config["text_config"], width)
    return [vision_graph(model, config, image), *blip_decoder.decoder_graphs(model.text_decoder, shape, tokens)]


def decoder_shape(config: dict[str, Any]):  # noqa: ANN201 - DecoderShape
    """The decoder's sizes (the scheduler's caches)."""
    return blip_decoder.shape_of(config["text_config"], image_tokens(config)[1])
