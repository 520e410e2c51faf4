"""Stage 2b: dynamic-int8 engines, judged by the answers they give, and installed only when they pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from export.check import write_report
from export.cli import EXIT_OK
from export.errors import InstallError, ParityError
from export.install import install
from export.onnx_export import export_onnx, load_source
from export.quantize import INT8_DIR, QUANTIZE_FILE, Int8Criteria, judge_int8, quantize
from serving.model.io_spec import ENGINES
from tests.export.test_export_cli import run as vtfuse


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.fixture(scope="module")
def trained_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped, trained `tiny` exported to ONNX (stage 1), with a parity report marked passed."""
    out = tmp_path_factory.mktemp("trained")
    export_onnx(load_source("tiny"), out, source="tiny")
    write_report({"ok": True, "note": "stage 2 is tested in test_export_check.py"}, out)
    return out


def test_trained_tiny_in_int8_keeps_its_answers_on_fresh_renders(trained_onnx):
    report = quantize(trained_onnx, n=200, threads=1)
    f = report["figures"]
    assert report["ok"] and report["failures"] == []
    assert f["judged"] == {"vqa_agreement": True, "itm_order_agreement": True, "caption_agreement": True}
    assert f["caption"]["greedy_agreement"] >= 0.97 and f["caption"]["items_exact"]["int8"] >= 0.9
    assert f["vqa_agreement"] >= 0.97
    assert f["vqa_accuracy"]["int8"] >= 0.95  # the VQA accuracy target (95 %) holds in int8
    assert f["itm_order_agreement"] >= 0.95
    assert min(f["embedding_cosine_min"].values()) >= 0.99
    for e in ENGINES:  # weights really are int8, and the files shrank
        assert "MatMulInteger" in _ops(trained_onnx / INT8_DIR / f"{e}.onnx")
        assert report["bytes"][e]["int8"] < 0.6 * report["bytes"][e]["fp32"]
    on_disk = json.loads((trained_onnx / INT8_DIR / QUANTIZE_FILE).read_text())
    assert on_disk["figures"]["vqa_agreement"] == f["vqa_agreement"]


def test_a_broken_int8_layer_fails_the_check_and_is_not_installed(trained_onnx, source_repo, tmp_path):
    stage = tmp_path / "onnx"
    shutil.copytree(trained_onnx, stage)
    quantize(stage, n=50, threads=1)
    # Break the int8 fusion graph: every weight scale negated, as a wrong quantisation would.
    path = stage / INT8_DIR / "fusion.onnx"
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name.endswith("_scale") and init.data_type == onnx.TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
    onnx.save(model, str(path))
    report = judge_int8(stage, n=50, threads=1)
    assert not report["ok"] and report["figures"]["vqa_agreement"] < 0.5
    (stage / INT8_DIR / QUANTIZE_FILE).write_text(json.dumps(report))
    with pytest.raises(InstallError, match="--precision fp32"):
        install(stage, "onnxruntime", precision="int8", repo=tmp_path / "repo", source_repo=source_repo)
    assert not (tmp_path / "repo").exists()


def test_quantize_raises_with_the_figures_when_a_criterion_is_missed(onnx_dir, tmp_path):
    stage = tmp_path / "onnx"
    shutil.copytree(onnx_dir, stage)
    with pytest.raises(ParityError, match="IMAGE_EMBEDDING cosine") as err:
        quantize(stage, n=10, threads=1, criteria=Int8Criteria(min_embedding_cosine=1.01))
    assert err.value.figures["ok"] is False
    assert json.loads((stage / INT8_DIR / QUANTIZE_FILE).read_text())["ok"] is False  # kept for the post-mortem


def test_random_weights_are_judged_by_cosines_not_by_their_tied_answers(onnx_dir):
    report = json.loads((onnx_dir / INT8_DIR / QUANTIZE_FILE).read_text())
    assert report["ok"]
    assert report["figures"]["judged"]["vqa_agreement"] is False  # an untrained model answers at chance
    assert report["figures"]["vqa_logits_cosine_min"] >= 0.99


def test_int8_install_records_precision_and_figures(onnx_dir, source_repo, tmp_path):
    repo = tmp_path / "embedded"
    result = install(onnx_dir, "embedded", repo=repo, source_repo=source_repo)  # embedded's default: int8
    assert result["precision"] == "int8"
    for e in ENGINES:
        m = json.loads((repo / e / "1" / "manifest.json").read_text())
        assert m["precision"] == "int8" and m["int8"]["ok"] is True
        assert m["int8"]["weight_type"] == "QInt8" and m["int8"]["op_types"] == ["MatMul", "Gemm"]
        assert "MatMulInteger" in _ops(repo / e / "1" / "model.onnx")
    fp32 = install(onnx_dir, "embedded", repo=tmp_path / "fp32", source_repo=source_repo, precision="fp32")
    assert fp32["precision"] == "fp32"
    assert "MatMulInteger" not in _ops(tmp_path / "fp32" / "fusion" / "1" / "model.onnx")
    assert json.loads((tmp_path / "fp32" / "fusion" / "1" / "manifest.json").read_text())["precision"] == "fp32"


def test_int8_needs_the_quantize_stage_and_an_onnx_target(onnx_dir, source_repo, tmp_path):
    stage = tmp_path / "onnx"
    shutil.copytree(onnx_dir, stage, ignore=shutil.ignore_patterns(INT8_DIR))
    with pytest.raises(InstallError, match="vtfuse export quantize"):
        install(stage, "embedded", repo=tmp_path / "r", source_repo=source_repo)
    with pytest.raises(InstallError, match="TensorRT"):
        install(onnx_dir, "tensorrt", precision="int8", repo=tmp_path / "t", source_repo=source_repo)


def test_cli_all_embedded_quantizes_and_installs_int8(tmp_path, source_repo, capsys):
    code = vtfuse(
        ["export", "all", "--checkpoint", "random:tiny", "--threads", "1", "--quantize-samples", "20",
         "--onnx-dir", str(tmp_path / "onnx"), "--repo", str(tmp_path / "repo"), "--source-repo", str(source_repo)]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == EXIT_OK
    assert out["quantize"]["ok"] is True and out["quantize"]["n"] == 20
    assert out["install"]["precision"] == "int8"
    f = out["quantize"]["figures"]
    assert np.isclose(f["vqa_accuracy_drop"], f["vqa_accuracy"]["fp32"] - f["vqa_accuracy"]["int8"])
