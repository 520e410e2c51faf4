"""Model families the API serves, table-driven: the native fusion model and imported Hugging Face checkpoints.

A family says which tasks a model has, which engines (Triton models) it is split into, and how
the router feeds and reads them. Adding a family is one module declaring a `Family` and one line
in `FAMILIES`; the router and pipeline read these fields and never test a family's name.
A family whose tasks need code of their own (generation: a decode loop, streaming) names it in
`task_code`, task → `module:function`, imported when first used, as vLLM's model registry maps an
architecture to its class; the pipeline calls it instead of its built-in task.
The export side (PyTorch wrappers, parity references) lives in `export/hf/`, one module per family.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

TASKS = ("vqa", "match", "retrieve", "embed", "caption")
GENERATION_TASKS = "serving.app.generation"  # the generative families' task code


class UnsupportedArchitecture(ValueError):
    """A checkpoint's `architectures` names no family vtfuse can serve."""


@dataclass(frozen=True)
class Family:
    """How one kind of model is served.

    Attributes:
        name: family id recorded in manifests (`vtfuse`, `blip_retrieval`, `vilt_vqa`).
        architecture: the `transformers` class in config.json's `architectures` (None: native).
        tasks: API tasks it answers; any other is a 422 naming these.
        roles: its engines; each is a Triton model named `<model>_<role>` when imported.
        fusion_text_input: what the fusion engine takes for the texts: `features` (TEXT_FEATURES
            of text_encoder) or `ids` (INPUT_IDS: BLIP's multimodal pass re-embeds the tokens).
        itm_output: `ITM_LOGIT` (one logit, sigmoid) or `ITM_LOGITS` (two-way head, softmax index 1).
        vqa_score: `softmax` over the answers (trained with cross-entropy) or `sigmoid` per
            answer (ViLT, trained with binary cross-entropy, as transformers' VQA pipeline scores it).
        single_stream: VQA runs one engine on image and text together (no reuse of image features).
        summary: one line for `GET /v1/models` and the docs.
        task_code: task → `module:function` that runs it for this family (`serving.app.generation:caption`),
            in place of the pipeline's built-in task.
    """

    name: str
    architecture: str | None
    tasks: tuple[str, ...]
    roles: tuple[str, ...]
    fusion_text_input: str = "features"
    itm_output: str = "ITM_LOGIT"
    vqa_score: str = "softmax"
    single_stream: bool = False
    summary: str = ""
    task_code: dict[str, str] = field(default_factory=dict)

    def runs_own(self, task: str) -> str | None:
        """The import path of the family's own code for `task`, or None (the pipeline's built-in task)."""
        return self.task_code.get(task)

    def itm_probability(self, fused: dict[str, np.ndarray]) -> np.ndarray:
        """ITM probability per row from the fusion engine's outputs."""
        if self.itm_output == "ITM_LOGITS":
            return softmax(np.asarray(fused["ITM_LOGITS"]).reshape(-1, 2))[:, 1]
        return sigmoid(np.asarray(fused["ITM_LOGIT"]).reshape(-1))

    def vqa_probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Per-answer scores of each row of VQA logits."""
        return sigmoid(logits) if self.vqa_score == "sigmoid" else softmax(logits)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function in float64, overflow-free."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


NATIVE = Family(
    name="vtfuse",
    architecture=None,
    tasks=TASKS,
    roles=("image_encoder", "text_encoder", "fusion"),
    summary="vtfuse's own fusion model (image tower, text tower, cross-attention fusion; VQA, ITM, embeddings; "
    "captions from its caption decoder)",
    task_code={"caption": f"{GENERATION_TASKS}:caption"},
)
BLIP_RETRIEVAL = Family(
    name="blip_retrieval",
    architecture="BlipForImageTextRetrieval",
    tasks=("match", "retrieve", "embed"),
    roles=("image_encoder", "text_encoder", "fusion"),
    fusion_text_input="ids",
    itm_output="ITM_LOGITS",
    summary="BLIP image-text retrieval: ITC embeddings for the shortlist, the ITM head to score and re-rank",
)
VILT_VQA = Family(
    name="vilt_vqa",
    architecture="ViltForQuestionAnswering",
    tasks=("vqa",),
    roles=("single_stream",),
    vqa_score="sigmoid",
    single_stream=True,
    summary="ViLT VQA: one single-stream transformer over image patches and question tokens; labels from id2label",
)
BLIP_CAPTION = Family(
    name="blip_caption",
    architecture="BlipForConditionalGeneration",
    tasks=("caption",),
    roles=("image_encoder", "generate"),
    summary="BLIP captioning: the vision tower once, then its text decoder token by token (KV cache, "
    "iteration-level batching), as generate() decodes",
    task_code={"caption": f"{GENERATION_TASKS}:caption"},
)
BLIP_VQA = Family(
    name="blip_vqa",
    architecture="BlipForQuestionAnswering",
    tasks=("vqa",),
    roles=("image_encoder", "question_encoder", "generate"),
    summary="BLIP open-ended VQA: vision tower, question encoder cross-attending to it, then the answer generated "
    "token by token, as generate() decodes it for the question alone",
    task_code={"vqa": f"{GENERATION_TASKS}:vqa"},
)
FAMILIES = {f.name: f for f in (NATIVE, BLIP_RETRIEVAL, VILT_VQA, BLIP_CAPTION, BLIP_VQA)}
ARCHITECTURES = {f.architecture: f for f in FAMILIES.values() if f.architecture}


def supported_architectures() -> list[str]:
    """The `transformers` classes `vtfuse import-hf` takes."""
    return sorted(ARCHITECTURES)


def family_for_architectures(architectures: Iterable[str] | None) -> Family:
    """The family of a checkpoint from its config.json `architectures`.

    Raises:
        UnsupportedArchitecture: none of them is supported (the message lists what is).
    """
    names = list(architectures or [])
    for a in names:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    supported = ", ".join(
        f"{f.architecture} ({', '.join(f.tasks)})" for f in sorted(ARCHITECTURES.values(), key=lambda f: f.name)
    )
    raise UnsupportedArchitecture(
        f"architecture {', '.join(names) or '(none in config.json)'} is not supported: vtfuse imports {supported}"
    )
