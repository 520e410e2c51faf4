"""Small random-weight Hugging Face checkpoints built by the tests (no network): BLIP retrieval and ViLT VQA.

Each is a real `save_pretrained` folder (config.json, model.safetensors, processor and tokenizer
files) with a tiny WordPiece vocabulary made with `tokenizers`. Weights are spread (larger than
transformers' initialisation) so that ITM probabilities and VQA answers differ from text to
text: at the default initialisation every ITM probability sits near one value, where a
comparison would prove little.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] a an the red green blue yellow circle circles square squares triangle "
    "triangles and is are there what color shape how many object objects of ? 0 1 2 3 4 yes no ##s"
).split()
VQA_LABELS = ("yes", "no", "red", "green", "blue", "yellow", "circle", "square", "triangle", "0", "1", "2")


def tokenizer():
    """A BERT WordPiece tokenizer over WORDS (transformers' BertTokenizer on a `tokenizers` WordPiece model)."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})


HEADS = ("itm_head", "classifier", "vision_proj", "text_proj")


def _spread(model: torch.nn.Module, seed: int, std: float) -> None:
    """Redraw weight matrices with `std` (heads with half of it, off saturation), small biases, LayerNorm gains ~1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                scale = 0.5 * std if name.startswith(HEADS) else std
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            elif "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def build_blip(folder: str | Path, seed: int = 0, image_size: int = 64, patch: int = 16) -> Path:
    """A BlipForImageTextRetrieval checkpoint (2-layer towers, 48/32 wide) with its BlipProcessor."""
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor, BlipProcessor

    torch.manual_seed(seed)
    cfg = BlipConfig(
        text_config=dict(
            vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=48, encoder_hidden_size=48, pad_token_id=0, bos_token_id=2, sep_token_id=3,
        ),
        vision_config=dict(
            hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=image_size,
            patch_size=patch,
        ),
        image_text_hidden_size=24,
    )
    model = BlipForImageTextRetrieval(cfg).eval()
    _spread(model, seed, 0.5)
    folder = Path(folder)
    model.save_pretrained(folder)
    ip = BlipImageProcessor(size={"height": image_size, "width": image_size})
    BlipProcessor(image_processor=ip, tokenizer=tokenizer()).save_pretrained(folder)
    return folder


def build_vilt(folder: str | Path, seed: int = 0, shortest_edge: int = 64, patch: int = 16) -> Path:
    """A ViltForQuestionAnswering checkpoint (2 layers, 32 wide, 12 labels) with its ViltProcessor."""
    from transformers import ViltConfig, ViltForQuestionAnswering, ViltImageProcessor, ViltProcessor

    torch.manual_seed(seed)
    cfg = ViltConfig(
        vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=shortest_edge, patch_size=patch, max_position_embeddings=40, num_labels=len(VQA_LABELS),
        id2label=dict(enumerate(VQA_LABELS)), label2id={a: i for i, a in enumerate(VQA_LABELS)},
    )
    model = ViltForQuestionAnswering(cfg).eval()
    _spread(model, seed, 0.5)
    folder = Path(folder)
    model.save_pretrained(folder)
    ip = ViltImageProcessor(size={"shortest_edge": shortest_edge}, size_divisor=patch)
    ViltProcessor(image_processor=ip, tokenizer=tokenizer()).save_pretrained(folder)
    return folder


def generation_tokenizer():
    """The WordPiece tokenizer with BLIP's `[DEC]` start token added as a special token (as BLIP's own has)."""
    tok = tokenizer()
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def _blip_generation_config(tok, image_size: int, patch: int, text_width: int = 32,  # noqa: ANN202 - BlipConfig
                            positions: int = 40):
    """Two layers each; VQA's decoder cross-attends to the question encoder, so its text width is the vision's (48)."""
    from transformers import BlipConfig

    return BlipConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=text_width, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=2 * text_width, max_position_embeddings=positions, encoder_hidden_size=48, pad_token_id=0,
            bos_token_id=tok.bos_token_id, sep_token_id=3,
        ),
        vision_config=dict(
            hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=image_size,
            patch_size=patch,
        ),
    )


def _spread_decoder(model: torch.nn.Module, seed: int, std: float, position_gain: float) -> None:
    """`_spread`, then the decoder's position table scaled up: at spread weights alone the cross-attention to the
    image dominates every step and a greedy sequence repeats one token; with positions weighing more, tokens
    change from step to step (and still with the image and the question)."""
    _spread(model, seed, std)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("text_decoder.") and "position_embeddings" in name:
                p.mul_(position_gain)


def build_blip_caption(folder: str | Path, seed: int = 3, image_size: int = 64, patch: int = 16,
                       std: float = 0.8, position_gain: float = 20.0, positions: int = 40) -> Path:
    """A BlipForConditionalGeneration checkpoint (2-layer vision tower and decoder) with its BlipProcessor.

    `positions`: the decoder's position table (tests that need a request to run long ask for hundreds).
    """
    from transformers import BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    torch.manual_seed(seed)
    tok = generation_tokenizer()
    model = BlipForConditionalGeneration(_blip_generation_config(tok, image_size, patch, positions=positions)).eval()
    _spread_decoder(model, seed, std, position_gain)
    folder = Path(folder)
    model.save_pretrained(folder)
    ip = BlipImageProcessor(size={"height": image_size, "width": image_size})
    BlipProcessor(image_processor=ip, tokenizer=tok).save_pretrained(folder)
    return folder


def build_blip_vqa(folder: str | Path, seed: int = 3, image_size: int = 64, patch: int = 16, std: float = 0.5,
                   position_gain: float = 5.0) -> Path:
    """A BlipForQuestionAnswering checkpoint (vision tower, question encoder, decoder) with its BlipProcessor."""
    from transformers import BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    torch.manual_seed(seed)
    tok = generation_tokenizer()
    model = BlipForQuestionAnswering(_blip_generation_config(tok, image_size, patch, text_width=48)).eval()
    _spread_decoder(model, seed, std, position_gain)
    folder = Path(folder)
    model.save_pretrained(folder)
    ip = BlipImageProcessor(size={"height": image_size, "width": image_size})
    BlipProcessor(image_processor=ip, tokenizer=tok).save_pretrained(folder)
    return folder
