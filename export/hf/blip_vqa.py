"""`BlipForQuestionAnswering` (open-ended answers, generated) → vision tower, question encoder, decoder.

The split follows `BlipForQuestionAnswering.generate`:

- `image_encoder`: `vision_model` → IMAGE_FEATURES (as for captioning, `blip_caption.vision_graph`);
- `question_encoder`: `text_encoder` over the question's tokens with cross-attention to the image →
  QUESTION_STATES (B, L, Dt);
- `cross_kv` + `decoder_step`: the text decoder (`export/hf/blip_decoder.py`) starting from the
  start token and cross-attending to the question's states, run by the decoupled `NAME_generate`.

transformers' `generate` builds the decoder's cross-attention mask as all ones, so in its own
padded batch a question attends to the batch's padding. vtfuse masks each question's padding
(rows are padded to a multiple of 16 tokens to share Triton batches), so every answer equals
`generate()` on that one question alone, which is what `check_generation` compares.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from export.hf import blip_caption, blip_decoder
from export.hf.graphs import ParityCase, UserView, to_numpy
from serving.families.imported import ImageProcessing, tokenize_padded
from serving.families.modules.blip_vqa import (  # noqa: F401 - the family's engines, traced by the import
    QuestionEncoder,
    decoder_shape,
    graphs,
    load_model,
)
from serving.generation.params import GenerationParams
from serving.generation.spec import GenerationSpec

TASK = "vqa"
INT8_ROLES = ("image_encoder",)
GENERATION_CHECKS: tuple[dict[str, Any], ...] = (
    {},
    {"num_beams": 3, "max_new_tokens": 6},
    {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "max_new_tokens": 8},
)
QUESTIONS = ("what color is the circle?", "how many squares are there?", "is there a yellow triangle?")


def generation_spec(
    model: Any, config: dict[str, Any], engines: dict[str, str], image: ImageProcessing, max_tokens: int,
    clean_up_spaces: bool,
) -> GenerationSpec:
    """The defaults, the vision tower's and question encoder's Triton names, the limits."""
    return GenerationSpec(
        task=TASK,
        defaults=blip_decoder.generation_defaults(model),
        image_model=engines["image_encoder"],
        image_output="IMAGE_FEATURES",
        question_model=engines["question_encoder"],
        max_prompt_tokens=max_tokens,
        max_cross_len=max_tokens,
        clean_up_spaces=clean_up_spaces,
        image=image.to_json(),
    )


def parity_cases(
    model: Any, processor: Any, tokenizer: Any, image: ImageProcessing, images: list[Image.Image], texts: list[str],
    max_tokens: int,
) -> list[ParityCase]:
    """Vision tower, question encoder and decoder cases.

    The question encoder runs on vtfuse's padded rows, whose unpadded ids must equal the processor's.
    """
    pixels = np.stack([image.resize(im.convert("RGB")) for im in images])
    questions = list(QUESTIONS)
    ids, mask = tokenize_padded(tokenizer, questions, max_tokens)
    cases: list[ParityCase] = []
    with torch.no_grad():
        pv = processor(images=images, return_tensors="pt")["pixel_values"]
        hidden = model.vision_model(pixel_values=pv).last_hidden_state  # (I, T, Dv)
        cases.append(ParityCase("image_encoder", {"PIXELS": pixels}, {"IMAGE_FEATURES": to_numpy(hidden)}))
        for q, row, m in zip(questions, ids, mask):
            theirs = processor.tokenizer(q)["input_ids"]
            if list(row[: int(m.sum())]) != list(theirs):
                raise ValueError(f"question {q!r}: vtfuse tokenizes it as {list(row[: int(m.sum())])}, the processor "
                                 f"as {theirs}")
        t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
        for i in range(len(images)):
            feats = hidden[i : i + 1].repeat(len(questions), 1, 1)
            states = QuestionEncoder(model)(feats, t_ids, t_mask)  # (Q, L, Dt)
            cases.append(ParityCase(
                "question_encoder",
                {"IMAGE_FEATURES": to_numpy(feats).astype(np.float32), "INPUT_IDS": ids, "ATTENTION_MASK": mask},
                {"QUESTION_STATES": to_numpy(states)}, note=f"image {i}"))
            if i == 0:
                tc = model.config.text_config
                cases += blip_decoder.decoder_parity_cases(
                    model.text_decoder, states, t_mask, int(tc.bos_token_id), int(tc.vocab_size), "question states"
                )
    return cases


def judge(fp32: dict[str, list[dict[str, np.ndarray]]], int8: dict[str, list[dict[str, np.ndarray]]]) -> UserView:
    """int8 image features against fp32 (a figure; `check_generation` decides)."""
    return blip_caption.judge(fp32, int8)


def check_generation(
    model: Any, processor: Any, tokenizer: Any, image: ImageProcessing, paths: dict[str, Any], spec: GenerationSpec,
    images: list[Image.Image], threads: int | None = None,
) -> dict[str, Any]:
    """Served answers (these engines, the scheduler) against `generate()` on each question alone."""
    from export.check import ort_session, run_session  # the ONNX side of the import: not in the triton-torch image
    from export.hf.parity import generation_agreement
    from serving.generation.params import resolve

    vision = ort_session(paths["image_encoder"], threads)
    qenc = ort_session(paths["question_encoder"], threads)
    questions = list(QUESTIONS)
    ids, mask = tokenize_padded(tokenizer, questions, spec.max_prompt_tokens)
    states: list[tuple[np.ndarray, np.ndarray]] = []
    for im in images:
        feats = run_session(vision, {"PIXELS": image.resize(im.convert("RGB"))[None]})["IMAGE_FEATURES"]
        q = run_session(qenc, {"IMAGE_FEATURES": np.repeat(feats, len(questions), 0), "INPUT_IDS": ids,
                               "ATTENTION_MASK": mask})["QUESTION_STATES"]
        states += [(q[j : j + 1], mask[j]) for j in range(len(questions))]
    refs, cases = [], []
    with torch.no_grad():
        for i, im in enumerate(images):
            for j, question in enumerate(questions):
                enc = processor(images=im, text=question, return_tensors="pt")
                for params in GENERATION_CHECKS:
                    refs.append([int(t) for t in model.generate(**enc, **params)[0]])
                    prompt = spec.decoder_prompt(None)
                    cases.append((i * len(questions) + j, prompt, resolve(GenerationParams(**params), spec.defaults,
                                                                          len(prompt)), f"image {i}, {question!r}, "
                                                                                        f"{params}"))
    shape = decoder_shape(model.config.to_dict())
    got = blip_decoder.run_served_generation(
        paths, shape, lambda c: states[cases[c][0]], [c[1] for c in cases], [c[2] for c in cases], threads
    )
    return generation_agreement(refs, got, [c[3] for c in cases])
