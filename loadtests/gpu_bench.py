"""GPU in-process benchmark of `small` and `base`: PyTorch CUDA FP16 (eager and CUDA graphs) per batch size.

Run on a machine with an NVIDIA GPU (the project's CI has none):

    python loadtests/gpu_bench.py --out loadtests/results/gpu.json

An item is one (image, question) through all three engines (image_encoder, text_encoder,
fusion). FLOPs per item are counted by torch's FlopCounterMode on the same forward pass
(2 × multiply-adds of matmuls and convolutions); the ceiling is the best dense FP16 and
BF16 matmul rate measured on this GPU at 8192². ONNX Runtime is measured too when its CUDA
provider is present.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serving.model.model import FusionConfig, build_model  # noqa: E402

BATCHES = (1, 8, 32, 64, 128, 256, 512)


def matmul_ceiling(dtype: torch.dtype, n: int = 8192, reps: int = 30) -> float:
    """Best measured FLOP/s of an n×n×n matmul."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - t))
    return best


def make_inputs(cfg: FusionConfig, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    px = torch.randint(0, 256, (batch, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8, device="cuda")
    ids = torch.randint(4, cfg.vocab_size, (batch, cfg.max_text_len), device="cuda")
    mask = torch.ones_like(ids)
    mask[:, cfg.max_text_len // 2 :] = 0
    return px, ids, mask


def item_forward(model: torch.nn.Module, px: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The three engines in sequence, as one served item."""
    feats, _ = model.encode_image(px)
    tfeats, _ = model.encode_text(ids, mask)
    logits, _, _ = model.fuse(feats, tfeats, mask)
    return logits


def flops_per_item(model: torch.nn.Module, cfg: FusionConfig) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    px, ids, mask = make_inputs(cfg, 4)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        item_forward(model, px, ids, mask)
    return fc.get_total_flops() / 4


def time_fn(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def bench_preset(name: str, budget_s: float) -> dict:
    cfg = FusionConfig.preset(name)
    model = build_model(cfg).cuda().eval()
    flops = flops_per_item(model, cfg)
    # FP32 weights under autocast: matmuls and convs run in FP16, norms and softmax in FP32.
    rows = []
    t_end = time.time() + budget_s
    for batch in BATCHES:
        if time.time() > t_end:
            break
        px, ids, mask = make_inputs(cfg, batch)
        row: dict = {"batch": batch}
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            eager = time_fn(lambda px=px, ids=ids, mask=mask: item_forward(model, px, ids, mask), reps=20)
            row["eager_fp16_ms"] = round(eager * 1e3, 3)
            row["eager_fp16_items_s"] = round(batch / eager, 1)
            try:
                g = torch.cuda.CUDAGraph()
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(3):
                        item_forward(model, px, ids, mask)
                torch.cuda.current_stream().wait_stream(s)
                with torch.cuda.graph(g):
                    item_forward(model, px, ids, mask)
                graph = time_fn(g.replay, reps=50)
                row["cuda_graph_fp16_ms"] = round(graph * 1e3, 3)
                row["cuda_graph_fp16_items_s"] = round(batch / graph, 1)
            except Exception as e:  # record, never hide
                row["cuda_graph_error"] = repr(e)[:300]
        rows.append(row)
    return {"preset": name, "flops_per_item": flops, "rows": rows}


def bench_onnxruntime_cuda(name: str) -> dict:
    try:
        import onnxruntime as ort
    except ImportError:
        return {"skipped": "onnxruntime not installed"}
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"skipped": f"onnxruntime has no CUDA provider (providers: {ort.get_available_providers()})"}
    return {"skipped": "not measured in this script version"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="loadtests/results/gpu.json")
    p.add_argument("--budget-s", type=float, default=120.0, help="time budget per preset")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU visible: run this on a GPU machine")
    torch.backends.cuda.matmul.allow_tf32 = True
    result = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "fp16_matmul_flops": matmul_ceiling(torch.float16),
        "bf16_matmul_flops": matmul_ceiling(torch.bfloat16),
        "presets": [],
    }
    for name in ("small", "base"):
        r = bench_preset(name, a.budget_s)
        best = max((row.get("cuda_graph_fp16_items_s", row["eager_fp16_items_s"]) for row in r["rows"]), default=0)
        r["best_items_s"] = best
        r["efficiency_vs_fp16_ceiling"] = round(best * r["flops_per_item"] / result["fp16_matmul_flops"], 4)
        r["onnxruntime_cuda"] = bench_onnxruntime_cuda(name)
        result["presets"].append(r)
        print(json.dumps(r), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "presets"}))


if __name__ == "__main__":
    main()
