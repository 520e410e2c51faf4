"""`vtfuse train` and `vtfuse export onnx|check|quantize|engine|install|all`: the export pipeline's subcommands.

Each stage's function returns an exit code: 0 done, 1 failed (parity, a missing stage, a bad
checkpoint), 3 skipped because TensorRT or a GPU is missing here (the reason on stderr). Results
are printed to stdout as JSON. Stages are imported when run, so `vtfuse --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_SKIPPED = 0, 1, 3
TARGETS = ("embedded", "onnxruntime", "tensorrt", "torch", "libtorch")


def _print(result: Any) -> None:
    json.dump(result, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _onnx_dir(args: argparse.Namespace) -> Path:
    from export.onnx_export import default_onnx_dir

    return Path(args.onnx_dir) if args.onnx_dir else default_onnx_dir(args.checkpoint)


def _train(args: argparse.Namespace) -> int:
    from export.train import CaptionSettings, TrainSettings, train_stages

    settings = TrainSettings(
        samples=args.samples, epochs=args.epochs, max_minutes=args.max_minutes, seed=args.seed, threads=args.threads
    )
    caption = CaptionSettings(max_minutes=args.caption_max_minutes, seed=args.seed, threads=args.threads)
    report = train_stages(args.stage, settings, caption, args.out)
    result: dict[str, Any] = {"out": args.out}
    if args.stage != "caption":
        result.update(heldout=report["heldout"], train_minutes_total=report["train_minutes_total"])
    if "caption" in report and args.stage != "towers":
        c = report["caption"]
        result["caption"] = {"heldout": c["heldout"], "train_minutes_total": c["train_minutes_total"]}
    _print(result)
    return EXIT_OK


def _stage_onnx(args: argparse.Namespace) -> dict[str, Any]:
    from export.onnx_export import ExportSettings, export_onnx, load_source

    ckpt = load_source(args.checkpoint)
    settings = ExportSettings(opset=args.opset) if args.opset else ExportSettings()
    return export_onnx(ckpt, _onnx_dir(args), settings, source=args.checkpoint)


def _stage_check(args: argparse.Namespace) -> dict[str, Any]:
    from export.check import check_parity, summary, write_report
    from export.onnx_export import load_source

    ckpt = load_source(args.checkpoint)
    onnx_dir = _onnx_dir(args)
    try:
        report = check_parity(ckpt, onnx_dir, batch=args.batch, n_real=args.samples, threads=args.threads)
    except Exception as e:
        figures = getattr(e, "figures", None)
        if figures:  # a ParityError: keep the figures for the post-mortem
            write_report(figures, onnx_dir)
        raise
    write_report(report, onnx_dir)
    out = {"ok": report["ok"], "worst": summary(report), "end_to_end": report["end_to_end"]}
    if "caption" in report:
        out["caption"] = {k: report["caption"][k] for k in ("n", "equal", "agreement")}
    return out


def _stage_quantize(args: argparse.Namespace) -> dict[str, Any]:
    from export.quantize import quantize

    report = quantize(_onnx_dir(args), n=args.quantize_samples, threads=args.threads)
    return {k: report[k] for k in ("ok", "n", "figures", "bytes")}


def _precision(args: argparse.Namespace) -> str:
    from export.install import DEFAULT_PRECISION

    return str(args.precision or DEFAULT_PRECISION[args.target])


def _stage_engine(args: argparse.Namespace) -> dict[str, Any]:
    from export.engine import DEFAULT_CACHE, build_engines
    from export.render_repo import COMMITTED_REPO

    return build_engines(
        _onnx_dir(args),
        source_repo=args.source_repo or COMMITTED_REPO,
        cache_root=args.cache_dir or DEFAULT_CACHE,
        fp16=not args.no_fp16,
        check=not args.no_check,
    )


def _stage_install(args: argparse.Namespace) -> dict[str, Any]:
    from export.install import install
    from export.render_repo import COMMITTED_REPO

    source_repo = args.source_repo or COMMITTED_REPO
    return install(_onnx_dir(args), args.target, repo=args.repo, version=args.version, source_repo=source_repo,
                   precision=_precision(args))


def _run(stage: str, fn: Any, args: argparse.Namespace) -> tuple[int, Any]:
    """Run one stage; map the pipeline's errors to exit codes with the message on stderr."""
    from export.errors import EngineUnavailable, ExportError
    from serving import progress
    from serving.errors import VtfuseError

    try:
        with progress.stage(f"export {stage}"):  # elapsed time on a terminal, start/done lines in logs
            return EXIT_OK, fn(args)
    except EngineUnavailable as e:
        print(f"SKIP {stage}: {e}", file=sys.stderr)
        return EXIT_SKIPPED, {"skipped": str(e)}
    except (ExportError, VtfuseError, FileNotFoundError, ValueError) as e:
        print(f"FAILED {stage}: {e}", file=sys.stderr)
        return EXIT_FAILED, {"error": str(e)}


def _single(stage: str, fn: Any) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        code, result = _run(stage, fn, args)
        _print(result)
        return code

    return run


def _all(args: argparse.Namespace) -> int:
    """Stages 1-4 for one target.

    Stage 2b (int8) runs for `--precision int8`, the embedded default; stage 3 runs for
    `tensorrt` only, and its SKIP is an error there.
    """
    results: dict[str, Any] = {"onnx_dir": str(_onnx_dir(args)), "target": args.target}
    for stage, fn in (("onnx", _stage_onnx), ("check", _stage_check)):
        code, results[stage] = _run(stage, fn, args)
        if code:
            _print(results)
            return code
    if _precision(args) == "int8":
        code, results["quantize"] = _run("quantize", _stage_quantize, args)
        if code:
            _print(results)
            return code
    if args.target == "tensorrt":
        code, results["engine"] = _run("engine", _stage_engine, args)
        if code:
            _print(results)
            return code
    else:
        served = {"torch": "PyTorch engines", "libtorch": "TorchScript engines"}.get(args.target, "ONNX")
        skipped = f"target {args.target} serves {served}; TensorRT plans are for --target tensorrt"
        results["engine"] = {"skipped": skipped}
        log.info("stage 3 (engine) skipped: %s", results["engine"]["skipped"])
    code, results["install"] = _run("install", _stage_install, args)
    _print(results)
    return code


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        default="tiny",
        help="tiny (the shipped, trained one), small, base, random:<preset>, or a checkpoint folder (default tiny)",
    )
    p.add_argument("--onnx-dir", help="stage-1 folder (default build/onnx/<preset>/)")


def _repo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source-repo", help="the committed repository to render from (default model_repository/)")


def _check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=5, help="batch of the random inputs")
    p.add_argument("--samples", type=int, default=8, help="rendered scenes of the real inputs")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: one per core)")


def _quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize-samples", type=int, default=200,
                   help="fresh renders the int8 engines are judged on against fp32 (default 200)")


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", help="plan cache root, per GPU and TensorRT version (default build/trt_cache/)")
    p.add_argument("--no-fp16", action="store_true", help="build FP32 plans")
    p.add_argument("--no-check", action="store_true", help="skip the plan-vs-ONNX Runtime parity check")


def _install_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", choices=TARGETS, default="embedded", help="repository kind (default embedded)")
    p.add_argument("--repo", help="destination (default model_repository/ or build/model_repository-<target>/)")
    p.add_argument("--version", type=int, default=1, help="version folder (default 1)")
    p.add_argument("--precision", choices=("fp32", "int8"), default=None,
                   help="engines to install: fp32, or the dynamic-int8 ones of `export quantize` "
                   "(default: int8 for embedded, fp32 for the NGC targets, torch and libtorch)")


def register(subparsers: Any) -> None:
    """Add `train` and `export` (with its stage subcommands) to the `vtfuse` CLI."""
    t = subparsers.add_parser("train", help="stage 0: train the tiny checkpoint on the shapes world (CPU)")
    t.add_argument("--out", default="checkpoints/tiny")
    t.add_argument("--samples", type=int, default=60_000)
    t.add_argument("--epochs", type=float, default=4.0)
    t.add_argument("--max-minutes", type=float, default=55.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--stage", choices=("all", "towers", "caption"), default="all",
                   help="all: the towers, then the caption decoder on them (default); towers alone; or the "
                   "caption decoder alone, on the towers already in --out")
    t.add_argument("--caption-max-minutes", type=float, default=9.0,
                   help="time cap of the caption stage, rendering included (default 9)")
    t.set_defaults(func=_train)

    e = subparsers.add_parser("export", help="export a checkpoint: onnx → check → engine → install")
    stages = e.add_subparsers(dest="stage", required=True)
    p = stages.add_parser("onnx", help="stage 1: export the three engines to ONNX")
    _common(p)
    p.add_argument("--opset", type=int, help="ONNX opset (default 17)")
    p.set_defaults(func=_single("onnx", _stage_onnx))

    p = stages.add_parser("check", help="stage 2: ONNX Runtime vs PyTorch parity; writes parity.json")
    _common(p)
    _check_args(p)
    p.set_defaults(func=_single("check", _stage_check))

    p = stages.add_parser("quantize", help="stage 2b: dynamic-int8 engines judged against fp32; writes int8/")
    _common(p)
    _quantize_args(p)
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: one per core)")
    p.set_defaults(func=_single("quantize", _stage_quantize))

    p = stages.add_parser("engine", help="stage 3: TensorRT plans (exit 3 where TensorRT or a GPU is missing)")
    _common(p)
    _repo_args(p)
    _engine_args(p)
    p.set_defaults(func=_single("engine", _stage_engine))

    p = stages.add_parser("install", help="stage 4: install into a model repository with manifests")
    _common(p)
    _repo_args(p)
    _install_args(p)
    p.set_defaults(func=_single("install", _stage_install))

    p = stages.add_parser("all", help="stages 1-4 for one target")
    _common(p)
    p.add_argument("--opset", type=int, help="ONNX opset (default 17)")
    _check_args(p)
    _quantize_args(p)
    _repo_args(p)
    _engine_args(p)
    _install_args(p)
    p.set_defaults(func=_all)
