"""loadtests.blip_bench without servers or checkpoints: captions, requests, ratio, top-index comparison, summary."""

from __future__ import annotations

import base64
import io
import random
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from loadtests import blip_bench as bb
from serving.shapes import world


def test_padded_vocab_keeps_words_first_and_fills_to_size():
    v = bb.padded_vocab(["[PAD]", "a", "b"], 6)
    assert v == ["[PAD]", "a", "b", "[unused0]", "[unused1]", "[unused2]"]
    assert len(set(bb.padded_vocab(["x"] * 1, 30524))) == 30524
    with pytest.raises(ValueError):
        bb.padded_vocab(["a", "b"], 1)


def test_captions_are_distinct_shapes_world_sentences_with_the_true_one_marked():
    rng = random.Random(3)
    scene = world.random_scene(rng)
    texts, true = bb.captions_for(scene, rng, 64)
    assert len(texts) == 64 and len(set(texts)) == 64
    assert sorted(texts[true].split(" and ")) == sorted(f"a {c} {s}" for c, s in world.scene_items(scene))
    words = {"a", "and", *world.COLOR_NAMES, *world.SHAPES}
    assert all(set(t.split()) <= words for t in texts)


def test_make_requests_is_deterministic_and_speaks_the_retrieve_api():
    a = bb.make_requests(2, seed=5, captions=64, top_k=5, side=96, model="blip-base")
    b = bb.make_requests(2, seed=5, captions=64, top_k=5, side=96, model="blip-base")
    assert [r.body for r in a] == [r.body for r in b]
    assert a[0].body != a[1].body
    body = a[0].body
    assert set(body) == {"model", "image", "texts", "top_k"}
    assert body["model"] == "blip-base" and body["top_k"] == 5 and len(body["texts"]) == 64
    img = Image.open(io.BytesIO(base64.b64decode(body["image"])))
    assert img.format == "PNG" and img.size == (96, 96)


def test_ratio_and_p50():
    assert bb.p50([3.0, 1.0, 2.0]) == 2.0
    assert bb.p50([]) is None
    assert bb.ratio(1000.0, 100.0) == 10.0
    assert bb.ratio(None, 100.0) is None and bb.ratio(100.0, None) is None and bb.ratio(100.0, 0.0) is None


def test_efficiency_is_achieved_flops_over_the_ceiling():
    assert bb.efficiency(10.0, 1e9, 100e9) == pytest.approx(0.1)


def test_requests_within_a_budget_never_below_one():
    assert bb.requests_within(540, 100, 3) == 3
    assert bb.requests_within(540, 200, 3) == 2
    assert bb.requests_within(540, 900, 3) == 1
    assert bb.requests_within(540, 0, 3) == 3


def _res(*pairs):
    return [{"index": i, "score": s, "text": str(i)} for i, s in pairs]


def test_compare_tops_counts_agreement_and_explains_it_by_the_shortlist():
    served = [_res((4, 0.9), (2, 0.8)), _res((1, 0.7), (3, 0.6))]
    naive = [_res((4, 0.9), (7, 0.85)), _res((9, 0.95), (1, 0.7))]
    out = bb.compare_tops(served, naive, shortlists=[[4, 2, 7], [1, 3]])
    assert out["same_top"] == 1 and out["compared"] == 2 and not out["all_same_top"]
    first, second = out["requests"]
    assert first["same_top"] and first["naive_top_in_shortlist"]
    assert not second["same_top"] and not second["naive_top_in_shortlist"]
    assert second["common_in_top_k"] == 1 and second["common_score_max_abs_diff"] == pytest.approx(0.0)
    assert out["differences_explained_by_shortlist"]
    # A naive top inside the shortlist that the served answer missed is not explained.
    bad = bb.compare_tops(served[1:], naive[1:], shortlists=[[9, 1, 3]])
    assert bad["differences_explained_by_shortlist"] is False


def test_compare_tops_without_shortlists():
    out = bb.compare_tops([_res((1, 0.5))], [_res((1, 0.5))])
    assert out["all_same_top"] and "differences_explained_by_shortlist" not in out


def test_summary_reports_the_image_encoder_headline_and_the_ratio():
    s = bb.BlipBenchSettings.quick_run()
    rows = [
        {"engine": "image_encoder", "batch": 1, "efficiency": 0.5},
        {"engine": "image_encoder", "batch": 8, "efficiency": 0.7},
        {"engine": "fusion", "batch": 16, "efficiency": 0.9},
    ]
    top = bb.compare_tops([_res((1, 0.5))], [_res((1, 0.5))])
    raw = {
        "engines": {"rows": rows, "ceiling": {"flops_per_s": 1e11}},
        "latency": {"served": {"p50_ms": 200.0}, "naive": {"p50_ms": 1500.0}, "top_index": top},
    }
    out = bb.summarize(raw, s, "cmd", time.time(), {}, {"engines": 1.0})
    assert out["blip_engine_efficiency"] == 0.7
    assert out["blip_engine_efficiency_detail"]["headline"] == "image_encoder at batch 8"
    assert out["blip_retrieve64_vs_naive"] == 7.5
    assert out["blip_retrieve64_vs_naive_detail"]["reached"] is True
    assert out["blip_retrieve64_same_top"] == "1/1"
    assert out["command"] == "cmd" and out["settings"]["quick"] is True and out["settings"]["shortlist"] == 16
    assert {"commit", "machine", "versions", "stage_seconds", "errors"} <= set(out)


def test_summary_with_failed_stages_has_nulls():
    out = bb.summarize({}, bb.BlipBenchSettings(), "cmd", time.time(), {"served": "boom"}, {})
    assert out["blip_engine_efficiency"] is None and out["blip_retrieve64_vs_naive"] is None
    assert out["blip_retrieve64_vs_naive_detail"]["reached"] is None and out["errors"] == {"served": "boom"}


def test_fix_dims_makes_flops_countable_for_token_axes(tmp_path):
    # (B, L, 8) @ (8, 4): with L dynamic count_graph cannot size it; fixed, it counts B·L·4·8 MACs.
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", "tokens", 8])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", "tokens", 4])
    w = helper.make_tensor("W", TensorProto.FLOAT, [8, 4], np.zeros(32, dtype=np.float32).tolist())
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "g", [x], [y], [w])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    res = bb.count_flops(path, {"X": [3, 5, 8]})
    assert res["macs"]["MatMul"] == 3 * 5 * 4 * 8
    assert res["flops_per_item"] == 2 * 5 * 4 * 8
    with pytest.raises(ValueError):
        bb.fix_dims(onnx.load(str(path)), {"X": [3, 5]})


def test_quick_settings_stay_out_of_the_full_size_paths():
    full, quick = bb.BlipBenchSettings(), bb.BlipBenchSettings.quick_run()
    assert full.checkpoint.name == "blip-base-random" and full.repository.name == "model_repository-blip"
    assert full.work_dir.name == "blip-bench-onnx"
    assert {quick.checkpoint, quick.repository, quick.work_dir}.isdisjoint({full.checkpoint, full.repository,
                                                                             full.work_dir})
    assert full.captions == 64 and full.top_k == 5 and full.fusion_batch == 16 and full.fusion_tokens == 35
    assert full.image_batches == (1, 8) and full.naive_workers == 2 and full.naive_threads == 1


def test_per_question_cost_is_the_latency_slope():
    from loadtests.vilt_questions import per_question

    assert abs(per_question({1: 0.5, 2: 0.75, 4: 1.25, 8: 2.25}) - 0.25) < 1e-12
    assert abs(per_question({1: 0.1, 2: 0.1, 4: 0.1, 8: 0.1})) < 1e-12
