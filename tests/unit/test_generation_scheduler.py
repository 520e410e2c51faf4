"""The decode scheduler and the search against transformers' generate(), and its slots, queue and cancellation.

The BLIP decoder modules the ONNX graphs are traced from (export/hf/blip_decoder.py) run here in
PyTorch (`TorchDecoderEngine`) over a small random-weight BlipForConditionalGeneration, so every
sequence the scheduler decodes, alone or among batch-mates, joined together or mid-flight, can be
compared token for token with `model.generate()` on that one request.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serving.generation.engine import DecoderShape
from serving.generation.params import GenerationDefaults, GenerationParams, resolve
from serving.generation.scheduler import DecodeScheduler, GenSequence, QueueFull, TooLarge
from serving.generation.search import decoder_for

SETTINGS = (
    {},
    {"max_new_tokens": 7},
    {"num_beams": 3, "max_new_tokens": 8},
    {"num_beams": 4},
    {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2},
    {"min_new_tokens": 9, "max_new_tokens": 12},
    {"num_beams": 2, "length_penalty": 0.5, "max_new_tokens": 6, "early_stopping": True},
)


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    """A random-weight BlipForConditionalGeneration, its decoder engine in PyTorch, and image states."""
    from export.hf import blip_caption, blip_decoder
    from serving.generation.torch_engine import TorchDecoderEngine
    from tests.hf.checkpoints import build_blip_caption

    folder = build_blip_caption(tmp_path_factory.mktemp("blip-caption"))
    model = blip_caption.load_model(str(folder))
    shape = blip_caption.decoder_shape(model.config.to_dict())
    engine = TorchDecoderEngine(blip_decoder.BlipCrossKV(model.text_decoder),
                                blip_decoder.BlipDecoderStep(model.text_decoder), shape, device="cpu")
    torch.manual_seed(0)
    pixels = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        states = model.vision_model(pixel_values=pixels).last_hidden_state.numpy()
    defaults = blip_decoder.generation_defaults(model)
    return model, engine, pixels, states, defaults


def _reference(model, pixels, i: int, prompt: list[int] | None, params: dict) -> list[int]:
    kwargs = {"input_ids": torch.tensor([prompt + [3]])} if prompt else {}  # BLIP drops the prompt's last token
    with torch.no_grad():
        return [int(t) for t in model.generate(pixel_values=pixels[i : i + 1], **kwargs, **params)[0]]


def _sequence(key, engine, states, defaults, i: int, prompt: list[int], params: dict, cancelled=None) -> GenSequence:
    r = resolve(GenerationParams(**params), defaults, len(prompt))
    return GenSequence(key, decoder_for(prompt, r), engine.cross_kv(states[i : i + 1]),
                       np.ones(states.shape[1], np.int64), is_cancelled=cancelled)


def _scheduler(engine, max_rows: int = 64, budget: int = 1 << 30, waiting: int = 256) -> DecodeScheduler:
    return DecodeScheduler(engine, max_rows=max_rows, max_positions=40, max_cross_len=17,
                           memory_budget_bytes=budget, max_waiting=waiting)


def _drain(sched: DecodeScheduler, results: dict, steps: int | None = None) -> None:
    n = 0
    while sched.has_work() and (steps is None or n < steps):
        for e in sched.step():
            if e.kind == "done":
                results[e.seq.key] = list(e.result.token_ids)
        n += 1


def test_every_sequence_of_a_mixed_batch_equals_generate_alone(blip):
    model, engine, pixels, states, defaults = blip
    cases = [(i, prompt, params) for i in range(len(pixels)) for prompt in (None, [39, 5, 12])
             for params in SETTINGS]
    sched = _scheduler(engine)
    for k, (i, prompt, params) in enumerate(cases):
        start = [defaults.bos_token_id] + (prompt[1:] if prompt else [])
        sched.submit(_sequence(k, engine, states, defaults, i, start, params))
    results: dict = {}
    _drain(sched, results)
    assert sched.stats.steps < sum(len(r) for r in results.values())  # rows really shared steps
    for k, (i, prompt, params) in enumerate(cases):
        assert results[k] == _reference(model, pixels, i, prompt, params), (i, prompt, params)


def test_joining_mid_flight_changes_no_one_s_tokens(blip):
    model, engine, pixels, states, defaults = blip
    bos = [defaults.bos_token_id]
    sched = _scheduler(engine)
    results: dict = {}
    sched.submit(_sequence("first", engine, states, defaults, 0, bos, {"max_new_tokens": 15, "min_new_tokens": 15}))
    _drain(sched, results, steps=4)
    assert sched.active and not results  # still running when the others join
    for j, params in enumerate(SETTINGS[:4]):
        sched.submit(_sequence(j, engine, states, defaults, 1 + j % 3, bos, params))
    _drain(sched, results)
    assert results["first"] == _reference(model, pixels, 0, None, {"max_new_tokens": 15, "min_new_tokens": 15})
    for j, params in enumerate(SETTINGS[:4]):
        assert results[j] == _reference(model, pixels, 1 + j % 3, None, params)


def test_a_seed_makes_sampling_reproducible_whatever_the_batch(blip):
    _, engine, _, states, defaults = blip
    bos = [defaults.bos_token_id]
    sample = {"do_sample": True, "temperature": 1.3, "top_k": 20, "top_p": 0.95, "max_new_tokens": 12}

    def run(mates: int, seed: int) -> list[int]:
        sched = _scheduler(engine)
        sched.submit(_sequence("me", engine, states, defaults, 0, bos, {**sample, "seed": seed}))
        for j in range(mates):
            sched.submit(_sequence(j, engine, states, defaults, j % 4, bos, {**sample, "seed": 100 + j}))
        results: dict = {}
        _drain(sched, results)
        return results["me"]

    alone = run(0, 7)
    assert run(5, 7) == alone == run(2, 7)
    assert any(run(0, s) != alone for s in (8, 9, 10))  # the seed, not chance, fixed it


def test_top_k_one_sampling_is_greedy(blip):
    model, engine, pixels, states, defaults = blip
    sched = _scheduler(engine)
    sched.submit(_sequence("s", engine, states, defaults, 2, [defaults.bos_token_id],
                           {"do_sample": True, "top_k": 1, "seed": 3}))
    results: dict = {}
    _drain(sched, results)
    assert results["s"] == _reference(model, pixels, 2, None, {})


def test_cancelled_sequences_leave_within_one_step_and_their_rows_are_reused(blip):
    _, engine, _, states, defaults = blip
    bos = [defaults.bos_token_id]
    sched = _scheduler(engine, max_rows=4)
    gone = {"a": False}
    long = {"max_new_tokens": 30, "min_new_tokens": 30}
    sched.submit(_sequence("a", engine, states, defaults, 0, bos, {**long, "num_beams": 3},
                           cancelled=lambda: gone["a"]))
    sched.submit(_sequence("b", engine, states, defaults, 1, bos, long))
    sched.submit(_sequence("c", engine, states, defaults, 2, bos, long))  # no room: waits
    sched.step()
    assert sched.rows_used == 4 and [s.key for s in sched.waiting] == ["c"]
    gone["a"] = True
    events = sched.step()
    assert [e.seq.key for e in events if e.kind == "cancelled"] == ["a"]
    assert sorted(s.key for s in sched.active) == ["b", "c"] and sched.rows_used == 2  # c took a freed row
    assert sched.stats.cancelled == 1


def test_queue_bound_and_sizes(blip):
    _, engine, _, states, defaults = blip
    bos = [defaults.bos_token_id]
    sched = _scheduler(engine, max_rows=2, waiting=2)
    with pytest.raises(TooLarge):
        sched.submit(_sequence("wide", engine, states, defaults, 0, bos, {"num_beams": 3}))
    sched.submit_all([_sequence(k, engine, states, defaults, 0, bos, {}) for k in ("a", "b")])
    with pytest.raises(QueueFull):
        sched.submit(_sequence("c", engine, states, defaults, 0, bos, {}))
    with pytest.raises(QueueFull):  # all or nothing
        sched.submit_all([_sequence(k, engine, states, defaults, 0, bos, {}) for k in ("d", "e", "f")])
    assert [s.key for s in sched.waiting] == ["a", "b"]


def test_the_memory_budget_holds_sequences_back(blip):
    _, engine, _, states, defaults = blip
    bos = [defaults.bos_token_id]
    one = _sequence("x", engine, states, defaults, 0, bos, {})
    budget = int(1.5 * (one.positions() * engine.shape.bytes_per_position()))
    sched = _scheduler(engine, max_rows=8, budget=budget)
    sched.submit_all([_sequence(k, engine, states, defaults, 0, bos, {"max_new_tokens": 3}) for k in "ab"])
    sched.step()
    assert [s.key for s in sched.active] == ["a"] and sched.memory_used <= budget
    results: dict = {}
    _drain(sched, results)
    assert set(results) == {"a", "b"}


class CountingEngine:
    """A decoder whose next token depends on the row's own cache: (fed token + position + sum of cached tokens) % V.

    The cache holds each fed token in K's first channel, so a cache row that moved to the wrong place,
    or attended across rows, changes the tokens.
    """

    def __init__(self, vocab: int = 11) -> None:
        self.shape = DecoderShape(layers=1, heads=1, head_dim=2, vocab=vocab, encoder_dim=2)
        self.batches: list[int] = []

    def cross_kv(self, states: np.ndarray) -> list[np.ndarray]:
        k = states[:, None, :, :].astype(np.float32)
        return [k, k.copy()]

    def step(self, ids, positions, self_mask, cross_mask, past, cross):
        self.batches.append(ids.shape[0])
        cached = (past[0][:, 0, :, 0] * self_mask[:, :-1]).sum(-1).astype(np.int64)  # (B,)
        logits = np.zeros((ids.shape[0], self.shape.vocab), np.float32)
        logits[np.arange(ids.shape[0]), (ids[:, 0] + positions[:, 0] + cached) % self.shape.vocab] = 1.0
        new = np.stack([ids[:, 0], positions[:, 0]], -1).astype(np.float32)[:, None, None, :]
        return logits, [new, new.copy()]


def _counting_reference(n: int, vocab: int = 11, eos: int = 10) -> list[int]:
    seq = [1]
    while len(seq) < 1 + n:
        nxt = (seq[-1] + len(seq) - 1 + sum(seq[:-1])) % vocab
        if nxt == eos and len(seq) < 1 + n:  # min_new_tokens bans the end token: argmax falls on id 0
            nxt = 0
        seq.append(nxt)
    return seq


def test_caches_follow_rows_when_others_join_and_leave():
    engine = CountingEngine()
    defaults = GenerationDefaults(bos_token_id=1, eos_token_ids=(10,), pad_token_id=0, max_positions=30)
    sched = DecodeScheduler(engine, max_rows=8, max_positions=30, max_cross_len=3, memory_budget_bytes=1 << 20,
                            max_waiting=8)

    def submit(key: str, n: int) -> None:
        r = resolve(GenerationParams(max_new_tokens=n, min_new_tokens=n), defaults, 1)
        sched.submit(GenSequence(key, decoder_for([1], r), engine.cross_kv(np.ones((1, 3, 2))), np.ones(3, np.int64)))

    lengths = {"short": 2, "long": 14, "mid": 6, "late": 5, "later": 7}
    for key in ("short", "long", "mid"):
        submit(key, lengths[key])
    results: dict = {}
    _drain(sched, results, steps=3)  # short has left: rows moved
    submit("late", lengths["late"])
    _drain(sched, results, steps=2)
    submit("later", lengths["later"])
    _drain(sched, results)
    assert engine.batches[:2] == [3, 3] and engine.batches[-1] == 1  # rows leave as sequences finish
    for key, n in lengths.items():
        assert results[key] == _counting_reference(n), key
    assert sched.rows_used == 0 and not sched.active


def test_fresh_slots_hold_no_garbage_that_masked_attention_would_read(blip, monkeypatch):
    """Masked positions are weighted by exactly 0, and 0 × NaN is NaN: buffers must not start as garbage.

    Uninitialised memory that happens to hold NaN (as `np.empty` can give) is simulated here; a
    scheduler whose buffers came from it decodes [PAD] forever (argmax of NaN logits).
    """
    import serving.generation.scheduler as scheduler_module

    real = np.empty
    monkeypatch.setattr(scheduler_module.np, "empty", lambda shape, dtype=float: np.full(shape, np.nan, dtype))
    try:
        model, engine, pixels, states, defaults = blip
        sched = _scheduler(engine)
        short, long = {"max_new_tokens": 3, "min_new_tokens": 3}, {"max_new_tokens": 10, "min_new_tokens": 10}
        sched.submit(_sequence("long", engine, states, defaults, 1, [defaults.bos_token_id], long))
        results: dict = {}
        _drain(sched, results, steps=3)
        # A late joiner's row has no cache yet: it reads the long row's 3 positions masked, in its own slot.
        sched.submit(_sequence("short", engine, states, defaults, 0, [defaults.bos_token_id], short))
        _drain(sched, results)
    finally:
        monkeypatch.setattr(scheduler_module.np, "empty", real)
    assert results["long"] == _reference(model, pixels, 1, None, long)
    assert results["short"] == _reference(model, pixels, 0, None, short)
