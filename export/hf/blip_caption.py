"""`BlipForConditionalGeneration` (captioning) → a vision tower and a decoder, and their parity against transformers.

The split follows `BlipForConditionalGeneration.generate`:

- `image_encoder`: `vision_model` → IMAGE_FEATURES (B, 1 + patches, Dv), the states the decoder
  cross-attends to (a Triton model of its own: dynamic batching, the response cache);
- `cross_kv` + `decoder_step`: the text decoder (`export/hf/blip_decoder.py`), both run by the
  decoupled Triton model `NAME_generate`, which owns the decode scheduler.

A caption equals `processor.decode(model.generate(**processor(images=image, text=prompt), **params)[0],
skip_special_tokens=True)`: `check_generation` runs the served decoding against `generate()` at import.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from export.hf import blip_decoder
from export.hf.graphs import ParityCase, UserView, to_numpy
from serving.families.imported import ImageProcessing
from serving.families.modules.blip_caption import (  # noqa: F401 - the family's engines, traced by the import
    VisionTower,
    decoder_shape,
    graphs,
    image_tokens,
    load_model,
    vision_graph,
)
from serving.generation.params import GenerationParams
from serving.generation.spec import GenerationSpec

TASK = "caption"
INT8_ROLES = ("image_encoder",)  # decoder graphs stay fp32 (see export/README.md, generation)
# Generation settings the import checks against transformers' generate(): (prompt, params).
GENERATION_CHECKS: tuple[tuple[str | None, dict[str, Any]], ...] = (
    (None, {}),
    ("a picture of", {}),
    (None, {"num_beams": 3, "max_new_tokens": 8}),
    (None, {"repetition_penalty": 1.4, "no_repeat_ngram_size": 2, "max_new_tokens": 10}),
    (None, {"min_new_tokens": 6, "max_new_tokens": 9}),
)


def generation_spec(
    model: Any, config: dict[str, Any], engines: dict[str, str], image: ImageProcessing, max_tokens: int,
    clean_up_spaces: bool,
) -> GenerationSpec:
    """What the generate model and the API need: the defaults, the vision tower's Triton name, the limits."""
    return GenerationSpec(
        task=TASK,
        defaults=blip_decoder.generation_defaults(model),
        image_model=engines["image_encoder"],
        image_output="IMAGE_FEATURES",
        max_prompt_tokens=max_tokens,
        max_cross_len=image_tokens(config)[0],
        clean_up_spaces=clean_up_spaces,
        image=image.to_json(),
    )


def parity_cases(
    model: Any, processor: Any, tokenizer: Any, image: ImageProcessing, images: list[Image.Image], texts: list[str],
    max_tokens: int,
) -> list[ParityCase]:
    """The vision tower on vtfuse's resize against `vision_model` on the processor's tensors; the decoder's graphs."""
    pixels = np.stack([image.resize(im.convert("RGB")) for im in images])
    with torch.no_grad():
        pv = processor(images=images, return_tensors="pt")["pixel_values"]
        hidden = model.vision_model(pixel_values=pv).last_hidden_state  # (I, T, Dv)
    cases = [ParityCase("image_encoder", {"PIXELS": pixels}, {"IMAGE_FEATURES": to_numpy(hidden)})]
    tc = model.config.text_config
    mask = torch.ones(hidden.shape[:2], dtype=torch.long)
    cases += blip_decoder.decoder_parity_cases(
        model.text_decoder, hidden, mask, int(tc.bos_token_id), int(tc.vocab_size), "image features"
    )
    return cases


def judge(fp32: dict[str, list[dict[str, np.ndarray]]], int8: dict[str, list[dict[str, np.ndarray]]]) -> UserView:
    """int8 image features against fp32 (a figure; what decides is `check_generation`: the tokens users get)."""
    from export.quantize import cosine_min

    pairs = zip(fp32["image_encoder"], int8["image_encoder"])
    cos = min(cosine_min(a["IMAGE_FEATURES"], b["IMAGE_FEATURES"]) for a, b in pairs)
    return UserView(figures={"image_feature_cosine_min": cos})


def check_generation(
    model: Any, processor: Any, tokenizer: Any, image: ImageProcessing, paths: dict[str, Any], spec: GenerationSpec,
    images: list[Image.Image], threads: int | None = None,
) -> dict[str, Any]:
    """Served decoding (these engines, the scheduler) against `generate()` on every image × GENERATION_CHECKS."""
    from export.check import ort_session, run_session  # the ONNX side of the import: not in the triton-torch image
    from export.hf.parity import generation_agreement
    from serving.generation.params import resolve

    vision = ort_session(paths["image_encoder"], threads)
    feats = [run_session(vision, {"PIXELS": image.resize(im.convert("RGB"))[None]})["IMAGE_FEATURES"] for im in images]
    cases, refs = [], []
    with torch.no_grad():
        for i, im in enumerate(images):
            for prompt, params in GENERATION_CHECKS:
                enc = processor(images=im, text=prompt, return_tensors="pt") if prompt else processor(
                    images=im, return_tensors="pt")
                refs.append([int(t) for t in model.generate(**enc, **params)[0]])
                prompt_ids = [int(t) for t in enc["input_ids"][0]] if prompt else None
                decoder_prompt = spec.decoder_prompt(prompt_ids)
                settings = resolve(GenerationParams(**params), spec.defaults, len(decoder_prompt))
                cases.append((i, decoder_prompt, settings))
    shape = decoder_shape(model.config.to_dict())
    got = blip_decoder.run_served_generation(
        paths, shape, lambda c: (feats[cases[c][0]], np.ones(feats[cases[c][0]].shape[1], np.int64)),
        [c[1] for c in cases], [c[2] for c in cases], threads,
    )
    return generation_agreement(refs, got, [f"image {c[0]}, {GENERATION_CHECKS[k % len(GENERATION_CHECKS)]}"
                                               for k, c in enumerate(cases)])
