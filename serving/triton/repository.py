"""Is a model repository built? Every model has what its backend loads, whatever the target it was built for.

`vtfuse export install` and `vtfuse import-hf` write a `manifest.json` into each model's version
folder they build; Python-backend models need it (their `model.py` is committed, so it proves
nothing), native backends need their model file (`model.onnx`, `model.plan`, `model.pt`), ensembles
nothing. `make triton|serve REPOSITORY=DIR` serve a built DIR as it is, of any target (embedded,
onnxruntime, torch, libtorch, tensorrt), and refuse an incomplete one with what is missing, instead
of exporting the embedded engines into it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

MANIFEST = "manifest.json"
# The file a native backend loads from a version folder when the config names none.
NATIVE_FILES = {
    "onnxruntime_onnx": "model.onnx",
    "onnxruntime": "model.onnx",
    "tensorrt_plan": "model.plan",
    "tensorrt": "model.plan",
    "pytorch_libtorch": "model.pt",
    "pytorch": "model.pt",
}


def _versions(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def missing_artefacts(repository: str | Path) -> list[str]:
    """What each model of `repository` lacks to load (empty: built); `repository` itself missing is one entry."""
    repo = Path(repository)
    if not repo.is_dir():
        return [f"{repo} is not a folder"]
    problems = []
    models = [d for d in sorted(repo.iterdir()) if (d / "config.pbtxt").is_file()]
    if not models:
        return [f"{repo} holds no model (no */config.pbtxt)"]
    for d in models:
        config = text_format.Parse((d / "config.pbtxt").read_text(), mc.ModelConfig(), allow_unknown_field=True)
        kind = config.platform or config.backend
        if kind == "ensemble":
            continue
        versions = _versions(d)
        if kind == "python":
            if not any((v / MANIFEST).is_file() for v in versions):
                problems.append(f"{d.name}: no version folder with {MANIFEST} (not installed)")
            continue
        wanted = config.default_model_filename or NATIVE_FILES.get(kind, "")
        if wanted and not any((v / wanted).exists() for v in versions):
            problems.append(f"{d.name}: no version folder with {wanted}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """`python -m serving.triton.repository DIR`: exit 0 when built, 1 (saying what is missing) when not."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("repository")
    args = p.parse_args(argv)
    problems = missing_artefacts(args.repository)
    if problems:
        print(f"{args.repository} is not a built model repository: " + "; ".join(problems[:8])
              + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else "")
              + ". Build it (`vtfuse export all --target TARGET --repo DIR`, then any `vtfuse import-hf … --repo DIR`),"
              " or leave REPOSITORY out to build and serve model_repository/.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
