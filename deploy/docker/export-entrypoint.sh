#!/bin/sh
# Init container of the Triton pod: render the model repository for this node into $VTFUSE_REPO.
# tensorrt: build (or reuse from $VTFUSE_PLAN_CACHE) plans on this pod's GPU, check them against
# ONNX Runtime, install; onnxruntime: install the ONNX engines. Exit codes as `vtfuse export`.
set -eu
target="${VTFUSE_EXPORT_TARGET:-tensorrt}"
repo="${VTFUSE_REPO:-/models}"
cache="${VTFUSE_PLAN_CACHE:-/plan-cache}"
preset="${VTFUSE_PRESET:-tiny}"
# The baked ONNX folder is read-only; the engine stage writes engines.json next to the graphs.
work="${TMPDIR:-/tmp}/onnx/${preset}"
rm -rf "$work" && mkdir -p "$work" && cp -R "/opt/vtfuse/build/onnx/${preset}/." "$work/"
if [ "$target" = "tensorrt" ]; then
  python -m serving.cli export engine --checkpoint "$preset" --onnx-dir "$work" --cache-dir "$cache"
fi
exec python -m serving.cli export install --checkpoint "$preset" --onnx-dir "$work" --target "$target" --repo "$repo"
