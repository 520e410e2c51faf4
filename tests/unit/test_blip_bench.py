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


# -- shortlist 16 against the exact ranking; /v1/match's tensor payload before and after NAME_itm -----------------

def test_topk_agreement_counts_same_order_overlap_and_top1():
    exact = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [9, 8, 7, 6, 5], [0, 1, 2, 3, 4]]
    approx = [[1, 2, 3, 4, 5], [1, 2, 3, 5, 4], [8, 9, 7, 6, 10], [10, 11, 12, 13, 14]]
    out = bb.topk_agreement(approx, exact, k=5)
    assert out["compared"] == 4 and out["k"] == 5
    assert out["same_order"] == 1 and out["same_order_share"] == 0.25  # a swap inside the top 5 is not the same order
    assert [r["overlap"] for r in out["requests"]] == [5, 5, 4, 0]
    assert out["mean_overlap"] == pytest.approx(3.5) and out["mean_overlap_share"] == pytest.approx(0.7)
    assert out["same_top1"] == 2 and out["same_top1_share"] == 0.5


def test_topk_agreement_looks_at_the_first_k_only_and_handles_no_requests():
    out = bb.topk_agreement([[1, 2, 9]], [[1, 2, 8]], k=2)
    assert out["same_order"] == 1 and out["mean_overlap_share"] == 1.0
    empty = bb.topk_agreement([], [], k=5)
    assert empty["compared"] == 0 and empty["same_order_share"] is None and empty["mean_overlap"] is None


def test_top_indices_reads_the_ranked_results():
    assert bb.top_indices([_res((4, 0.9), (2, 0.8)), []]) == [[4, 2], []]


def test_payload_is_the_nbytes_of_every_input_and_output():
    feed = {"PIXELS": np.zeros((1, 4, 4, 3), np.uint8), "IDS": np.zeros((2, 16), np.int64)}
    out = {"LOGITS": np.zeros((2, 2), np.float32)}
    assert bb.tensor_bytes(feed) == 48 + 256 and bb.tensor_bytes(out) == 16
    assert bb.payload([(feed, out)]) == {"calls": 1, "sent": 304, "received": 16, "total": 320}
    assert bb.payload([]) == {"calls": 0, "sent": 0, "received": 0, "total": 0}
    # A row slice counts its own rows only (what the gRPC client serializes of it).
    assert bb.tensor_bytes({"IDS": feed["IDS"][:1]}) == 128


def test_fusion_feeds_repeat_the_image_features_per_row_in_engine_sized_requests():
    feats = np.arange(6, dtype=np.float32).reshape(1, 3, 2)
    ids = np.arange(10 * 4, dtype=np.int64).reshape(10, 4)
    mask = np.ones((10, 4), np.int64)
    feeds = bb.fusion_feeds(feats, ids, mask, max_rows=4)
    assert [f["IMAGE_FEATURES"].shape[0] for f in feeds] == [4, 4, 2]
    assert all((f["IMAGE_FEATURES"] == feats[0]).all() for f in feeds)
    assert np.array_equal(np.concatenate([f["INPUT_IDS"] for f in feeds]), ids)
    # One request when the rows fit; features given per row are not repeated again.
    one = bb.fusion_feeds(np.repeat(feats, 10, axis=0), ids, mask, max_rows=64)
    assert len(one) == 1 and one[0]["IMAGE_FEATURES"].shape == (10, 3, 2)


def _blip_base_match(texts=64, tokens=32):
    """The tensors of one BLIP-base /v1/match (384 px, 577 × 768 image features), zeros."""
    t = bb.AppTensors(np.zeros((1, 384, 384, 3), np.uint8), np.zeros((texts, tokens), np.int64),
                      np.ones((texts, tokens), np.int64))
    return t, np.zeros((1, 577, 768), np.float32)


class _FakeTriton:
    """TritonClient.infer's shape: records each call, answers zeros of the BLIP-base output shapes."""

    def __init__(self, features):
        self.features, self.calls = features, []

    async def infer(self, model, inputs, outputs, *, deadline):
        self.calls.append((model, {k: v.shape for k, v in inputs.items()}, list(outputs)))
        if outputs == ["IMAGE_FEATURES"]:
            return {"IMAGE_FEATURES": self.features}
        return {"ITM_LOGITS": np.zeros((inputs["INPUT_IDS"].shape[0], 2), np.float32)}


ENGINES = {"itm": "b_itm", "image_encoder": "b_image_encoder", "fusion": "b_fusion"}


def test_match_after_sends_the_pixels_once_and_the_token_rows():
    import asyncio

    t, feats = _blip_base_match()
    client = _FakeTriton(feats)
    logits, calls = asyncio.run(bb.match_after(client, ENGINES, t, 10.0))
    assert logits.shape == (64, 2)
    assert client.calls == [("b_itm", {"PIXELS": (1, 384, 384, 3), "INPUT_IDS": (64, 32), "ATTENTION_MASK": (64, 32)},
                             ["ITM_LOGITS"])]
    pay = bb.payload(calls)
    assert pay["sent"] == 384 * 384 * 3 + 2 * 64 * 32 * 8 and pay["received"] == 64 * 2 * 4
    assert pay["total"] == 475_648


def test_match_before_repeats_the_features_for_every_text_as_the_old_pipeline():
    import asyncio

    t, feats = _blip_base_match()
    client = _FakeTriton(feats)
    logits, calls = asyncio.run(bb.match_before(client, ENGINES, t, 64, 10.0))
    assert logits.shape == (64, 2)
    assert client.calls[0] == ("b_image_encoder", {"PIXELS": (1, 384, 384, 3)}, ["IMAGE_FEATURES"])
    assert client.calls[1] == ("b_fusion", {"IMAGE_FEATURES": (64, 577, 768), "INPUT_IDS": (64, 32),
                                            "ATTENTION_MASK": (64, 32)}, ["ITM_LOGITS"])
    pay = bb.payload(calls)
    features = 577 * 768 * 4
    assert pay["calls"] == 2
    assert pay["sent"] == 384 * 384 * 3 + 64 * features + 2 * 64 * 32 * 8  # 113.4 MB of them the repeated features
    assert pay["received"] == features + 64 * 2 * 4
    # Fusion requests of 16 rows: the same bytes over 5 calls.
    client16 = _FakeTriton(feats)
    _, calls16 = asyncio.run(bb.match_before(client16, ENGINES, t, 16, 10.0))
    assert bb.payload(calls16) == pay | {"calls": 5}


def test_itm_probability_is_the_softmax_match_column():
    p = bb.itm_probability(np.array([[0.0, 0.0], [0.0, np.log(3.0)]], np.float32))
    assert p == pytest.approx([0.5, 0.75])


def test_match_and_shortlist_bodies():
    r = bb.make_requests(1, seed=1, captions=8, top_k=5, side=32, model="m")[0]
    assert set(bb.as_match(r).body) == {"model", "image", "texts"}
    assert bb.with_shortlist(r, None) is r
    assert bb.with_shortlist(r, "all").body == r.body | {"shortlist": "all"} and "shortlist" not in r.body


def test_compare_needs_both_sides_of_each_comparison():
    s16 = [_res((1, 0.9), (2, 0.8)), _res((3, 0.7), (4, 0.6))]
    sall = [_res((1, 0.9), (2, 0.8)), _res((5, 0.75), (3, 0.7))]
    assert bb.compare({"served": {"results": s16}}, None, 2) == {}
    out = bb.compare({"served": {"results": s16}, "served_all": {"results": sall}}, None, 2)
    assert set(out) == {"shortlist_agreement"} and out["shortlist_agreement"]["same_order"] == 1
    out = bb.compare({"served": {"results": s16}, "served_all": {"results": sall}, "naive": {"results": sall}},
                     [[1, 2], [3, 4]], 2)
    assert set(out) == {"shortlist_agreement", "top_index", "top_index_all"}
    assert out["top_index_all"]["all_same_top"] and out["top_index"]["differences_explained_by_shortlist"]


def _full_raw():
    s16 = [_res((1, 0.9), (2, 0.8), (3, 0.7), (4, 0.6), (5, 0.5))]
    sall = [_res((1, 0.9), (2, 0.8), (3, 0.7), (5, 0.5), (9, 0.45))]
    lat = {
        "served": {"p50_ms": 9000.0, "requests_run": 1, "results": s16,
                   "match_app": {"p50_ms": 14000.0, "scores": [[0.1] * 64]}},
        "served_all": {"p50_ms": 18000.0, "requests_run": 1, "results": sall},
        "naive": {"p50_ms": 180000.0, "requests_run": 1, "results": sall, "torch_threads": 1},
    }
    lat |= bb.compare(lat, [[1, 2, 3, 4, 5, 6]], 5)
    pay_after = {"calls": 1, "sent": 475_136, "received": 512, "total": 475_648}
    pay_before = {"calls": 2, "sent": 114_000_000, "received": 1_800_000, "total": 115_800_000}
    match = {"after": {"p50_ms": 13000.0, "payload": pay_after, "requests_run": 1},
             "before": {"p50_ms": 15600.0, "payload": pay_before, "requests_run": 1},
             "probabilities_after": [np.zeros(64)], "app_p50_ms": 14000.0, "itm_probability_max_abs_diff": 1e-7,
             "foreign_cpu_share": 0.01}
    return {"latency": lat, "match": match}


def test_summary_reports_both_shortlists_their_agreement_and_the_match_wire():
    out = bb.summarize(_full_raw(), bb.BlipBenchSettings(), "cmd", time.time(), {}, {})
    assert out["blip_retrieve64_vs_naive"] == 20.0 and out["blip_retrieve64_all_vs_naive"] == 10.0
    assert out["blip_retrieve64_top5_same_order"] == 0.0
    assert out["blip_retrieve64_top5_overlap"] == 0.8 and out["blip_retrieve64_top1_agreement"] == 1.0
    assert out["blip_match64_before_over_after"] == 1.2
    assert out["blip_match64_after_mb"] == 0.476 and out["blip_match64_before_mb"] == 115.8
    d = out["blip_retrieve64_vs_naive_detail"]
    assert d["served_all_p50_ms"] == 18000.0 and d["top_index_all"]["all_same_top"]
    # Per-request answers stay out of summary.json (the comparisons keep what matters of them).
    assert "results" not in d["served"] and "scores" not in d["served"]["match_app"]
    assert "probabilities_after" not in out["blip_match64_detail"]
    import json

    json.dumps(out)  # everything in it is JSON


def test_summary_without_the_new_stages_has_nulls():
    out = bb.summarize({}, bb.BlipBenchSettings(), "cmd", time.time(), {}, {})
    for key in ("blip_retrieve64_all_vs_naive", "blip_retrieve64_top5_same_order", "blip_retrieve64_top5_overlap",
                "blip_retrieve64_top1_agreement", "blip_match64_before_over_after", "blip_match64_after_mb",
                "blip_match64_before_mb", "blip_retrieve64_shortlist_detail", "blip_match64_detail"):
        assert out[key] is None


def test_full_settings_time_at_least_ten_requests_a_side():
    full = bb.BlipBenchSettings()
    assert full.requests >= 10 and full.match_requests >= 10 and full.match_texts == 64
    # The naive budget leaves room for them at the ~182 s a request it measured (warm-up ~200 s).
    assert bb.requests_within(full.naive_budget_s, 201.6, full.requests) == full.requests


# -- loadtests.report: the BLIP figures in summary.json and the README's figures table -----------------------------

def _blip_summary():
    out = bb.summarize(_full_raw(), bb.BlipBenchSettings(), "cmd", time.time(), {}, {})
    return out | {"commit": "abcdef1234567890", "started": "2026-12-06T12:00:00Z"}


def test_report_carries_the_blip_figures_with_their_run():
    from loadtests import report

    figs = report.blip_figures(_blip_summary())
    assert {k: figs[k] for k in report.BLIP_KEYS} == {k: _blip_summary()[k] for k in report.BLIP_KEYS}
    d = figs["blip_detail"]
    assert d["commit"] == "abcdef1234567890" and d["source"] == "blip/summary.json"
    assert d["top5_same_order"] == "0/1" and d["top1_same"] == "1/1" and d["naive_requests"] == 1
    assert d["match_before_payload"]["calls"] == 2 and d["foreign_cpu_share_max"] == 0.01
    assert report.blip_figures(None) == {k: None for k in report.BLIP_KEYS} | {"blip_detail": None}


def test_merge_blip_keeps_the_other_figures(tmp_path):
    import json

    from loadtests import report

    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"engine_efficiency": 0.9, "targets": {"engine_efficiency": {"met": True}}}))
    s = report.merge_blip(path, _blip_summary(), "blip/summary.json")
    again = json.loads(path.read_text())
    assert again == s and again["engine_efficiency"] == 0.9 and again["blip_retrieve64_vs_naive"] == 20.0
    assert again["targets"]["engine_efficiency"] == {"met": True}
    assert again["targets"]["blip_retrieve64_vs_naive"] == {"target": ">= 5.0", "met": True}


def test_report_cli_merges_a_blip_summary_and_writes_its_rows(tmp_path, monkeypatch):
    import json

    from loadtests import report

    results = tmp_path / "results"
    (results / "blip").mkdir(parents=True)
    (results / "blip" / "summary.json").write_text(json.dumps(_blip_summary()))
    (results / "summary.json").write_text(json.dumps({"commit": "c", "caption_vs_naive": 1.2}))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nstale table\n{report.END}\nrest\n")
    monkeypatch.setattr(report, "README", readme)
    monkeypatch.setattr(report.update_readme, "__defaults__", (readme,))
    assert report.main([str(results / "summary.json"), "--blip", str(results / "blip" / "summary.json"),
                        "--update-readme"]) == 0
    s = json.loads((results / "summary.json").read_text())
    assert s["caption_vs_naive"] == 1.2 and s["blip_match64_before_over_after"] == 1.2
    assert s["blip_detail"]["source"] == "blip/summary.json"
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "stale table" not in text
    row = next(line for line in text.splitlines() if line.startswith("| `blip_retrieve64_vs_naive` |"))
    assert "| >= 5.0 | **20** ✓ |" in row and "p50 180 s (1 requests) ÷ 9 s (1)" in row and "`abcdef123456`" in row
    assert "| **116** |" in next(line for line in text.splitlines() if line.startswith("| `blip_match64_before_mb`"))
    assert "2 Triton calls: 114 MB sent + 1.8 MB returned" in text


def test_bench_summary_takes_the_blip_figures_from_its_results_folder(tmp_path):
    import json
    from types import SimpleNamespace

    from loadtests import report
    from loadtests.bench import BenchSettings

    bench = SimpleNamespace(runs={}, raw={}, errors={}, s=BenchSettings.quick_run(), out=tmp_path)
    assert report.summary(bench, 0.0)["blip_retrieve64_vs_naive"] is None
    (tmp_path / "blip").mkdir()
    (tmp_path / "blip" / "summary.json").write_text(json.dumps(_blip_summary()))
    s = report.summary(bench, 0.0)
    assert s["blip_retrieve64_all_vs_naive"] == 10.0 and s["targets"]["blip_retrieve64_vs_naive"]["met"] is True


def test_topk_agreement_explains_differences_by_the_itc_shortlist():
    exact = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]]
    # Request 0: 3 and 5 were not shortlisted; the rest keeps the exact order at the top. Request 1: 2 was
    # shortlisted but ranked below a caption the exact ranking has lower: not the shortlist's doing.
    approx = [[1, 2, 4, 8, 9], [1, 4, 2, 8, 9]]
    out = bb.topk_agreement(approx, exact, 5, shortlists=[[1, 2, 4, 8, 9, 10], [1, 2, 4, 8, 9, 10]])
    assert [r["exact_in_shortlist"] for r in out["requests"]] == [3, 3]
    assert [r["consistent_with_shortlist"] for r in out["requests"]] == [True, False]
    assert out["mean_exact_in_shortlist"] == 3.0 and out["differences_explained_by_shortlist"] is False
    assert bb.topk_agreement(approx[:1], exact[:1], 5, [[1, 2, 4, 8, 9]])["differences_explained_by_shortlist"]
    assert "differences_explained_by_shortlist" not in bb.topk_agreement(approx, exact, 5)


def test_report_limits_of_the_blip_rows_come_from_the_run():
    from loadtests import report

    blip = _blip_summary()
    blip["blip_engine_efficiency_detail"]["rows"] = [
        {"engine": "image_encoder", "batch": 1, "gflop_per_item": 110.968, "efficiency": 0.7},
        {"engine": "fusion", "batch": 16, "tokens": 35, "gflop_per_item": 24.062, "items_per_s": 8.0,
         "efficiency": 0.7},
    ]
    blip["blip_match64_detail"] |= {"texts": 64, "pixels_shape": [1, 384, 384, 3]}
    bd = report.blip_figures(blip)["blip_detail"]
    # _full_raw's one request: exact top 5 [1, 2, 3, 5, 9], ITC shortlist [1..6] holds 1, 2, 3, 5, but shortlist
    # 16 answered [1, 2, 3, 4, 5]: 4 above 5 is not what re-ranking by the exact scores gives.
    assert bd["exact_top5_in_itc_shortlist_mean"] == 4 and bd["differences_explained_by_shortlist"] is False
    assert bd["exact_top1_in_itc_shortlist"] == "1/1" and bd["match_pixel_bytes"] == 442_368
    assert bd["match_feature_bytes"] == 1_800_000 - 512
    lim = report.blip_limits(bd)
    assert "(111 GFLOP)" in lim["blip_retrieve64_vs_naive"] and "1 torch thread" in lim["blip_retrieve64_vs_naive"]
    assert "p50 +9 s for the 48 more rows (188 ms a row)" in lim["blip_retrieve64_all_vs_naive"]
    assert "held 4 of the exact top 5" in lim["blip_retrieve64_top5_overlap"]
    assert "8 s in-process" in lim["blip_match64_before_over_after"]
    assert "(0.442 MB)" in lim["blip_match64_after_mb"].replace("uint8, ", "(")
    text = report.markdown(report.blip_figures(blip) | {"commit": "c"})
    assert lim["blip_match64_before_mb"] in text
    # Without a BLIP run: the rows keep their words, no figures.
    assert report.blip_limits({}) == {}
    assert "captions of the exact top 5 that the ITC shortlist of 16 leaves out" in report.markdown({"commit": "c"})
