"""The word-level tokenizer, stored as a Hugging Face `tokenizers` tokenizer.json in each checkpoint."""

from __future__ import annotations

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

from serving.shapes.world import COLOR_NAMES, COUNTS, SHAPES

PAD, UNK, CLS, SEP = "[PAD]", "[UNK]", "[CLS]", "[SEP]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP)
# Every word of the shapes world's questions and captions; anything else maps to [UNK].
WORDS = (
    "what color colour is the shape object objects how many are there a an and of",
    " ".join(SHAPES),
    " ".join(f"{s}s" for s in SHAPES),
    " ".join(COLOR_NAMES),
    " ".join(COUNTS),
    "yes no image picture this in",
)


def build_tokenizer() -> Tokenizer:
    """Build the tokenizer: lowercase, '?' dropped (it is optional), split on spaces and punctuation."""
    vocab: dict[str, int] = {}
    for word in (*SPECIAL_TOKENS, *" ".join(WORDS).split()):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # skipped by decode()
    tok.normalizer = normalizers.Sequence(
        [normalizers.Lowercase(), normalizers.Replace("?", " "), normalizers.Strip()]
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", special_tokens=[(CLS, vocab[CLS]), (SEP, vocab[SEP])]
    )
    return tok
