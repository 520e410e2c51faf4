"""FLOPs per item counted from the ONNX graphs, and this machine's fp32 matmul ceiling.

FLOPs are 2 × the multiply-adds of every MatMul, Gemm and Conv node (elementwise ops,
softmax and layer norms are not counted); in the dynamic-int8 graphs a MatMul is a
MatMulInteger, counted the same way, so both precisions count the same FLOPs per item.
Shapes come from shape inference with the batch axis fixed at 1: ONNX Runtime's symbolic
shape inference, falling back to onnx's own with data propagation. MatMul: numel(output) × K;
Gemm: M × N × K; Conv: numel(output) × (C_in / groups) × prod(kernel). An item is one
(image, question) through all three engines.

The ceiling is the best fp32 matmul FLOP/s of an n×n×n product (n = 4096) over ONNX Runtime
(MLAS) and PyTorch (oneDNN/MKL), each with the intra-op thread count ONNX Runtime uses; the
int8 ceiling, ONNX Runtime's MatMulInteger (uint8 × int8), the kernel of the int8 engines.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

log = logging.getLogger(__name__)

ENGINES = ("image_encoder", "text_encoder", "fusion")


def _with_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for inp in m.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = batch
    return m


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception as e:  # noqa: BLE001 — fall back to onnx's inference
        log.debug("symbolic shape inference failed (%s): using onnx.shape_inference", e)
        return onnx.shape_inference.infer_shapes(model, data_prop=True)


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    g = model.graph
    out: dict[str, list[int | None]] = {}
    for vi in (*g.input, *g.value_info, *g.output):
        out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    for init in g.initializer:
        out[init.name] = list(init.dims)
    return out


def _numel(shape: list[int | None]) -> int:
    n = 1
    for d in shape:
        if d is None:
            raise ValueError("unknown dim")
        n *= d
    return n


def count_graph(path: str | Path, batch: int = 1) -> dict[str, Any]:
    """MACs per op type and FLOPs per item of one ONNX graph (batch fixed at `batch`)."""
    model = _infer(_with_batch(onnx.load(str(path)), batch))
    shapes = _shapes(model)
    macs: dict[str, int] = {"MatMul": 0, "MatMulInteger": 0, "Gemm": 0, "Conv": 0}
    unknown: list[str] = []
    for node in model.graph.node:
        if node.op_type not in macs:
            continue
        try:
            out = shapes[node.output[0]]
            if node.op_type in ("MatMul", "MatMulInteger"):
                a = shapes[node.input[0]]
                macs[node.op_type] += _numel(out) * int(a[-1])  # type: ignore[arg-type]
            elif node.op_type == "Gemm":
                a = shapes[node.input[0]]
                trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
                k = a[0] if trans_a else a[1]
                macs["Gemm"] += _numel(out) * int(k)  # type: ignore[arg-type]
            else:
                w = shapes[node.input[1]]
                macs["Conv"] += _numel(out) * _numel(w[1:])
        except (KeyError, ValueError, TypeError, IndexError):
            unknown.append(node.name or node.op_type)
    total = sum(macs.values())
    return {
        "macs": macs,
        "flops_per_item": 2 * total / batch,
        "nodes_without_shapes": unknown,
    }


def count_item(onnx_paths: dict[str, Path]) -> dict[str, Any]:
    """FLOPs of one item: image_encoder + text_encoder + fusion, each at batch 1."""
    per = {e: count_graph(onnx_paths[e]) for e in ENGINES}
    return {"engines": per, "flops_per_item": sum(p["flops_per_item"] for p in per.values())}


def repository_onnx(repository: str | Path) -> dict[str, Path]:
    """The three engines' model.onnx in a built repository (version 1)."""
    paths = {e: Path(repository) / e / "1" / "model.onnx" for e in ENGINES}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing: build the repository with `vtfuse export all` first")
    return paths


def ort_threads() -> int:
    """The intra-op thread count ONNX Runtime picks by default: one per core."""
    return os.cpu_count() or 1


def _matmul_onnx(n: int, int8: bool = False) -> bytes:
    """fp32 MatMul, or the MatMulInteger (uint8 activations × int8 weights → int32) of the int8 engines."""
    ta, tb, tc = (TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32) if int8 else (TensorProto.FLOAT,) * 3
    a = helper.make_tensor_value_info("A", ta, [n, n])
    b = helper.make_tensor_value_info("B", tb, [n, n])
    c = helper.make_tensor_value_info("C", tc, [n, n])
    op = "MatMulInteger" if int8 else "MatMul"
    graph = helper.make_graph([helper.make_node(op, ["A", "B"], ["C"])], "mm", [a, b], [c])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _best(fn: Any, flops: float, reps: int) -> float:
    fn()  # warm-up
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = max(best, flops / (time.perf_counter() - t))
    return best


def matmul_ceiling(n: int = 4096, threads: int | None = None, reps: int = 5) -> dict[str, Any]:
    """Best fp32 n×n×n matmul FLOP/s over ONNX Runtime and PyTorch at `threads` intra-op threads."""
    import onnxruntime as ort

    threads = threads or ort_threads()
    flops = 2.0 * n**3
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(_matmul_onnx(n), so, providers=["CPUExecutionProvider"])
    results = {"onnxruntime": _best(lambda: sess.run(None, {"A": a, "B": b}), flops, reps)}
    try:
        import torch

        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        results["torch"] = _best(lambda: torch.mm(ta, tb), flops, reps)
        torch.set_num_threads(old)
    except ImportError:
        pass
    best_by = max(results, key=lambda k: results[k])
    return {"n": n, "threads": threads, "flops_per_s": results[best_by], "best_library": best_by, "by_library": results}


def matmul_ceiling_int8(n: int = 4096, threads: int | None = None, reps: int = 5) -> dict[str, Any]:
    """Best int8 n×n×n MatMulInteger op/s through ONNX Runtime (the kernel the int8 engines run)."""
    import onnxruntime as ort

    threads = threads or ort_threads()
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (n, n), dtype=np.uint8)
    b = rng.integers(-128, 128, (n, n), dtype=np.int8)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(_matmul_onnx(n, int8=True), so, providers=["CPUExecutionProvider"])
    best = _best(lambda: sess.run(None, {"A": a, "B": b}), 2.0 * n**3, reps)
    return {"n": n, "threads": threads, "ops_per_s": best, "library": "onnxruntime MatMulInteger (u8 × s8)"}
