"""The caption decoder's serving split: two ONNX graphs, their checks against PyTorch, and the Triton model `caption`.

For a preset with a caption decoder (`tiny`), each stage of `vtfuse export` does one more thing:

- stage 1 (`export_decoder`): traces `CaptionDecoder.cross_kv` and `CaptionDecoder.step` to
  `cross_kv.onnx` and `decoder_step.onnx` in the tensor contract of `serving.generation.engine`
  (batch, past length and encoder length dynamic; the past length may be 0);
- stage 2 (`check_decoder`): each graph against PyTorch on random and real inputs (image features
  of rendered scenes, a cache from a real greedy decode, rows of different lengths, a first step
  with an empty cache), and greedy captions from the served scheduler over the two graphs against
  the plain PyTorch greedy loop (`CaptionDecoder.greedy`), token for token;
- stage 2b (`int8_caption_agreement`): greedy captions from the int8 `image_encoder`'s features
  against those from the fp32 one (the served features come from int8 by default);
- stage 4 (`install_caption`): `caption/<version>/` with the graphs, decoder.json, model.py,
  `checkpoint/generation.json` and the tokenizer, and a manifest.

The decoder graphs stay fp32 whatever the precision: they are small, and int8 would change tokens.
"""

from __future__ import annotations

import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from tokenizers import Tokenizer
from torch import nn

from export.check import FP32_TOLERANCE, Tolerance, compare, ort_session, run_session
from export.errors import OnnxExportError
from export.evaluate import CAPTION_NEW_TOKENS, fresh_render, special_token_id
from serving.generation.engine import (
    CROSS_KV_FILE,
    DECODER_STEP_FILE,
    DecoderShape,
    cross_names,
    new_names,
    past_names,
    step_input_names,
    step_output_names,
)
from serving.generation.params import GenerationDefaults, GenerationParams, resolve
from serving.generation.spec import GenerationSpec
from serving.model.checkpoint import Checkpoint
from serving.model.config import FusionConfig
from serving.model.model import CaptionDecoder
from serving.model.preprocess import decode_image
from serving.model.tokenizer import CLS, PAD, SEP
from serving.shapes import world

CAPTION_MODEL = "caption"
GRAPHS = ("cross_kv", "decoder_step")
GRAPH_FILES = {"cross_kv": CROSS_KV_FILE, "decoder_step": DECODER_STEP_FILE}


class CrossKVGraph(nn.Module):
    """ENCODER_STATES (n, S, D) → CROSS_K_l, CROSS_V_l (n, heads, S, head_dim) of every decoder layer."""

    def __init__(self, decoder: CaptionDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.decoder.cross_kv(states))


class DecoderStepGraph(nn.Module):
    """INPUT_IDS, POSITION_IDS, SELF_MASK, CROSS_MASK, PAST_*, CROSS_* → LOGITS, NEW_* (`CaptionDecoder.step`)."""

    def __init__(self, decoder: CaptionDecoder) -> None:
        super().__init__()
        self.decoder = decoder
        self.n = 2 * len(decoder.layers)

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, self_mask: torch.Tensor, cross_mask: torch.Tensor,
        *kv: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        logits, new = self.decoder.step(ids, positions, self_mask, cross_mask, list(kv[: self.n]), list(kv[self.n :]))
        return (logits, *new)


def decoder_shape(cfg: FusionConfig) -> DecoderShape:
    """The sizes the scheduler allocates caches for (decoder.json)."""
    return DecoderShape(
        layers=cfg.decoder_layers,
        heads=cfg.decoder_heads,
        head_dim=cfg.decoder_dim // cfg.decoder_heads,
        vocab=cfg.vocab_size,
        encoder_dim=cfg.dim,
    )


def generation_defaults(tokenizer: Tokenizer, cfg: FusionConfig) -> GenerationDefaults:
    """Start from [CLS], stop at [SEP]; greedy, 20 new tokens (transformers' default), ≤ `max_text_len` positions."""
    return GenerationDefaults(
        bos_token_id=special_token_id(tokenizer, CLS),
        eos_token_ids=(special_token_id(tokenizer, SEP),),
        pad_token_id=special_token_id(tokenizer, PAD),
        max_positions=cfg.max_text_len,
    )


def generation_spec(tokenizer: Tokenizer, cfg: FusionConfig) -> GenerationSpec:
    """What the Triton `caption` model runs with: features from `image_encoder`, the native square resize."""
    return GenerationSpec(
        task="caption",
        defaults=generation_defaults(tokenizer, cfg),
        image_model="image_encoder",
        image_output="IMAGE_FEATURES",
        max_prompt_tokens=cfg.max_text_len,
        max_cross_len=cfg.num_patches,
        clean_up_spaces=False,  # a word-level tokenizer: its decode already spaces words
        image={"mode": "native", "size": cfg.image_size},
    )


def _decoder(ckpt: Checkpoint) -> CaptionDecoder:
    if ckpt.decoder is None:
        raise OnnxExportError(
            f"{ckpt.config.name}: the config has a caption decoder but the checkpoint holds no weights for it"
        )
    return ckpt.decoder.eval()


def _examples(cfg: FusionConfig, batch: int = 2, past: int = 3) -> dict[str, tuple[torch.Tensor, ...]]:
    """Tracing inputs: rows of different lengths (values do not matter to a traced graph)."""
    shape = decoder_shape(cfg)
    h, d, s = shape.heads, shape.head_dim, cfg.num_patches
    g = torch.Generator().manual_seed(0)
    step = (
        torch.randint(4, cfg.vocab_size, (batch, 1), generator=g),
        torch.tensor([[past]] * batch),
        torch.ones(batch, past + 1, dtype=torch.long),
        torch.ones(batch, s, dtype=torch.long),
        *[torch.randn(batch, h, past, d, generator=g) for _ in range(2 * shape.layers)],
        *[torch.randn(batch, h, s, d, generator=g) for _ in range(2 * shape.layers)],
    )
    return {"cross_kv": (torch.randn(batch, s, cfg.dim, generator=g),), "decoder_step": step}


def _dynamic_axes(layers: int) -> dict[str, dict[str, dict[int, str]]]:
    """Rows, cache length and encoder length are dynamic (any batch, any step, any image length)."""
    cross = {n: {0: "batch", 2: "encoder"} for n in cross_names(layers)}
    step = {
        "INPUT_IDS": {0: "batch"},
        "POSITION_IDS": {0: "batch"},
        "SELF_MASK": {0: "batch", 1: "past_plus_one"},
        "CROSS_MASK": {0: "batch", 1: "encoder"},
        **{n: {0: "batch", 2: "past"} for n in past_names(layers)},
        **cross,
        "LOGITS": {0: "batch"},
        **{n: {0: "batch"} for n in new_names(layers)},
    }
    return {"cross_kv": {"ENCODER_STATES": {0: "batch", 1: "encoder"}, **cross}, "decoder_step": step}


def export_decoder(ckpt: Checkpoint, out_dir: str | Path, opset: int = 17) -> dict[str, Path]:
    """Trace `cross_kv.onnx` and `decoder_step.onnx` into `out_dir` (TorchScript exporter) and check them.

    Raises:
        OnnxExportError: the checkpoint has no decoder weights, or the ONNX checker refused a graph.
    """
    decoder = _decoder(ckpt)
    cfg = ckpt.config
    layers = cfg.decoder_layers
    modules: dict[str, nn.Module] = {"cross_kv": CrossKVGraph(decoder), "decoder_step": DecoderStepGraph(decoder)}
    names = {
        "cross_kv": (["ENCODER_STATES"], cross_names(layers)),
        "decoder_step": (step_input_names(layers), step_output_names(layers)),
    }
    examples, axes = _examples(cfg), _dynamic_axes(layers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for graph in GRAPHS:
        path = out / GRAPH_FILES[graph]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter says it is deprecated
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                modules[graph].eval(), examples[graph], str(path),
                input_names=names[graph][0], output_names=names[graph][1], dynamic_axes=axes[graph],
                opset_version=opset, do_constant_folding=True, dynamo=False,
            )
        model = onnx.load(str(path))
        try:
            onnx.checker.check_model(model, full_check=True)
        except onnx.checker.ValidationError as e:
            raise OnnxExportError(f"{graph}: the ONNX checker refused the exported graph: {e}") from e
        model.doc_string = f"vtfuse {graph} ({cfg.name} caption decoder): tensors of serving/generation/engine.py"
        onnx.save(model, str(path))
        paths[graph] = path
    return paths


# -- stage 2: parity ---------------------------------------------------------------------------


@torch.no_grad()
def _torch_graph(decoder: CaptionDecoder, graph: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    layers = len(decoder.layers)
    if graph == "cross_kv":
        outs = CrossKVGraph(decoder)(torch.from_numpy(feed["ENCODER_STATES"]))
        return dict(zip(cross_names(layers), (o.numpy() for o in outs)))
    args = [torch.from_numpy(feed[n]) for n in step_input_names(layers)]
    outs = DecoderStepGraph(decoder)(*args)
    return dict(zip(step_output_names(layers), (o.numpy() for o in outs)))


def _step_feed(
    decoder: CaptionDecoder, states: np.ndarray, rows: list[list[int]]
) -> dict[str, np.ndarray]:
    """One decoder step for rows with caches of their own lengths (`rows[i]` = the tokens fed so far, ≥ 1).

    Each row's cache is computed by PyTorch (teacher forcing); the step feeds its last token. The
    cache is padded to the longest row and masked, as the scheduler batches rows. Rows with a
    single token have no cache: with every row so, the past length is 0 (a batch's first step).
    """
    layers = len(decoder.layers)
    n, s = states.shape[0], states.shape[1]
    p = max(len(r) for r in rows) - 1
    h, d = decoder.heads, decoder.head_dim
    feed: dict[str, np.ndarray] = {
        "INPUT_IDS": np.array([[r[-1]] for r in rows], np.int64),
        "POSITION_IDS": np.array([[len(r) - 1] for r in rows], np.int64),
        "SELF_MASK": np.zeros((n, p + 1), np.int64),
        "CROSS_MASK": np.ones((n, s), np.int64),
    }
    past = {name: np.zeros((n, h, p, d), np.float32) for name in past_names(layers)}
    with torch.no_grad():
        cross = decoder.cross_kv(torch.from_numpy(states))
        for i, r in enumerate(rows):
            m = len(r) - 1
            feed["SELF_MASK"][i, :m] = 1
            feed["SELF_MASK"][i, p] = 1
            if m == 0:
                continue
            ids = torch.tensor([r[:-1]])
            causal = torch.ones(1, m, m, dtype=torch.bool).tril()
            empty = [torch.zeros(1, h, 0, d)] * (2 * layers)
            row_cross = [c[i : i + 1] for c in cross]
            _, kv = decoder.decode(ids, torch.arange(m)[None], causal, torch.ones(1, s, dtype=torch.bool), empty,
                                   row_cross)
            for name, t in zip(past_names(layers), kv):
                past[name][i, :, :m] = t[0].numpy()
    feed.update(past)
    feed.update({name: c.numpy() for name, c in zip(cross_names(layers), cross)})
    return feed


def real_states(ckpt: Checkpoint, n: int, seed: int) -> tuple[np.ndarray, list[world.Scene]]:
    """PyTorch image features (n, P, D) of `n` fresh renders (decoded by the serving path), and their scenes."""
    rng = random.Random(seed)
    scenes = [world.random_scene(rng) for _ in range(n)]
    px = np.stack([decode_image(fresh_render(s, rng), ckpt.config.image_size) for s in scenes])
    with torch.no_grad():
        feats = ckpt.model.encode_image(torch.from_numpy(px))[0].numpy()
    return feats, scenes


def served_greedy(
    paths: dict[str, Path], shape: DecoderShape, defaults: GenerationDefaults, states: np.ndarray,
    threads: int | None = None,
) -> list[list[int]]:
    """Greedy captions (token ids) from the served scheduler over the two ONNX graphs, every row batched together."""
    from export.hf.blip_decoder import run_served_generation

    settings = [resolve(GenerationParams(), defaults, 1) for _ in range(len(states))]
    mask = np.ones(states.shape[1], np.int64)
    return run_served_generation(
        {g: str(p) for g, p in paths.items()}, shape, lambda i: (states[i : i + 1], mask),
        [[defaults.bos_token_id] for _ in range(len(states))], settings, threads,
    )


def torch_greedy(ckpt: Checkpoint, states: np.ndarray) -> list[list[int]]:
    """The plain PyTorch greedy loop (no cache: the whole sequence re-run every step) on image features."""
    d = generation_defaults(ckpt.tokenizer, ckpt.config)
    return _decoder(ckpt).greedy(torch.from_numpy(states), d.bos_token_id, d.eos_token_ids[0], CAPTION_NEW_TOKENS)


def check_decoder(
    ckpt: Checkpoint,
    onnx_dir: str | Path,
    *,
    batch: int = 5,
    n_real: int = 8,
    n_generate: int = 80,
    seed: int = 0,
    tolerance: Tolerance = FP32_TOLERANCE,
    threads: int | None = None,
) -> dict[str, Any]:
    """Parity of the two decoder graphs with PyTorch, and of served greedy captions with the plain PyTorch loop.

    `n_generate` exceeds the served scheduler's 64 rows, so later captions join as earlier ones
    leave and decode in reused cache rows (whose masked positions hold stale or uninitialised memory).

    Returns:
        {"random": {graph: {output: figures}}, "real": {...}, "first_step": {...}, "generation": {...}};
        `generation` holds `n`, `equal` (captions equal token for token) and `agreement`.
    """
    decoder = _decoder(ckpt)
    cfg = ckpt.config
    paths = {g: Path(onnx_dir) / GRAPH_FILES[g] for g in GRAPHS}
    sessions = {g: ort_session(p, threads) for g, p in paths.items()}
    rng = np.random.default_rng(seed)
    report: dict[str, Any] = {"random": {}, "real": {}}

    def measure(graph: str, feed: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
        ref, got = _torch_graph(decoder, graph, feed), run_session(sessions[graph], feed)
        return {name: compare(ref[name], got[name], tolerance) for name in ref}

    # Random: unit-normal features (the tower's final LayerNorm scale), random tokens and lengths.
    states = rng.standard_normal((batch, cfg.num_patches, cfg.dim)).astype(np.float32)
    rows = [[int(t) for t in rng.integers(4, cfg.vocab_size, size=int(k))] for k in rng.integers(1, 12, size=batch)]
    report["random"]["cross_kv"] = measure("cross_kv", {"ENCODER_STATES": states})
    report["random"]["decoder_step"] = measure("decoder_step", _step_feed(decoder, states, rows))

    # Real: rendered scenes' features; each row's cache from its own greedy caption, cut at a different length.
    feats, _ = real_states(ckpt, n_real, seed)
    captions = torch_greedy(ckpt, feats)
    cut = [c[: 1 + (i * 5) % len(c)] for i, c in enumerate(captions)]  # row 0 has no cache, the others do
    report["real"]["cross_kv"] = measure("cross_kv", {"ENCODER_STATES": feats})
    report["real"]["decoder_step"] = measure("decoder_step", _step_feed(decoder, feats, cut))
    # A batch's first step: every row at position 0, an empty cache (past length 0).
    first = _step_feed(decoder, feats, [[c[0]] for c in captions])
    report["first_step"] = {"decoder_step": measure("decoder_step", first)}

    gen_states, _ = real_states(ckpt, n_generate, seed + 1)
    reference = torch_greedy(ckpt, gen_states)
    served = served_greedy(paths, decoder_shape(cfg), generation_defaults(ckpt.tokenizer, cfg), gen_states, threads)
    equal = sum(a == b for a, b in zip(reference, served))
    report["generation"] = {
        "n": n_generate,
        "equal": equal,
        "agreement": equal / n_generate,
        "reference": "CaptionDecoder.greedy (PyTorch, no cache) vs the DecodeScheduler over cross_kv.onnx + "
        "decoder_step.onnx, greedy, 20 new tokens",
        "ok": equal == n_generate,
    }
    return report


def failures(report: dict[str, Any]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(input set, graph, output, figures) of every output out of tolerance."""
    return [
        (s, g, o, f)
        for s in ("random", "real", "first_step")
        for g, outs in report.get(s, {}).items()
        for o, f in outs.items()
        if not f["ok"]
    ]


# -- stage 2b: int8 image features ---------------------------------------------------------------


def int8_caption_agreement(onnx_dir: str | Path, images: list[bytes], threads: int | None = None) -> dict[str, Any]:
    """Greedy captions from the int8 `image_encoder`'s features against those from the fp32 one, same decoder graphs.

    Also the share of each that names the scene's objects is for the caller (it has the scenes).
    """
    from export.quantize import INT8_DIR

    onnx_dir = Path(onnx_dir)
    tokenizer, cfg = checkpoint_files(onnx_dir)
    defaults = generation_defaults(tokenizer, cfg)
    shape = decoder_shape(cfg)
    px = np.stack([decode_image(b, cfg.image_size) for b in images])
    paths = {g: onnx_dir / GRAPH_FILES[g] for g in GRAPHS}
    out: dict[str, list[list[int]]] = {}
    for precision, path in (("fp32", onnx_dir / "image_encoder.onnx"),
                            ("int8", onnx_dir / INT8_DIR / "image_encoder.onnx")):
        feats = run_session(ort_session(path, threads), {"PIXELS": px})["IMAGE_FEATURES"]
        out[precision] = served_greedy(paths, shape, defaults, feats, threads)
    equal = sum(a == b for a, b in zip(out["fp32"], out["int8"]))
    return {"n": len(images), "equal": equal, "agreement": equal / max(len(images), 1), "tokens": out}


def checkpoint_files(onnx_dir: str | Path) -> tuple[Tokenizer, FusionConfig]:
    """The tokenizer and config a stage-1 folder's `checkpoint/` holds."""
    folder = Path(onnx_dir) / "checkpoint"
    return Tokenizer.from_file(str(folder / "tokenizer.json")), FusionConfig.from_json(folder / "config.json")


# -- stage 4: install ---------------------------------------------------------------------------


def has_caption_graphs(onnx_dir: str | Path) -> bool:
    """Whether a stage-1 folder holds the two decoder graphs."""
    return all((Path(onnx_dir) / f).exists() for f in GRAPH_FILES.values())


def install_caption(onnx_dir: Path, vdir: Path) -> list[Path]:
    """`caption/<version>/`: the graphs (fp32), decoder.json, model.py, checkpoint/{generation,tokenizer}.json.

    Returns the files installed (for the manifest).
    """
    from export.generate_model import write_version_folder

    tokenizer, cfg = checkpoint_files(onnx_dir)
    spec = generation_spec(tokenizer, cfg)

    for name in (CROSS_KV_FILE, DECODER_STEP_FILE, "decoder.json", "manifest.json"):
        (vdir / name).unlink(missing_ok=True)
    if (vdir / "checkpoint").exists():
        shutil.rmtree(vdir / "checkpoint")
    write_version_folder(vdir, onnx_dir / CROSS_KV_FILE, onnx_dir / DECODER_STEP_FILE, decoder_shape(cfg), spec,
                         onnx_dir / "checkpoint" / "tokenizer.json")
    return sorted(p for p in vdir.rglob("*") if p.is_file() and p.name != "model.py" and "__pycache__" not in p.parts)
