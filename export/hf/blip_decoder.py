"""BLIP's text decoder (`BlipTextLMHeadModel`) split for serving: cross-attention K/V once, then one token per step.

Read from transformers' modeling_blip_text.py: each decoder layer is post-norm BERT with
self-attention (causal, cached), cross-attention to the encoder states (their keys and values
are fixed for the whole decode) and a feed-forward block; the LM head is the prediction head
(dense, activation, LayerNorm, vocabulary projection). `BlipCrossKV` and `BlipDecoderStep` compute
exactly that with the module's own weights, in the tensor contract of `serving.generation.engine`,
so one scheduler serves captioning and VQA. Masks are additive with float32's minimum, as
transformers' eager attention uses them.

Also here: the checkpoint's effective generation config (`generation_defaults`), the parity cases of
the two decoder graphs against transformers' own cache and logits, and `generation_check`, which
runs the served decoding (these graphs under ONNX Runtime, the scheduler) against `generate()`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from export.hf.graphs import ParityCase, to_numpy
from serving.families.modules.blip_decoder import (  # noqa: F401 - the decoder's graphs, traced by the import
    BlipCrossKV,
    BlipDecoderStep,
    decoder_graphs,
    shape_of,
)
from serving.generation.engine import DecoderShape
from serving.generation.params import GenerationDefaults

# generate() options vtfuse reproduces; a checkpoint whose generation config sets any other to a
# non-default value is refused at import (its outputs would differ).
UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "bad_words_ids": None, "forced_bos_token_id": None, "forced_eos_token_id": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "exponential_decay_length_penalty": None, "sequence_bias": None,
    "guidance_scale": None, "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0, "typical_p": 1.0,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None, "top_h": None, "renormalize_logits": False,
    "num_return_sequences": 1, "remove_invalid_values": False, "max_time": None, "stop_strings": None,
    "diversity_penalty": 0.0, "num_beam_groups": 1, "constraints": None, "force_words_ids": None,
    "penalty_alpha": None, "dola_layers": None, "watermarking_config": None, "token_healing": False,
}


def generation_defaults(model: Any) -> GenerationDefaults:
    """The settings `generate()` uses when a caller sets none: the text decoder's generation config + global defaults.

    BLIP's `generate` calls `text_decoder.generate(eos_token_id=sep_token_id, pad_token_id=pad_token_id, …)`,
    starting from the text config's `bos_token_id`.

    Raises:
        ValueError: the generation config sets an option vtfuse does not reproduce (named in the message).
    """
    gc = model.text_decoder.generation_config
    tc = model.config.text_config
    base = dict(gc._get_default_generation_params())
    base.update({k: v for k, v in gc.to_dict().items() if v is not None})
    odd = {k: base.get(k) for k, v in UNSUPPORTED_DEFAULTS.items() if k in base and base.get(k) != v}
    if odd:
        raise ValueError(
            "the checkpoint's generation config sets options vtfuse does not reproduce: "
            + ", ".join(f"{k}={v!r}" for k, v in sorted(odd.items()))
        )
    return GenerationDefaults(
        bos_token_id=int(tc.bos_token_id),
        eos_token_ids=(int(tc.sep_token_id),),
        pad_token_id=int(tc.pad_token_id),
        max_positions=int(tc.max_position_embeddings),
        max_length=int(gc.max_length) if gc.max_length is not None else None,
        max_new_tokens=int(gc.max_new_tokens) if gc.max_new_tokens is not None else None,
        min_length=int(base.get("min_length") or 0),
        min_new_tokens=int(gc.min_new_tokens) if gc.min_new_tokens is not None else None,
        do_sample=bool(base.get("do_sample", False)),
        num_beams=int(base.get("num_beams", 1)),
        temperature=float(base.get("temperature", 1.0)),
        top_k=int(base.get("top_k", 50) or 0),
        top_p=float(base.get("top_p", 1.0)),
        repetition_penalty=float(base.get("repetition_penalty", 1.0)),
        no_repeat_ngram_size=int(base.get("no_repeat_ngram_size", 0) or 0),
        length_penalty=float(base.get("length_penalty", 1.0)),
        early_stopping=base.get("early_stopping", False),
    )


def decoder_parity_cases(
    text_decoder: Any, states: torch.Tensor, states_mask: torch.Tensor, bos: int, vocab: int, note: str,
    seed: int = 11,
) -> list[ParityCase]:
    """Cases for `cross_kv` and `decoder_step` against transformers' own cache and logits.

    `states` (n, S, De) with `states_mask` (n, S): one encoder input per row. Each row feeds a
    random token sequence of its own length through `text_decoder` with `use_cache`; the step case
    then gives each row its cache up to the last token (padded to the longest, masked) and checks
    that token's logits and new K/V. Rows of different lengths exercise the per-row masks.
    """
    rng = random.Random(seed)
    n = states.shape[0]
    lengths = [1 + (i * 3 + rng.randrange(3)) % 6 for i in range(n)]
    cases: list[ParityCase] = []
    cross_expected: dict[str, np.ndarray] = {}
    per_row = []
    with torch.no_grad():
        for i in range(n):
            s = int(states_mask[i].sum())
            seq = torch.tensor([[bos] + [rng.randrange(4, vocab) for _ in range(lengths[i] - 1)]])
            out = text_decoder(
                input_ids=seq, encoder_hidden_states=states[i : i + 1, :s],
                encoder_attention_mask=states_mask[i : i + 1, :s], use_cache=True, return_dict=True,
            )
            cache = out.past_key_values
            per_row.append((seq, out.logits[0, -1], cache, s))
        layers = len(per_row[0][2].self_attention_cache.layers)
        big_s = states.shape[1]
        for li in range(layers):
            for kv in ("K", "V"):
                rows = []
                for _, _, cache, s in per_row:
                    layer = cache.cross_attention_cache.layers[li]
                    t = (layer.keys if kv == "K" else layer.values)[0]  # (nh, s, hs)
                    rows.append(torch.nn.functional.pad(t, (0, 0, 0, big_s - s)))
                cross_expected[f"CROSS_{kv}_{li}"] = to_numpy(torch.stack(rows))
        for i, (_, _, cache, s) in enumerate(per_row):  # cross_kv on each row's real encoder states
            expected_i = {}
            for li in range(layers):
                layer = cache.cross_attention_cache.layers[li]
                expected_i[f"CROSS_K_{li}"], expected_i[f"CROSS_V_{li}"] = to_numpy(layer.keys), to_numpy(layer.values)
            cases.append(ParityCase("cross_kv", {"ENCODER_STATES": states[i : i + 1, :s].numpy().astype(np.float32)},
                                    expected_i, note=f"{note} {i}: cross K/V"))
        p = max(len(seq[0]) for seq, *_ in per_row) - 1
        feed: dict[str, np.ndarray] = {
            "INPUT_IDS": np.array([[int(seq[0, -1])] for seq, *_ in per_row], np.int64),
            "POSITION_IDS": np.array([[len(seq[0]) - 1] for seq, *_ in per_row], np.int64),
            "SELF_MASK": np.zeros((n, p + 1), np.int64),
            "CROSS_MASK": states_mask.numpy().astype(np.int64),
        }
        expected: dict[str, np.ndarray] = {"LOGITS": np.stack([to_numpy(lg) for _, lg, _, _ in per_row])}
        for i, (seq, *_rest) in enumerate(per_row):
            feed["SELF_MASK"][i, : len(seq[0]) - 1] = 1
            feed["SELF_MASK"][i, p] = 1
        for li in range(layers):
            for kv in ("K", "V"):
                past = np.zeros((n, *per_row[0][2].self_attention_cache.layers[li].keys.shape[1:2], p,
                                 per_row[0][2].self_attention_cache.layers[li].keys.shape[-1]), np.float32)
                new = []
                for i, (_, _, cache, _) in enumerate(per_row):
                    layer = cache.self_attention_cache.layers[li]
                    t = (layer.keys if kv == "K" else layer.values)[0]  # (nh, len, hs)
                    m = t.shape[1] - 1
                    past[i, :, :m] = t[:, :m].numpy()
                    new.append(to_numpy(t[:, m : m + 1]))
                feed[f"PAST_{kv}_{li}"] = past
                feed[f"CROSS_{kv}_{li}"] = cross_expected[f"CROSS_{kv}_{li}"].astype(np.float32)
                expected[f"NEW_{kv}_{li}"] = np.stack(new)
        cases.append(ParityCase("decoder_step", feed, expected, note=f"{note}: one step, rows of lengths {lengths}"))
    return cases


def run_served_generation(
    paths: dict[str, Any], shape: DecoderShape, encoder_states: Callable[[int], tuple[np.ndarray, np.ndarray]],
    prompts: list[list[int]], settings: list[Any], threads: int | None = None,
) -> list[list[int]]:
    """Decode every (encoder input, prompt, settings) with the served scheduler over the exported decoder graphs.

    `paths` holds `cross_kv` and `decoder_step` ONNX files; `encoder_states(i)` gives case i's
    states (1, S, De) and mask (S,). All cases run in one scheduler, joined together, as a busy
    server would batch them.
    """
    import shutil
    import tempfile
    from pathlib import Path

    from serving.generation.engine import CROSS_KV_FILE, DECODER_STEP_FILE, OnnxDecoderEngine, write_shape
    from serving.generation.scheduler import DecodeScheduler, GenSequence
    from serving.generation.search import decoder_for

    with tempfile.TemporaryDirectory(prefix="vtfuse-gen-") as tmp:
        folder = Path(tmp)
        shutil.copyfile(paths["cross_kv"], folder / CROSS_KV_FILE)
        shutil.copyfile(paths["decoder_step"], folder / DECODER_STEP_FILE)
        write_shape(folder, shape)
        engine = OnnxDecoderEngine(folder, threads)
        states = [encoder_states(i) for i in range(len(prompts))]
        sched = DecodeScheduler(
            engine, max_rows=64, max_positions=max(s.max_length for s in settings),
            max_cross_len=max(m.shape[0] for _, m in states), memory_budget_bytes=1 << 34, max_waiting=len(prompts),
        )
        results: dict[int, list[int]] = {}
        for i, (prompt, r) in enumerate(zip(prompts, settings)):
            x, mask = states[i]
            sched.submit(GenSequence(i, decoder_for(prompt, r), engine.cross_kv(x), mask.astype(np.int64)))
        while sched.has_work():
            for e in sched.step():
                if e.kind == "done":
                    assert e.result is not None
                    results[e.seq.key] = list(e.result.token_ids)
        return [results[i] for i in range(len(prompts))]
