"""Token ids → text as `processor.decode(ids, skip_special_tokens=True)` gives it, and streamed deltas of that text.

`transformers` 5 decodes with the checkpoint's `tokenizers` backend, special tokens skipped, then,
when the tokenizer says `clean_up_tokenization_spaces` (BERT/WordPiece tokenizers such as BLIP's),
removes the spaces its decoder leaves before punctuation and contractions. `TextDecoder` does the
same with the checkpoint's tokenizer.json.

Streaming: a new token can change the end of the text (a `##` piece joins the last word, the
clean-up pulls "." onto it), so `Stream.push` emits only text that can no longer change: up to the
last space of the decoded text, and only when it extends what was emitted before. The deltas
therefore always concatenate to a prefix of the final text, and `Stream.finish` emits the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer


def clean_up_tokenization(text: str) -> str:
    """transformers' `PreTrainedTokenizerBase.clean_up_tokenization`."""
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


@dataclass(frozen=True)
class TextDecoder:
    """A checkpoint's tokenizer with its decode settings."""

    tokenizer: Tokenizer
    clean_up_spaces: bool = True

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` without special tokens."""
        text = self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
        return clean_up_tokenization(text) if self.clean_up_spaces else text

    def stream(self, prompt: Sequence[int]) -> Stream:
        """A stream of deltas of the text of `prompt` + the tokens pushed after it."""
        return Stream(self, list(prompt))


@dataclass
class Stream:
    """Incremental text of one sequence: `push` a token, get the stable new text (maybe empty)."""

    decoder: TextDecoder
    ids: list[int]
    emitted: str = ""

    def push(self, token: int) -> str:
        """Add a generated token; returns the text that became final with it ("" when none did).

        The prompt's own text (a caption includes it) comes out with the first tokens.
        """
        self.ids.append(int(token))
        text = self.decoder.decode(self.ids)
        stable = text[: text.rfind(" ")] if " " in text else ""
        return self._emit(stable)

    def finish(self) -> str:
        """The rest of the final text (what `push` held back)."""
        return self._emit(self.decoder.decode(self.ids))

    def text(self) -> str:
        """The whole text so far."""
        return self.decoder.decode(self.ids)

    def _emit(self, upto: str) -> str:
        if len(upto) > len(self.emitted) and upto.startswith(self.emitted):
            delta = upto[len(self.emitted) :]
            self.emitted = upto
            return delta
        return ""
