#!/bin/sh
# Init container of the Triton pod: render the model repository for this node into $VTFUSE_REPO.
# tensorrt: build (or reuse from $VTFUSE_PLAN_CACHE) plans on this pod's GPU, check them against
# ONNX Runtime, install; onnxruntime: install the ONNX engines. Exit codes as `vtfuse export`.
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
# The baked ONNX folder is read-only; the engine stage writes engines.json next to the graphs.
work="${TMPDIR:-/tmp}/onnx/${preset}"
rm -rf "$work" && mkdir -p "$work" && cp -R "/opt/vtfuse/build/onnx/${preset}/." "$work/"
if [ "$target" = "tensorrt" ]; then
  python -m serving.cli export engine --checkpoint "$preset" --onnx-dir "$work" --cache-dir "$cache"
fi
if [ -z "$imports" ]; then
  exec python -m serving.cli export install --checkpoint "$preset" --onnx-dir "$work" --target "$target" --repo "$repo"
fi
python -m serving.cli export install --checkpoint "$preset" --onnx-dir "$work" --target "$target" --repo "$repo"
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
