"""tiny's caption decoder through the export stages: two ONNX graphs, their parity, served captions, `caption/1/`."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.caption import (
    GRAPH_FILES,
    decoder_shape,
    export_decoder,
    generation_spec,
    served_greedy,
    torch_greedy,
)
from export.check import FP32_TOLERANCE, PARITY_FILE, compare, ort_session, run_session
from export.errors import InstallError
from export.evaluate import fresh_render
from export.generate_model import MODEL_PY
from export.install import install
from export.onnx_export import load_source, read_export_info, sha256_file
from export.render_repo import render_repository
from serving.generation.engine import read_shape, step_input_names, step_output_names
from serving.generation.spec import read_spec
from serving.model.config import FusionConfig
from serving.model.preprocess import decode_image
from serving.shapes import world


def test_stage_1_writes_both_graphs_with_the_contract_and_records_them(onnx_dir, tiny):
    info = read_export_info(onnx_dir)
    layers = tiny.config.decoder_layers
    for graph, name in GRAPH_FILES.items():
        assert info["files"][graph]["sha256"] == sha256_file(onnx_dir / name)
        model = onnx.load(str(onnx_dir / name))
        assert model.opset_import[0].version == 17
    step = onnx.load(str(onnx_dir / GRAPH_FILES["decoder_step"]))
    assert [i.name for i in step.graph.input] == step_input_names(layers)
    assert [o.name for o in step.graph.output] == step_output_names(layers)
    past = next(i for i in step.graph.input if i.name == "PAST_K_0").type.tensor_type.shape.dim
    assert (past[0].dim_param, past[2].dim_param) == ("batch", "past")  # rows and cache length are dynamic
    assert len(info["source"]["caption_decoder_safetensors_sha256"]) == 64


def test_stage_2_checks_each_graph_and_the_served_greedy_captions(onnx_dir):
    report = json.loads((onnx_dir / PARITY_FILE).read_text())
    assert report["ok"] is True
    for inputs in ("random", "real"):
        for graph in ("cross_kv", "decoder_step"):
            for out, f in report[inputs][graph].items():
                assert f["ok"] and f["max_abs"] <= FP32_TOLERANCE.atol, (inputs, graph, out, f)
    assert all(f["ok"] for f in report["first_step"]["decoder_step"].values())  # an empty cache
    assert report["caption"]["equal"] == report["caption"]["n"] > 64


def test_decoder_step_runs_any_batch_an_empty_cache_and_another_encoder_length(onnx_dir, tiny):
    """3 rows (traced at 2), past length 0 (traced at 3), 10 encoder positions (traced at 64) with 3 masked."""
    dec = tiny.decoder
    g = torch.Generator().manual_seed(5)
    states = torch.randn(3, 10, tiny.config.dim, generator=g)
    cross_mask = np.ones((3, 10), np.int64)
    cross_mask[1, 7:] = 0
    cross = run_session(ort_session(onnx_dir / GRAPH_FILES["cross_kv"], 1), {"ENCODER_STATES": states.numpy()})
    layers, h, d = tiny.config.decoder_layers, dec.heads, dec.head_dim
    feed = {
        "INPUT_IDS": np.array([[2], [2], [2]], np.int64),
        "POSITION_IDS": np.zeros((3, 1), np.int64),
        "SELF_MASK": np.ones((3, 1), np.int64),
        "CROSS_MASK": cross_mask,
        **{f"PAST_{kv}_{i}": np.zeros((3, h, 0, d), np.float32) for i in range(layers) for kv in "KV"},
        **cross,
    }
    got = run_session(ort_session(onnx_dir / GRAPH_FILES["decoder_step"], 1), feed)
    with torch.no_grad():
        ref, new = dec.step(*(torch.from_numpy(feed[n]) for n in ("INPUT_IDS", "POSITION_IDS", "SELF_MASK",
                                                                   "CROSS_MASK")),
                            [torch.from_numpy(feed[f"PAST_{kv}_{i}"]) for i in range(layers) for kv in "KV"],
                            [torch.from_numpy(cross[f"CROSS_{kv}_{i}"]) for i in range(layers) for kv in "KV"])
    assert got["LOGITS"].shape == (3, tiny.config.vocab_size)
    assert compare(ref.numpy(), got["LOGITS"], FP32_TOLERANCE)["ok"]
    assert compare(new[0].numpy(), got["NEW_K_0"], FP32_TOLERANCE)["ok"]


@pytest.fixture(scope="module")
def trained_graphs(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, dict[str, Path]]:
    """The shipped decoder's two graphs (stage 1's decoder part alone: a second or so)."""
    ckpt = load_source("tiny")
    return ckpt, export_decoder(ckpt, tmp_path_factory.mktemp("trained-decoder"))


def test_served_greedy_captions_of_the_shipped_decoder_equal_pytorch_token_for_token(trained_graphs):
    ckpt, paths = trained_graphs
    rng = random.Random(99)
    scenes = [world.random_scene(rng) for _ in range(80)]  # > the scheduler's 64 rows: later ones reuse rows
    px = np.stack([decode_image(fresh_render(s, rng), 64) for s in scenes])
    with torch.no_grad():
        feats = ckpt.model.encode_image(torch.from_numpy(px))[0].numpy()
    spec = generation_spec(ckpt.tokenizer, ckpt.config)
    served = served_greedy(paths, decoder_shape(ckpt.config), spec.defaults, feats, threads=1)
    assert served == torch_greedy(ckpt, feats)
    texts = [ckpt.tokenizer.decode(ids, skip_special_tokens=True) for ids in served]
    assert len(set(texts)) > 40 and all(ids[-1] == 3 for ids in served)  # each image its own caption, each ended
    assert np.mean([world.caption_matches(t, s) for t, s in zip(texts, scenes)]) >= 0.9


def test_install_writes_the_caption_model(onnx_dir, source_repo, tmp_path, tiny):
    repo = tmp_path / "embedded"
    install(onnx_dir, "embedded", repo=repo, source_repo=source_repo)
    vdir = repo / "caption" / "1"
    assert (vdir / "model.py").read_text() == MODEL_PY
    assert read_shape(vdir) == decoder_shape(tiny.config)
    spec = read_spec(vdir / "checkpoint")
    assert spec == generation_spec(tiny.tokenizer, tiny.config)
    assert (spec.task, spec.image_model, spec.image_output, spec.max_cross_len) == (
        "caption", "image_encoder", "IMAGE_FEATURES", 64)
    d = spec.defaults
    assert (d.bos_token_id, d.eos_token_ids, d.pad_token_id, d.max_positions) == (2, (3,), 0, 24)
    m = json.loads((vdir / "manifest.json").read_text())
    for name, graph in (("cross_kv.onnx", "cross_kv"), ("decoder_step.onnx", "decoder_step")):
        assert m["artefacts"][name] == sha256_file(onnx_dir / name) == sha256_file(vdir / name)
        assert m["parity"]["real"][graph]
    assert m["parity"]["served_greedy_vs_pytorch"]["ok"] is True
    assert (m["precision"], m["image_features_precision"]) == ("fp32", "int8")
    assert m["int8_image_features"]["greedy_agreement"] >= 0.0  # random weights: recorded, judged only if trained
    assert m["config_pbtxt_sha256"] == sha256_file(repo / "caption" / "config.pbtxt")


def test_a_preset_without_a_decoder_gets_no_caption_model(source_repo, tmp_path):
    written = render_repository(tmp_path / "small", FusionConfig.preset("small"), "onnxruntime", source=source_repo)
    assert "caption" not in written and not (tmp_path / "small" / "caption").exists()
    assert "caption" in render_repository(tmp_path / "tiny", FusionConfig.preset("tiny"), "torch", source=source_repo)


def test_install_refuses_a_caption_model_it_cannot_fill(onnx_dir, source_repo, tmp_path):
    stage = tmp_path / "onnx"
    shutil.copytree(onnx_dir, stage)
    parity = json.loads((stage / PARITY_FILE).read_text())
    (stage / PARITY_FILE).write_text(json.dumps({k: v for k, v in parity.items() if k != "caption"}))
    with pytest.raises(InstallError, match="vtfuse export check"):
        install(stage, "onnxruntime", repo=tmp_path / "a", source_repo=source_repo)
    (stage / PARITY_FILE).write_text(json.dumps(parity))
    (stage / GRAPH_FILES["decoder_step"]).unlink()
    with pytest.raises(InstallError, match="vtfuse export onnx"):
        install(stage, "onnxruntime", repo=tmp_path / "b", source_repo=source_repo)
    # A checkpoint of tiny's towers without a decoder, into a repository that has `caption`.
    cfg = json.loads((stage / "checkpoint" / "config.json").read_text())
    (stage / "checkpoint" / "config.json").write_text(json.dumps({**cfg, "decoder_layers": 0}))
    with pytest.raises(InstallError, match="caption"):
        install(stage, "embedded", repo=source_repo, source_repo=source_repo)
