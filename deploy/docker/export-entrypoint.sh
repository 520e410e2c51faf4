#!/bin/sh
# Render a model repository into $VTFUSE_REPO. onnxruntime (the cpu overlay's init container):
# install the ONNX engines; torch (gpu-torch): the Python-backend models that run the PyTorch
# engines on CUDA; tensorrt (the gpu overlay's `trt-plans` Job): build (or reuse from
# $VTFUSE_PLAN_CACHE) plans on this pod's GPU, check them against ONNX Runtime, install.
# Exit codes as `vtfuse export`.
#
# With $VTFUSE_PLAN_DIR set (the Job), the repository goes to $VTFUSE_PLAN_DIR/repository on the
# shared plan volume, built in a scratch folder and moved there whole, and READY (JSON: GPU,
# TensorRT version, the sha256 of each model's manifest.json) is written last; Triton pods wait
# for READY and verify against it (verify-plans.py). A plan dir that already has READY is kept
# (exit 0). $VTFUSE_GPU_PRODUCT, when set, must name this node's GPU (nvidia.com/gpu.product).
#
# Then, for each NAME=SOURCE of $VTFUSE_IMPORT_HF (space-separated; empty: none), import that
# Hugging Face checkpoint next to them: `vtfuse import-hf SOURCE --name NAME --repo $VTFUSE_REPO
# --target T`, T the export target (on tensorrt pods: FP16 plans built on this pod's GPU,
# cached in $VTFUSE_PLAN_CACHE, judged against the fp32 ONNX engines). SOURCE is a
# `save_pretrained` folder mounted into this container (or a hub id, where the pod can reach
# the hub). A failed import fails the container (exit 1, the reason on stderr); a pair that is
# not NAME=SOURCE exits 2 before anything runs.
set -eu
target="${VTFUSE_EXPORT_TARGET:-tensorrt}"
repo="${VTFUSE_REPO:-/models}"
cache="${VTFUSE_PLAN_CACHE:-/plan-cache}"
preset="${VTFUSE_PRESET:-tiny}"
imports="${VTFUSE_IMPORT_HF:-${IMPORT_HF:-}}"
set -f  # the pairs are split on spaces, never globbed
for pair in $imports; do
  case "$pair" in
    ?*=?*) ;;
    *) echo "VTFUSE_IMPORT_HF: '$pair' is not NAME=SOURCE (e.g. blip-base=/hf/blip-itm-base-coco)" >&2; exit 2 ;;
  esac
done
set +f
plan_dir="${VTFUSE_PLAN_DIR:-}"
if [ -n "$plan_dir" ]; then
  if [ -f "$plan_dir/READY" ]; then
    echo "$plan_dir/READY exists: plans for this GPU type, TensorRT version and release are built"
    exit 0
  fi
  if [ -n "${VTFUSE_GPU_PRODUCT:-}" ]; then
    python - "$VTFUSE_GPU_PRODUCT" <<'PY'
import re, sys
from export.engine import gpu_name
name, product = gpu_name(), sys.argv[1]
a, b = (re.sub(r"[^a-z0-9.]+", "-", s.lower()).strip("-") for s in (name, product))
if not (a == b or b.startswith(a + "-")):
    sys.exit(f"this node's GPU is {name!r}, the overlay's gpu-product is {product!r}: plans would be misfiled")
PY
  fi
  final_repo="$plan_dir/repository"
  repo="$plan_dir/.repository.$$"
  mkdir -p "$plan_dir" && rm -rf "$repo"
fi
# The baked ONNX folder is read-only; the engine stage writes engines.json next to the graphs.
work="${TMPDIR:-/tmp}/onnx/${preset}"
rm -rf "$work" && mkdir -p "$work" && cp -R "${VTFUSE_ONNX_SRC:-/opt/vtfuse/build/onnx}/${preset}/." "$work/"
if [ "$target" = "tensorrt" ]; then
  python -m serving.cli export engine --checkpoint "$preset" --onnx-dir "$work" --cache-dir "$cache"
fi
# torch renders its Python-backend models from the checkpoint: the whole pipeline, on the CPU.
stage=install
if [ "$target" = "torch" ]; then stage=all; fi
if [ -z "$imports" ] && [ -z "$plan_dir" ]; then
  exec python -m serving.cli export "$stage" --checkpoint "$preset" --onnx-dir "$work" --target "$target" --repo "$repo"
fi
python -m serving.cli export "$stage" --checkpoint "$preset" --onnx-dir "$work" --target "$target" --repo "$repo"
# transformers and huggingface_hub keep their cache under HF_HOME; the image's user has no home folder.
export HF_HOME="${HF_HOME:-${TMPDIR:-/tmp}/huggingface}"
# A scratch folder, emptied before and after each import.
import_work="${VTFUSE_IMPORT_WORK:-${TMPDIR:-/tmp}/import-hf}"
set -f
for pair in $imports; do
  name="${pair%%=*}"
  src="${pair#*=}"
  # The ONNX files of one import (fp32 and int8) live in the work dir until it is installed.
  rm -rf "$import_work" && mkdir -p "$import_work"
  python -m serving.cli import-hf "$src" --name "$name" --repo "$repo" --target "$target" \
    --work-dir "$import_work" --cache-dir "$cache"
  rm -rf "$import_work"
done
if [ -n "$plan_dir" ]; then
  # Whole or nothing: move the finished repository into place, then write READY.
  rm -rf "$final_repo" && mv "$repo" "$final_repo"
  python - "$plan_dir" <<'PY'
import hashlib, json, os, sys, time
from pathlib import Path
import tensorrt
from export.engine import gpu_name
plan_dir = Path(sys.argv[1])
manifests = {p.parent.parent.name: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted((plan_dir / "repository").glob("*/[0-9]*/manifest.json"))}
ready = {"gpu": gpu_name(), "gpu_product": os.environ.get("VTFUSE_GPU_PRODUCT", ""),
         "tensorrt": tensorrt.__version__, "release": os.environ.get("VTFUSE_RELEASE", ""),
         "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "manifests": manifests}
tmp = plan_dir / ".READY.tmp"
tmp.write_text(json.dumps(ready, indent=2) + "\n")
tmp.rename(plan_dir / "READY")
print(f"{plan_dir / 'READY'}: {len(manifests)} models, {ready['gpu']}, TensorRT {ready['tensorrt']}")
PY
fi
