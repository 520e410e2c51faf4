"""What a generation model needs at run time besides its graphs: task, encoders, prompt rule, defaults, limits.

Written at install (`generation.json` in the generate model's `checkpoint/` folder, and in an
imported model's `import.json`), read by the Triton generate model and by the API.

Prompts follow BLIP's `generate()`: the prompt is tokenized with the tokenizer's special tokens
(`[CLS] a picture of [SEP]`), its first token becomes the decoder's start token and the last
one is dropped (`[DEC] a picture of`); with no prompt the decoder starts from the start token
alone. Generative VQA starts the decoder from the start token and cross-attends to the question
encoder's states instead of the image's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from serving.generation.params import GenerationDefaults

SPEC_FILE = "generation.json"
TASKS = ("caption", "vqa")


@dataclass(frozen=True)
class GenerationSpec:
    """One generation model.

    Attributes:
        task: `caption` (the decoder cross-attends to the image) or `vqa` (to the question encoder's
            states, which cross-attend to the image).
        defaults: the checkpoint's generation config and special tokens.
        image_model: Triton model of the vision tower (PIXELS → `image_output`).
        image_output: the vision tower's output the decoder (caption) or question encoder (vqa) reads.
        question_model: vqa only: Triton model INPUT_IDS, ATTENTION_MASK, IMAGE_FEATURES → QUESTION_STATES.
        max_prompt_tokens: longest prompt or question, special tokens included.
        max_cross_len: encoder positions the decoder may attend to (image tokens, or max_prompt_tokens).
        clean_up_spaces: decode with transformers' `clean_up_tokenization` (WordPiece tokenizers).
        image: how the generate model itself resizes IMAGE bytes from a direct client:
            `{"mode": "native", "size": N}` (vtfuse's square resize) or an `ImageProcessing` as a dict.
    """

    task: str
    defaults: GenerationDefaults
    image_model: str
    image_output: str
    max_prompt_tokens: int
    max_cross_len: int
    question_model: str = ""
    clean_up_spaces: bool = True
    image: dict[str, Any] = field(default_factory=dict)

    def decoder_prompt(self, prompt_ids: list[int] | None) -> list[int]:
        """The tokens the decoder starts from, given the prompt's token ids with special tokens (caption only)."""
        if self.task == "caption" and prompt_ids:
            ids = list(prompt_ids)
            ids[0] = self.defaults.bos_token_id
            return ids[:-1] if len(ids) > 1 else ids
        return [self.defaults.bos_token_id]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["defaults"] = self.defaults.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> GenerationSpec:
        d = dict(d)
        d["defaults"] = GenerationDefaults.from_json(d["defaults"])
        return cls(**d)


def write_spec(folder: str | Path, spec: GenerationSpec) -> Path:
    """`generation.json` in `folder`."""
    path = Path(folder) / SPEC_FILE
    path.write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    return path


def read_spec(folder: str | Path) -> GenerationSpec:
    """The `generation.json` of `folder`."""
    return GenerationSpec.from_json(json.loads((Path(folder) / SPEC_FILE).read_text()))
