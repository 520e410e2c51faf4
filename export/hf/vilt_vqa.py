"""`ViltForQuestionAnswering` → one single-stream engine, and its parity cases against the `transformers` forward.

ViLT puts image patches and question tokens through one transformer, so there is one engine:
`single_stream` (PIXELS uint8 (B, H, W, 3) + INPUT_IDS + ATTENTION_MASK → VQA_LOGITS over
`config.id2label`). Nothing of the image can be reused across questions.

Served images are never padded (one image per request, resized as ViLT's processor does; Triton
batches only requests of one shape), so the pixel mask is all ones and the engine builds it.
With an all-ones mask, `ViltEmbeddings.visual_embed` keeps every patch (in a random order when
`max_image_length` is -1 or at least the patch count: the result does not depend on the order)
with the position table interpolated bilinearly to the patch grid; `visual_embed_all_patches`
below computes exactly that without the random permutation, which cannot be traced.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image
from torch import nn

from export.hf.graphs import EngineGraph, Normalize, ParityCase, Tensor, UserView, to_numpy
from serving.families.imported import ImageProcessing, tokenize_padded


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


def check_sampling(config: dict[str, Any], image: ImageProcessing) -> str | None:
    """A note when transformers would sample patches at random (then its own outputs vary run to run)."""
    m = int(config.get("max_image_length", -1) or -1)
    longest = int(image.shortest_edge * 1333 / 800)
    most = (image.shortest_edge // int(config["patch_size"])) * (longest // int(config["patch_size"]))
    if 0 < m < most:
        return (
            f"max_image_length {m} < up to {most} patches: transformers keeps a random subset of patches "
            "for large images (its outputs then vary run to run); vtfuse keeps them all"
        )
    return None


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


def parity_cases(
    model: Any, processor: Any, tokenizer: Any, image: ImageProcessing, images: list[Image.Image], texts: list[str],
    max_tokens: int,
) -> list[ParityCase]:
    """Every question about each image: vtfuse's engine inputs, and `ViltForQuestionAnswering`'s logits.

    The reference runs the untouched module on the processor's own tensors (each image alone,
    so no padding): call this before `graphs`, whose wrapper patches the model instance.
    """
    ids, mask = tokenize_padded(tokenizer, texts, max_tokens)
    cases = []
    with torch.no_grad():
        for i, im in enumerate(images):
            enc = processor(images=[im] * len(texts), text=texts, return_tensors="pt", padding=True)
            ref = model(**enc).logits
            pixels = np.repeat(image.resize(im.convert("RGB"))[None], len(texts), axis=0)
            cases.append(
                ParityCase(
                    "single_stream",
                    {"PIXELS": pixels, "INPUT_IDS": ids, "ATTENTION_MASK": mask},
                    {"VQA_LOGITS": to_numpy(ref)},
                    note=f"image {i} ({im.width}x{im.height} → {pixels.shape[2]}x{pixels.shape[1]})",
                )
            )
    return cases


def judge(fp32: dict[str, list[dict[str, np.ndarray]]], int8: dict[str, list[dict[str, np.ndarray]]]) -> UserView:
    """int8 against fp32 as a user sees it: the answer (argmax label) of every question."""
    agree = [
        float((np.argmax(a["VQA_LOGITS"], -1) == np.argmax(b["VQA_LOGITS"], -1)).mean())
        for a, b in zip(fp32["single_stream"], int8["single_stream"])
    ]
    view = UserView(figures={"vqa_answer_agreement": float(np.mean(agree))})
    if view.figures["vqa_answer_agreement"] < 1.0:
        view.failures.append(f"answers agree on {100 * view.figures['vqa_answer_agreement']:.1f} % of questions")
    return view
