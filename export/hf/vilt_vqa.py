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

from typing import Any

import numpy as np
import torch
from PIL import Image

from export.hf.graphs import ParityCase, UserView, to_numpy
from serving.families.imported import ImageProcessing, tokenize_padded
from serving.families.modules.vilt_vqa import (  # noqa: F401 - the family's engine, traced by the import
    SingleStream,
    graphs,
    load_model,
    visual_embed_all_patches,
)


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
