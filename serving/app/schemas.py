"""Pydantic request and response bodies of the HTTP API; unknown fields and wrong types are 422."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from serving.generation.params import MAX_BEAMS, GenerationParams

B64Image = Annotated[
    str, Field(description="Base64 of the PNG, JPEG or WebP file bytes (a data: URL prefix is allowed).")
]
Text = Annotated[str, StringConstraints(min_length=1)]
TopK = Annotated[int, Field(ge=1, description="How many best entries to return.")]
ModelName = Annotated[
    str | None,
    Field(
        default=None,
        min_length=1,
        max_length=64,
        description="Served model (preset/version) to route to; default: tiny.",
    ),
]


class _Request(BaseModel):
    # strict: "3" is not an int, 1 is not a string; extra: unknown fields are refused.
    model_config = ConfigDict(extra="forbid", strict=True)

    model: ModelName = None


class VqaRequest(_Request):
    """Questions about one image."""

    image: B64Image
    questions: list[Text] = Field(min_length=1)
    top_k: TopK = 1
    return_attention: bool = Field(
        default=False, description="Add each question's patch-attention grid (rows sum to 1)."
    )


class MatchRequest(_Request):
    """Texts to score against one image."""

    image: B64Image
    texts: list[Text] = Field(min_length=1)


class RetrieveRequest(_Request):
    """Rank `texts` for `image`, or `images` for `text`: exactly one of the two forms."""

    image: B64Image | None = None
    texts: list[Text] | None = Field(default=None, min_length=1)
    text: Text | None = None
    images: list[B64Image] | None = Field(default=None, min_length=1)
    top_k: TopK = 1
    shortlist: Annotated[int, Field(ge=1)] | Literal["all"] | None = Field(
        default=None,
        description="Candidates the ITM head re-ranks after the embedding shortlist: a number (at least top_k), or "
        "\"all\" to score every candidate with ITM (exact, slower); default max(16, 4·top_k), BLIP's recipe.",
    )

    @model_validator(mode="after")
    def _one_form(self) -> RetrieveRequest:
        retrieve_form(self.image is not None, self.texts is not None, self.text is not None, self.images is not None)
        return self


def retrieve_form(image: bool, texts: bool, text: bool, images: bool) -> bool:
    """Which retrieval form the present fields make: True for image + texts, False for text + images.

    Raises:
        ValueError: both forms, neither, or half of one (the message says which fields to send).
    """
    image_form, text_form = image or texts, text or images
    if image_form and text_form:
        raise ValueError("send either image + texts or text + images, not both forms")
    if not image_form and not text_form:
        raise ValueError("send image + texts (rank texts) or text + images (rank images)")
    if image_form and not (image and texts):
        raise ValueError("the image form needs both `image` and `texts`")
    if text_form and not (text and images):
        raise ValueError("the text form needs both `text` and `images`")
    return image_form


class EmbedRequest(_Request):
    """Images and/or texts to embed; at least one."""

    images: list[B64Image] | None = Field(default=None, min_length=1)
    texts: list[Text] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _not_empty(self) -> EmbedRequest:
        if not self.images and not self.texts:
            raise ValueError("send `images` and/or `texts` to embed")
        return self


class CaptionRequest(_Request):
    """A caption for one image, generated token by token; every generation parameter defaults to the checkpoint's."""

    image: B64Image
    prompt: Text | None = Field(
        default=None,
        description="Text the caption starts with (BLIP's \"a picture of\" convention); the caption includes it.",
    )
    stream: bool = Field(
        default=False,
        description="Answer text/event-stream: one `data:` JSON event per token (`delta`), then the whole result.",
    )
    max_new_tokens: int | None = Field(default=None, ge=1, description="Most tokens generated after the prompt.")
    min_new_tokens: int | None = Field(default=None, ge=0, description="The end token is held back until this many.")
    num_beams: int | None = Field(default=None, ge=1, le=MAX_BEAMS, description="Beam search width (1: greedy).")
    do_sample: bool | None = Field(default=None, description="Sample from the distribution instead of its best.")
    temperature: float | None = Field(default=None, gt=0, description="Sampling temperature.")
    top_k: int | None = Field(default=None, ge=0, description="Sample among the k best tokens (0: all).")
    top_p: float | None = Field(default=None, gt=0, le=1, description="Sample among the best tokens of this mass.")
    repetition_penalty: float | None = Field(default=None, gt=0, description="> 1 discourages repeating tokens.")
    no_repeat_ngram_size: int | None = Field(default=None, ge=0, description="No n-gram of this size twice.")
    length_penalty: float | None = Field(default=None, description="Beam search: score ÷ length ** this.")
    early_stopping: bool | Literal["never"] | None = Field(default=None, description="Beam search stopping rule.")
    seed: int | None = Field(default=None, ge=0, lt=2**63, description="Makes a sampled caption reproducible.")

    def generation_params(self) -> GenerationParams:
        """The generation parameters this request sets."""
        return GenerationParams(**{k: getattr(self, k) for k in GenerationParams.names()})


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AnswerScore(_Response):
    answer: str
    score: float = Field(
        description="The answer's probability: softmax over the answer vocabulary (tiny), or the sigmoid of its "
        "logit for models trained with binary cross-entropy (ViLT, as transformers' VQA pipeline scores it)."
    )


class VqaAnswer(_Response):
    question: str
    answer: str
    score: float
    top_k: list[AnswerScore]
    attention: list[list[float]] | None = Field(
        default=None, description="Patch-attention grid (rows x cols over the image), only with return_attention."
    )
    tokens: list[str] | None = Field(
        default=None,
        description="The question's tokens as the model saw them ([CLS] and [SEP] included; the grid is the "
        "[CLS] token's attention), only with return_attention.",
    )


class VqaResponse(_Response):
    model: str
    answers: list[VqaAnswer]


class MatchResponse(_Response):
    model: str
    scores: list[float] = Field(description="ITM probability per text, in request order, 0..1.")


class RetrieveResult(_Response):
    index: int = Field(description="0-based index into the request's texts or images.")
    score: float = Field(description="ITM probability, 0..1.")
    text: str | None = Field(default=None, description="The ranked text (image + texts form only).")


class RetrieveResponse(_Response):
    model: str
    results: list[RetrieveResult] = Field(description="Best first.")


class EmbedResponse(_Response):
    model: str
    image_embeddings: list[list[float]]
    text_embeddings: list[list[float]]


class CaptionUsage(_Response):
    prompt_tokens: int = Field(description="Tokens the decoder started from: its start token and the prompt's.")
    generated_tokens: int = Field(description="Tokens generated after them, the end token included.")


class CaptionResponse(_Response):
    model: str
    caption: str = Field(description="processor.decode(token_ids, skip_special_tokens=True): the prompt included.")
    token_ids: list[int] = Field(description="The sequence as transformers' generate() returns it.")
    finish_reason: Literal["stop", "length"] = Field(description="`stop`: the end token; `length`: max tokens.")
    usage: CaptionUsage
    request_id: str


class ErrorDetail(_Response):
    code: str = Field(description="Stable machine-readable code, e.g. invalid_json, payload_too_large.")
    message: str = Field(description="What was wrong and how to fix it.")


class ErrorResponse(_Response):
    error: ErrorDetail


class ModelInfo(_Response):
    name: str = Field(description="What a request's `model` field names.")
    family: str = Field(description="vtfuse (the native model), blip_retrieval or vilt_vqa.")
    architecture: str
    tasks: list[str] = Field(description="API tasks it answers: vqa, match, retrieve, embed.")
    engines: dict[str, str] = Field(description="Engine role → Triton model name.")
    precision: str = Field(description="fp32 or int8 engines.")
    source: str = Field(description="Where the checkpoint was imported or exported from.")
    parity: dict[str, Any] = Field(default_factory=dict, description="Parity figures recorded at install.")


class ModelsResponse(_Response):
    default: str = Field(description="The model used when a request names none.")
    models: list[ModelInfo]


class Health(_Response):
    status: str
    models: dict[str, bool] = Field(default_factory=dict)


REQUEST_MODELS: dict[str, type[_Request]] = {
    "/v1/vqa": VqaRequest,
    "/v1/match": MatchRequest,
    "/v1/retrieve": RetrieveRequest,
    "/v1/embed": EmbedRequest,
    "/v1/caption": CaptionRequest,
}
