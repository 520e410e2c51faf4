"""`vtfuse import-hf SOURCE --name NAME [--repo REPO] [--precision fp32|int8]`: import a Hugging Face checkpoint."""

from __future__ import annotations

import argparse
import json
import sys

from serving.families import supported_architectures

EXIT_OK, EXIT_FAILED, EXIT_SKIPPED = 0, 1, 3


def _run(args: argparse.Namespace) -> int:
    from export.errors import EngineUnavailable, ExportError
    from export.hf.importer import import_hf
    from serving.families import UnsupportedArchitecture

    try:
        result = import_hf(
            args.source,
            args.name,
            repo=args.repo,
            precision=args.precision,
            target=args.target,
            work_dir=args.work_dir,
            threads=args.threads,
            plan_cache=args.cache_dir,
        )
    except EngineUnavailable as e:
        print(f"SKIP import-hf: {e}", file=sys.stderr)
        return EXIT_SKIPPED
    except (ExportError, UnsupportedArchitecture, FileNotFoundError, ValueError, OSError) as e:
        print(f"FAILED import-hf: {e}", file=sys.stderr)
        return EXIT_FAILED
    json.dump(result, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `import-hf` subcommand."""
    p = sub.add_parser(
        "import-hf",
        help="import a Hugging Face checkpoint (BLIP retrieval, ViLT VQA) into a Triton model repository",
        description=f"Supported architectures: {', '.join(supported_architectures())}. Exports each engine to "
        "ONNX, checks parity with transformers, installs next to what REPO holds; `vtfuse serve` then serves "
        "it under NAME.",
    )
    p.add_argument("source", help="a save_pretrained folder, or a hub id (needs internet or the hub cache)")
    p.add_argument("--name", required=True, help="served model name (the `model` field of requests)")
    p.add_argument("--repo", default=None, help="Triton model repository (default model_repository/)")
    p.add_argument(
        "--precision",
        choices=("fp32", "int8"),
        default=None,
        help="engine precision (default: int8 for the embedded CPU target where its checks pass, else fp32)",
    )
    p.add_argument(
        "--target",
        choices=("embedded", "onnxruntime", "tensorrt", "torch", "libtorch"),
        default="embedded",
        help="embedded (Python backend over ONNX Runtime), onnxruntime (NGC container's backend), tensorrt "
        "(FP16 plans, built on the GPU machine that serves them; exit 3 where TensorRT or a GPU is missing), "
        "torch (the checkpoint's PyTorch modules in the Python backend: FP16 autocast on a GPU, FP32 on the CPU) "
        "or libtorch (the modules traced to TorchScript for the NGC container's PyTorch backend; the embedded "
        "server cannot serve it)",
    )
    p.add_argument(
        "--work-dir",
        default=None,
        help="where ONNX files and parity.json go (default: a temporary folder, removed afterwards)",
    )
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads for the parity runs")
    p.add_argument("--cache-dir", default=None, help="TensorRT plan cache (--target tensorrt; default build/trt_cache)")
    p.set_defaults(func=_run)
