"""loadtests.caption_bench without servers: rounds rule, ratio, metric deltas, SSE timing, token checks, summary."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from loadtests import caption_bench as cb

METRICS = """# HELP vtfuse_generate_step_rows Rows advanced by one decoder step
# TYPE vtfuse_generate_step_rows histogram
vtfuse_generate_step_rows_count{model="m_generate"} 10
vtfuse_generate_step_rows_sum{model="m_generate"} 80
vtfuse_generate_step_rows_bucket{model="m_generate",le="8"} 4
vtfuse_generate_step_rows_bucket{model="m_generate",le="+Inf"} 10
vtfuse_generate_step_rows_count{model="other_generate"} 99
vtfuse_generate_tokens_total{model="m_generate"} 200
nv_inference_count{model="m_generate",version="1"} 3
"""


def test_rounds_alternate_which_side_goes_first():
    assert [cb.round_order(r) for r in range(3)] == [("served", "naive"), ("naive", "served"), ("served", "naive")]


def test_ratio():
    assert cb.ratio(3.0, 2.0) == 1.5
    assert cb.ratio(None, 2.0) is None and cb.ratio(1.0, None) is None and cb.ratio(1.0, 0.0) is None


def test_metrics_are_parsed_for_one_model_and_subtracted():
    before = cb.parse_metrics(METRICS, "m_generate")
    assert before["vtfuse_generate_step_rows_count"] == 10 and before["vtfuse_generate_tokens_total"] == 200
    assert before['vtfuse_generate_step_rows_bucket{le="+Inf"}'] == 10
    assert "nv_inference_count" in before  # every series of the model, whatever its other labels
    after = cb.parse_metrics(METRICS.replace(" 10\n", " 30\n").replace(" 80\n", " 400\n"), "m_generate")
    delta = cb.metric_delta(before, after)
    assert delta["vtfuse_generate_step_rows_count"] == 20 and delta["vtfuse_generate_step_rows_sum"] == 320
    assert cb.rows_per_step(delta) == 16.0
    assert cb.rows_per_step({}) is None
    both = cb.add_deltas([delta, delta])
    assert both["vtfuse_generate_step_rows_sum"] == 640 and cb.rows_per_step(both) == 16.0


def test_histogram_quantile_interpolates_within_the_bucket():
    name = "h"
    delta = {f'{name}_bucket{{le="1.0"}}': 0.0, f'{name}_bucket{{le="2.0"}}': 50.0, f'{name}_bucket{{le="4.0"}}': 100.0,
             f'{name}_bucket{{le="+Inf"}}': 100.0, f"{name}_count": 100.0}
    assert cb.histogram_quantile(0.5, delta, name) == pytest.approx(2.0)
    assert cb.histogram_quantile(0.25, delta, name) == pytest.approx(1.5)
    assert cb.histogram_quantile(0.99, delta, name) == pytest.approx(3.96)
    over = dict(delta) | {f'{name}_bucket{{le="+Inf"}}': 200.0}
    assert cb.histogram_quantile(0.99, over, name) == 4.0  # in +Inf: the highest finite bound
    assert cb.histogram_quantile(0.5, {}, name) is None


def test_sse_timing_from_the_first_token_event_to_the_last_event():
    lines = [
        (10.5, b'data: {"index": 0, "token_id": 7, "delta": "a"}\n'), (10.5, b"\n"),
        (10.7, b'data: {"index": 1, "token_id": 8, "delta": " b"}\n'),
        (10.9, 'data: {"index": 2, "token_id": 9, "delta": " c"}'),
        (11.1, b'data: {"caption": "a b c", "token_ids": [1, 7, 8, 9], "finish_reason": "length"}\n'),
    ]
    events = cb.sse_events(lines)
    assert [e["index"] for _, e in events[:3]] == [0, 1, 2] and events[-1][1]["caption"] == "a b c"
    t = cb.stream_timing(10.0, events)
    assert t["ttft_s"] == pytest.approx(0.5) and t["total_s"] == pytest.approx(1.1) and t["tokens"] == 3
    assert t["tpot_s"] == pytest.approx((1.1 - 0.5) / 2)
    assert t["result"]["token_ids"] == [1, 7, 8, 9]
    one = cb.stream_timing(10.0, events[:1] + events[-1:])
    assert one["tokens"] == 1 and one["tpot_s"] is None
    with pytest.raises(ValueError):
        cb.stream_timing(10.0, events[-1:])


def test_quantiles():
    assert cb.quantiles([]) == {"p50": None, "p99": None}
    q = cb.quantiles([0.1, 0.2, 0.3], scale=1e3, digits=1)
    assert q["p50"] == 200.0 and 290 < q["p99"] <= 300


def test_every_served_answer_is_checked_against_the_naive_one_for_its_image():
    naive = [(0, [1, 2, 3]), (1, [1, 5, 6]), (0, [1, 2, 3])]
    served = [(0, [1, 2, 3]), (1, [1, 5, 7]), (1, [1, 5, 6]), (2, [1, 9])]
    r = cb.compare_tokens(naive, served)
    assert r["compared"] == 3 and r["identical"] == 2 and r["differ_images"] == [1] and r["uncompared"] == 1
    assert r["naive_inconsistent"] == 0 and r["images_with_naive_reference"] == 2
    assert cb.compare_tokens([(0, [1]), (0, [2])], [])["naive_inconsistent"] == 1


def test_caption_bodies_fix_the_length_and_cycle_distinct_images():
    bodies = [json.loads(b) for b in cb.caption_bodies(3, seed=1, side=64, model="m", new_tokens=20)]
    assert len({b["image"] for b in bodies}) == 3
    assert all(b["min_new_tokens"] == b["max_new_tokens"] == 20 and b["model"] == "m" for b in bodies)
    assert "stream" not in bodies[0]
    assert Image.open(io.BytesIO(base64.b64decode(bodies[0]["image"]))).size == (64, 64)
    streamed = [json.loads(b) for b in cb.caption_bodies(3, seed=1, side=64, model="m", new_tokens=20, stream=True)]
    assert [b["image"] for b in streamed] == [b["image"] for b in bodies] and streamed[0]["stream"] is True


def test_vqa_bodies_ask_one_then_eight_distinct_questions_on_one_image():
    pairs = cb.vqa_bodies(2, seed=3, side=64, model="v", questions=8)
    for one, many in pairs:
        a, b = json.loads(one), json.loads(many)
        assert a["image"] == b["image"] and len(a["questions"]) == 1 and len(set(b["questions"])) == 8
        assert a["questions"][0] == b["questions"][0]
    assert json.loads(pairs[0][0])["image"] != json.loads(pairs[1][0])["image"]


def test_variant_edit_changes_only_the_named_models_settings():
    from tritonclient.grpc import model_config_pb2 as mc

    edit = cb.variant_edit((("image_instances", "2"), ("image_threads", "1"), ("max_rows", "64")), "m")
    enc = mc.ModelConfig(name="m_image_encoder")
    enc.instance_group.add().count = 1
    enc.parameters["intra_op_threads"].string_value = "2"
    gen = mc.ModelConfig(name="m_generate")
    gen.parameters["max_rows"].string_value = "32"
    other = mc.ModelConfig(name="image_encoder")
    other.instance_group.add().count = 1
    for name, c in (("m_image_encoder", enc), ("m_generate", gen), ("image_encoder", other)):
        edit(name, c)
    assert enc.instance_group[0].count == 2 and enc.parameters["intra_op_threads"].string_value == "1"
    assert gen.parameters["max_rows"].string_value == "64" and other.instance_group[0].count == 1
    with pytest.raises(ValueError):
        cb.variant_edit((("threads", "1"),), "m")


def test_unbuilt_models_are_those_without_a_manifest(tmp_path):
    for name, built in (("a", True), ("b", False)):
        (tmp_path / name / "1").mkdir(parents=True)
        (tmp_path / name / "config.pbtxt").write_text("")
        if built:
            (tmp_path / name / "1" / "manifest.json").write_text("{}")
    assert cb.unbuilt_models(tmp_path) == ["b"]


def _window(side: str, rate: float, tokens: list, rows: tuple[float, float] | None = None) -> dict:
    w = {"name": side, "captions_per_s": rate, "completed": 10, "p50_ms": 1.0, "p99_ms": 2.0, "errors": {},
         "foreign_cpu_share": 0.0, "client_cpu_s": 0.1, "stack_cpu_s": 1.0, "workers": {}, "startup_s": 1.0,
         "tokens": tokens}
    if rows:
        w["metrics_delta"] = {"vtfuse_generate_step_rows_count": rows[0], "vtfuse_generate_step_rows_sum": rows[1]}
    return w


def _raw() -> dict:
    rounds = []
    for r, (served, naive) in enumerate([(1.2, 1.0), (1.5, 1.0), (1.4, 1.0)]):
        rounds.append({"round": r, "first": cb.round_order(r)[0], "rerun": r == 1, "served": served, "naive": naive,
                       "windows": {"served": _window("served", served, [[0, [1, 2]], [1, [1, 3]]], (10, 40 * (r + 1))),
                                   "naive": _window("naive", naive, [[0, [1, 2]], [1, [1, 4]]])}})
    stream = _window("served", 1.3, [[0, [1, 2]]], (10, 100)) | {
        "stream": [{"ttft_s": t, "tpot_s": t / 10, "tokens": 20, "total_s": 3.0} for t in (1.0, 2.0, 3.0)],
        "metrics_delta": {'vtfuse_generate_time_to_first_token_seconds_bucket{le="2.5"}': 2.0,
                          'vtfuse_generate_time_to_first_token_seconds_bucket{le="+Inf"}': 3.0,
                          "vtfuse_generate_time_to_first_token_seconds_count": 3.0}}
    vqa = {"requests": [{"questions": q, "warmup": False, "s": s, "generated_tokens": 20.0 * q}
                        for q, s in ((1, 1.0), (8, 2.0), (1, 1.2), (8, 2.5))]}
    return {"settings": {"stray": 0.25, "concurrency": 16, "new_tokens": 20}, "rounds": rounds, "stream": stream,
            "vqa": vqa, "errors": {}, "commit": "abc", "started": "2026-12-06T10:00:00Z"}


def test_summary_is_computed_from_the_raw_windows():
    s = cb.summarize(_raw())
    assert s["caption_vs_naive"] == 1.4 and s["caption_vs_naive_detail"]["median_round"] == 2
    assert s["decode_rows_per_step_c16"] == pytest.approx(240 / 30)
    assert s["caption_vs_naive_detail"]["tokens"]["compared"] == 7
    assert s["caption_vs_naive_detail"]["tokens"]["identical"] == 4
    assert s["ttft_p50_s_c16"] == 2.0 and s["tpot_p50_ms_c16"] == 200.0
    assert s["ttft_tpot_detail"]["triton_ttft_histogram_s"]["p99"] == 2.5
    assert s["vqa_gen_8q_over_1q"] == pytest.approx(2.25 / 1.1, abs=1e-4)
    assert s["targets"]["caption_vs_naive"]["met"] is False and s["targets"]["vqa_gen_8q_over_1q"]["met"] is True
    empty = cb.summarize({"settings": {}})
    assert empty["caption_vs_naive"] is None and empty["vqa_gen_8q_over_1q"] is None


def test_the_naive_server_answers_as_generate_does(tmp_path, monkeypatch):
    import torch
    from fastapi.testclient import TestClient
    from transformers import AutoProcessor, BlipForConditionalGeneration

    from loadtests.baseline import caption_app
    from tests.hf.checkpoints import build_blip_caption

    folder = build_blip_caption(tmp_path / "ckpt")
    monkeypatch.setenv("VTFUSE_CAPTION_CHECKPOINT", str(folder))
    body = json.loads(cb.caption_bodies(1, seed=2, side=64, model="m", new_tokens=6)[0])
    with TestClient(caption_app.app) as client:
        r = client.post("/v1/caption", json=body | {"prompt": "a picture of"})
        assert client.post("/v1/caption", json=body | {"stream": True}).status_code == 422
        assert client.get("/healthz").json()["pid"] == int(r.headers["x-worker-pid"])
    assert r.status_code == 200, r.text
    out = r.json()
    model = BlipForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    image = Image.open(io.BytesIO(base64.b64decode(body["image"]))).convert("RGB")
    with torch.no_grad():
        ids = model.generate(**processor(images=image, text="a picture of", return_tensors="pt"), min_new_tokens=6,
                             max_new_tokens=6)[0]
    assert out["token_ids"] == [int(t) for t in ids]
    assert out["caption"] == processor.decode(ids, skip_special_tokens=True)
    assert out["usage"] == {"prompt_tokens": 4, "generated_tokens": len(ids) - 4} and out["model"] == "m"
    assert out["finish_reason"] == "length"


def test_caption_figures_go_into_an_existing_summary_and_the_readme_table(tmp_path):
    from loadtests import report

    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"vs_naive_http_tiny": 1.43, "targets": {"vs_naive_http_tiny": {"met": True}}}))
    merged = report.merge_caption(path, cb.summarize(_raw()), "caption/summary.json")
    again = json.loads(path.read_text())
    assert again == merged and again["vs_naive_http_tiny"] == 1.43  # the other figures stay as measured
    assert again["caption_vs_naive"] == 1.4 and again["vqa_gen_8q_over_1q"] == pytest.approx(2.0455, abs=1e-4)
    assert again["targets"]["caption_vs_naive"] == {"target": ">= 1.6", "met": False}
    assert again["targets"]["vs_naive_http_tiny"] == {"met": True}
    d = again["caption_detail"]
    assert d["same_tokens"] == "4/7" and d["commit"] == "abc" and [r["ratio"] for r in d["rounds"]] == [1.2, 1.5, 1.4]
    text = report.markdown(again)
    row = next(line for line in text.splitlines() if line.startswith("| `caption_vs_naive`"))
    assert "**1.4** ✗" in row and "ratios 1.2, 1.5*, 1.4; * re-run" in row and "same tokens 4/7" in row
    assert report.caption_figures(None)["caption_vs_naive"] is None


def test_a_contended_window_is_measured_again_once_it_is_quiet(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(cb, "wait_quiet", lambda timeout_s: waits.append(timeout_s) or 0.0)
    shares = iter([0.3, 0.05, 0.02])
    s = cb.CaptionBenchSettings(wait_quiet_s=60.0)
    w = cb.quiet_measure(s, lambda: {"captions_per_s": 1.0, "foreign_cpu_share": next(shares)}, "w")
    assert w["foreign_cpu_share"] == 0.05 and w["contended_first_try"]["foreign_cpu_share"] == 0.3
    assert waits == [60.0, 60.0]
    w = cb.quiet_measure(s, lambda: {"captions_per_s": 1.0, "foreign_cpu_share": next(shares)}, "w")
    assert "contended_first_try" not in w
    assert cb.quiet_measure(cb.CaptionBenchSettings(), lambda: {"foreign_cpu_share": 0.9}, "w") == {
        "foreign_cpu_share": 0.9}  # without a quiet wait, as measured


def test_the_caption_rows_limits_are_computed_from_the_run():
    """"What limits it" of the caption rows comes from the run's own CPU and rates, never from typed-in figures."""
    from loadtests import report

    def rnd(i: int, kept: bool, served: float, naive: float) -> dict:
        windows = {"served": {"stack_cpu_s_per_caption": served}, "naive": {"stack_cpu_s_per_caption": naive}}
        return {"round": i, "ratio": 1.0, "rerun": not kept, "kept": kept, "windows": windows}

    cap = {
        "caption_vs_naive_detail": {"rounds": [
            rnd(0, True, 1.8, 2.4), rnd(1, True, 2.0, 2.6), rnd(2, False, 0.1, 9.0)
        ]},
        "cost_model": {"vision_gflop": 110.97, "vision": [
            {"kind": "ort_vision", "processes": 2, "threads": 1, "per_s": 2.0},
            {"kind": "torch_vision", "processes": 2, "threads": 1, "per_s": 1.6},
            {"kind": "ort_vision", "processes": 1, "threads": 2, "per_s": 1.0},
        ]},
        "decode_rows_per_step_c16_detail": {"steps_per_s": 9.0, "captions_per_s": 1.1},
    }
    costs = report.caption_costs(cap)
    assert costs["served_cpu_s_per_caption"] == 1.9 and costs["naive_cpu_s_per_caption"] == 2.5  # kept rounds only
    limits = report.caption_limits(costs | {"vision_gflop": 110.97})
    assert limits["caption_vs_naive"].startswith("CPU per caption: served 1.9 core-s against the naive 2.5")
    assert "(111 GFLOP an image) 1 and 1.25 (2 cores at 2 and 1.6 images/s)" in limits["caption_vs_naive"]
    assert "1.1 captions a second enter" in limits["decode_rows_per_step_c16"] and "9 steps a second" in limits[
        "decode_rows_per_step_c16"]
    assert report.caption_limits({}) == {}  # a run without them keeps the rows' static text


def test_cpu_is_summed_per_process_label():
    before = {1: ("a", 1.0), 2: ("b", 5.0)}
    after = {1: ("a", 3.0), 2: ("b", 5.0), 3: ("a", 0.5)}
    assert cb.cpu_by_label(before, after) == {"a": 2.5}
