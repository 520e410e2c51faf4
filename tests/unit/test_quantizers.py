"""The int8 kinds levers (loadtests.quantizers) on the installed `tiny`: every kind built, timed and compared,
and OpenVINO's CPU runtime on the same graphs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import torch

from loadtests import quantizers
from loadtests.common import make_corpus
from loadtests.flops import ENGINES


def test_every_kind_is_timed_against_pytorch_and_judged_against_fp32(tmp_path):
    threads = torch.get_num_threads()
    res = quantizers.compare("tiny", Path("model_repository"), make_corpus(16, seed=3), batches=(1, 2),
                             min_time_s=0.05, passes=1, work_dir=tmp_path)
    assert torch.get_num_threads() == threads  # the naive worker's one thread does not leak out
    rows = res["rows"]
    assert set(rows) == {"torch fp32", "torch dynamic int8 (naive server)", "onnxruntime fp32", *quantizers.KINDS,
                         *quantizers.OPENVINO_ROWS}
    for label, row in rows.items():
        assert "error" not in row, (label, row)
        assert set(row["items_per_s"]) == {1, 2} and min(row["items_per_s"].values()) > 0, label
        assert [len(v) for v in row["passes_items_per_s"].values()] == [1, 1], label  # one pass asked for
    assert rows["torch dynamic int8 (naive server)"]["over_torch_int8"] == {1: 1.0, 2: 1.0}
    # The PyTorch side is the same model as the engines: fp32 agrees with ONNX Runtime's fp32 exactly.
    assert min(rows["torch fp32"]["parity"].values()) > 0.9999
    assert min(rows["openvino fp32"]["parity"].values()) > 0.9999  # another runtime, the same fp32 graphs
    for label in [*quantizers.KINDS, *list(quantizers.OPENVINO_ROWS)[1:]]:  # int8 keeps its logits' direction
        assert rows[label]["parity"]["vqa_logits_cosine_min"] > 0.98, label
    built = sorted(tmp_path.glob("tiny/kind*/*.onnx"))  # every kind but the shipped files, three engines each
    assert len(built) == 3 * (len(quantizers.KINDS) - 1) and {p.stem for p in built} == set(ENGINES)
    graphs = {label: onnx.load(tmp_path / "tiny" / f"kind{i}" / "image_encoder.onnx").graph
              for i, label in enumerate(quantizers.KINDS) if i}  # kind0 is the shipped files, not built here
    ops = {label: Counter(n.op_type for n in g.node) for label, g in graphs.items()}
    # Each kind is the graph it says: attention's MatMuls quantised on top of the weights' ones, block-wise weights.
    assert ops["dynamic, attention MatMuls too"]["MatMulInteger"] > ops["dynamic, per channel"]["MatMulInteger"] > 0
    assert ops["MatMulNBits 8-bit, blocks of 128"]["MatMulNBits"] > 0
    assert ops["MatMulNBits 8-bit, blocks of 128"]["MatMulInteger"] == 0
    profile = res["profile_shipped_int8_batch1"]
    assert set(profile["share_by_engine"]) == set(ENGINES)
    assert abs(sum(profile["share_by_engine"].values()) - 1) < 0.01
    assert "DynamicQuantizeMatMul" in profile["share_by_op_type"]  # the shipped engines are the int8 ones
    assert list(tmp_path.glob("profile*")) == []  # traces read, then removed
