"""Stage 2: ONNX Runtime agrees with PyTorch on random and rendered inputs; a broken engine is named."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from export.check import FP32_TOLERANCE, PARITY_FILE, Tolerance, check_parity, summary
from export.errors import ParityError
from serving.model.io_spec import ENGINES, engine_specs


def test_every_engine_and_output_within_fp32_tolerance(onnx_dir, tiny):
    report = json.loads((onnx_dir / PARITY_FILE).read_text())
    assert report["ok"] is True
    assert report["tolerance"] == {"atol": FP32_TOLERANCE.atol, "rtol": FP32_TOLERANCE.rtol}
    specs = engine_specs(tiny.config)
    for inputs in ("random", "real"):
        # tiny's caption decoder graphs are checked too (tests/export/test_caption_export.py)
        assert sorted(report[inputs]) == sorted((*ENGINES, "cross_kv", "decoder_step"))
        for e in ENGINES:
            assert sorted(report[inputs][e]) == sorted(t.name for t in specs[e].outputs)
            for out, f in report[inputs][e].items():
                assert f["max_abs"] <= FP32_TOLERANCE.atol, (inputs, e, out, f)
                assert f["max_rel"] <= FP32_TOLERANCE.rtol, (inputs, e, out, f)


def test_onnx_chain_gives_the_same_answers_as_pytorch(onnx_dir):
    report = json.loads((onnx_dir / PARITY_FILE).read_text())
    assert report["end_to_end"]["vqa_top1_agreement"] == 1.0
    assert report["end_to_end"]["itm_prob_max_abs"] < 1e-4


def test_summary_keeps_the_worst_figure_per_output(onnx_dir):
    report = json.loads((onnx_dir / PARITY_FILE).read_text())
    worst = summary(report)
    f = worst["image_encoder"]["IMAGE_FEATURES"]
    assert f["max_abs"] == max(report[s]["image_encoder"]["IMAGE_FEATURES"]["max_abs"] for s in ("random", "real"))


def test_a_zero_tolerance_fails_with_the_engine_and_output_named(onnx_dir, tiny):
    with pytest.raises(ParityError, match=r"differs from PyTorch") as err:
        check_parity(tiny, onnx_dir, batch=2, n_real=2, tolerance=Tolerance(0.0, 0.0), threads=1)
    assert err.value.engine in ENGINES
    assert err.value.output in {t.name for t in engine_specs(tiny.config)[err.value.engine].outputs}
    assert err.value.output in str(err.value)
    assert err.value.figures["ok"] is False


def test_weights_that_differ_from_the_export_fail_the_image_engine(onnx_dir, tiny):
    changed = copy.deepcopy(tiny)
    with torch.no_grad():
        changed.model.image.ln.bias += 0.01  # the image tower's last LayerNorm: image outputs move
    with pytest.raises(ParityError) as err:
        check_parity(changed, onnx_dir, batch=2, n_real=2, threads=1)
    assert err.value.engine == "image_encoder"
    assert err.value.output == "IMAGE_FEATURES"
    report = check_parity(changed, onnx_dir, batch=2, n_real=2, threads=1, raise_on_failure=False)
    assert report["random"]["text_encoder"]["TEXT_FEATURES"]["ok"] is True  # the other towers still agree
