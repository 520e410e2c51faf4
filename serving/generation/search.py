"""Decoding one sequence: greedy, sampled or beam search, token for token as `transformers`' `generate()`.

A `SequenceDecoder` owns the tokens of one sequence (one caption, one answer) and nothing of
the model: each step the scheduler feeds `next_inputs()` (one token per row it occupies: one
row, or one per beam) through the decoder engine and hands the rows' logits to `advance`.
The prompt (the start token plus any prompt tokens) is fed one token per step first; logits
of all but its last token are ignored, exactly as a prefill would produce them.

- `GreedyDecoder`: `GenerationMixin._sample` with `do_sample` false (argmax) or true (a draw
  from the processed distribution with the request's own seeded generator, so a sampled
  result depends on the seed alone, never on batch-mates).
- `BeamDecoder`: `GenerationMixin._beam_search` (the vectorised implementation of
  transformers 5): 2·k candidates per step, finished hypotheses scored by sum of log-probs ÷
  length ** length_penalty, the same early-stop heuristic. After a step it names each row's
  parent beam so the scheduler reorders the rows' caches, as `reorder_cache` does.

Every sequence also tracks the log-probability of its generated tokens under the model's own
distribution (log-softmax of the raw logits, before any processor): `exp` of it is the score
generative VQA returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from serving.generation import logits as lp
from serving.generation.params import Resolved

BEAM_PENALTY = np.float32(-1.0e9)  # transformers' "never pick this" offset in beam search


@dataclass(frozen=True)
class DecodeResult:
    """A finished sequence.

    Attributes:
        token_ids: the whole sequence as `generate()` returns it (start token, prompt, generated
            tokens, the end token when it stopped on one).
        finish_reason: `stop` (an end token) or `length` (max_length reached).
        logprob: sum of the generated tokens' log-probabilities under the raw model distribution.
        prompt_length: tokens of `token_ids` that were the prompt.
    """

    token_ids: tuple[int, ...]
    finish_reason: str
    logprob: float
    prompt_length: int

    @property
    def generated(self) -> tuple[int, ...]:
        """The tokens after the prompt."""
        return self.token_ids[self.prompt_length :]

    @property
    def probability(self) -> float:
        """exp(logprob): the probability the model gives the generated tokens."""
        return float(math.exp(self.logprob))


@dataclass(frozen=True)
class StepOutcome:
    """What one step did to a sequence.

    Attributes:
        token: the token generated this step (greedy/sample only; None during the prompt, and for beams).
        parents: for beams, the row each row's cache is taken from before the next step (None: unchanged).
        done: the sequence is finished (`result()` is ready).
    """

    token: int | None = None
    parents: np.ndarray | None = None
    done: bool = False


class GreedyDecoder:
    """One row: argmax, or a draw from the processed distribution when `do_sample`."""

    rows = 1

    def __init__(self, prompt: list[int], settings: Resolved) -> None:
        if not prompt:
            raise ValueError("a sequence starts from at least the start token")
        self.r = settings
        self.seq = list(prompt)
        self.fed = 0  # prompt tokens fed so far
        self.logprob = 0.0
        self.done = False
        self.rng = np.random.Generator(np.random.PCG64(settings.seed)) if settings.do_sample else None

    def next_inputs(self) -> list[int]:
        """The token the row feeds at the next step."""
        if self.fed < self.r.prompt_length:
            return [self.seq[self.fed]]
        return [self.seq[-1]]

    def in_prompt(self) -> bool:
        """True while prompt tokens other than the last are being fed (their logits are not used)."""
        return self.fed < self.r.prompt_length - 1

    def advance(self, logits: np.ndarray) -> StepOutcome:
        """Consume the step's logits `(1, vocab)`: pick the next token (after the prompt)."""
        if self.fed < self.r.prompt_length:
            self.fed += 1
            if self.fed < self.r.prompt_length:
                return StepOutcome()
        raw = np.asarray(logits, dtype=np.float32).reshape(1, -1)
        scores = lp.process([self.seq], raw, self.r)
        if self.rng is not None:
            p = lp.softmax(scores)[0].astype(np.float64)
            token = int(self.rng.choice(p.shape[0], p=p / p.sum()))
        else:
            token = int(np.argmax(scores[0]))
        self.logprob += float(lp.log_softmax(raw)[0, token])
        self.seq.append(token)
        self.done = token in self.r.eos_token_ids or len(self.seq) >= self.r.max_length
        return StepOutcome(token=token, done=self.done)

    def result(self) -> DecodeResult:
        reason = "stop" if self.seq[-1] in self.r.eos_token_ids and len(self.seq) > self.r.prompt_length else "length"
        return DecodeResult(tuple(self.seq), reason, self.logprob, self.r.prompt_length)


class BeamDecoder:
    """`num_beams` rows: beam search as transformers 5 scores it (no sampling)."""

    def __init__(self, prompt: list[int], settings: Resolved) -> None:
        r = settings
        self.r = r
        k = r.num_beams
        self.rows = k
        self.fed = 0
        self.done = False
        self.cur_len = len(prompt)
        self.prompt_length = len(prompt)
        self.keep = max(2, 1 + len(r.eos_token_ids)) * k  # candidates kept per step
        fill = r.eos_token_ids[0] if r.eos_token_ids else -1
        self.running = np.full((k, r.max_length), fill, dtype=np.int64)
        self.running[:, : self.cur_len] = prompt
        self.running_scores = np.zeros(k, dtype=np.float32)
        self.running_scores[1:] = BEAM_PENALTY
        self.running_raw = np.zeros(k, dtype=np.float64)
        self.sequences = self.running.copy()
        self.scores = np.full(k, BEAM_PENALTY, dtype=np.float32)
        self.finished = np.zeros(k, dtype=bool)
        self.finished_raw = np.zeros(k, dtype=np.float64)
        self.finished_len = np.full(k, self.cur_len, dtype=np.int64)
        self.improvable = True  # transformers' is_early_stop_heuristic_unsatisfied

    def next_inputs(self) -> list[int]:
        """The token each beam row feeds at the next step."""
        if self.fed < self.prompt_length:
            return [int(self.running[0, self.fed])] * self.rows
        return [int(t) for t in self.running[:, self.cur_len - 1]]

    def in_prompt(self) -> bool:
        return self.fed < self.prompt_length - 1

    def advance(self, logits: np.ndarray) -> StepOutcome:
        """Consume the beams' logits `(k, vocab)`; returns each row's parent beam for the cache reorder."""
        if self.fed < self.prompt_length:
            self.fed += 1
            if self.fed < self.prompt_length:
                return StepOutcome()
        r, k, cur = self.r, self.rows, self.cur_len
        raw = np.asarray(logits, dtype=np.float32).reshape(k, -1)
        vocab = raw.shape[1]
        raw_lp = lp.log_softmax(raw)
        log_probs = lp.process([list(s[:cur]) for s in self.running], raw_lp, r)
        acc = (log_probs + self.running_scores[:, None]).reshape(-1)
        # _get_top_k_continuations: the best `keep` of all beams' continuations, best first.
        top = np.argsort(-acc, kind="stable")[: self.keep]
        top_lp = acc[top]
        beam = top // vocab
        token = top % vocab
        cand = self.running[beam].copy()
        cand[:, cur] = token
        cand_raw = self.running_raw[beam] + raw_lp[beam, token].astype(np.float64)
        hits = (cur + 1 >= r.max_length) | np.isin(token, r.eos_token_ids)
        # _get_running_beams_for_next_iteration: the k best that did not just stop.
        running_lp = top_lp + hits.astype(np.float32) * BEAM_PENALTY
        nxt = np.argsort(-running_lp, kind="stable")[:k]
        self.running = cand[nxt]
        self.running_scores = running_lp[nxt].astype(np.float32)
        self.running_raw = cand_raw[nxt]
        parents = beam[nxt]
        # _update_finished_beams: the top-k candidates that stopped join the finished ones if better.
        just = hits & (np.arange(self.keep) < k)
        fin_lp = (top_lp / np.float32((cur + 1 - self.prompt_length) ** r.length_penalty)).astype(np.float32)
        if self.finished.all() and r.early_stopping is True:
            fin_lp = fin_lp + BEAM_PENALTY
        if not self.improvable:
            fin_lp = fin_lp + BEAM_PENALTY
        fin_lp = fin_lp + (~just).astype(np.float32) * BEAM_PENALTY
        merged_scores = np.concatenate([self.scores, fin_lp])
        order = np.argsort(-merged_scores, kind="stable")[:k]
        merged_seq = np.concatenate([self.sequences, cand])
        merged_fin = np.concatenate([self.finished, just])
        merged_raw = np.concatenate([self.finished_raw, cand_raw])
        merged_len = np.concatenate([self.finished_len, np.full(self.keep, cur + 1, dtype=np.int64)])
        self.sequences, self.scores = merged_seq[order], merged_scores[order]
        self.finished, self.finished_raw, self.finished_len = merged_fin[order], merged_raw[order], merged_len[order]
        self.cur_len = cur = cur + 1
        # _check_early_stop_heuristic
        if r.early_stopping == "never" and r.length_penalty > 0.0:
            best_len = r.max_length - self.prompt_length
        else:
            best_len = cur - self.prompt_length
        best_possible = self.running_scores[0] / np.float32(best_len**r.length_penalty)
        worst = np.where(self.finished, self.scores.min(), np.float32(-1.0e9))
        self.improvable = bool(self.improvable and np.any(best_possible > worst))
        open_beam = not (self.finished.all() and r.early_stopping is True)
        self.done = not (self.improvable and open_beam and not hits.all())
        return StepOutcome(parents=parents, done=self.done)

    def result(self) -> DecodeResult:
        n = int(self.finished_len[0])
        seq = tuple(int(t) for t in self.sequences[0, :n])
        reason = "stop" if seq[-1] in self.r.eos_token_ids and n > self.prompt_length else "length"
        return DecodeResult(seq, reason, float(self.finished_raw[0]), self.prompt_length)


SequenceDecoder = GreedyDecoder | BeamDecoder


def decoder_for(prompt: list[int], settings: Resolved) -> SequenceDecoder:
    """The decoder a sequence's settings call for."""
    if settings.num_beams > 1:
        return BeamDecoder(prompt, settings)
    return GreedyDecoder(prompt, settings)
