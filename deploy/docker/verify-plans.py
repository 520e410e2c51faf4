#!/usr/bin/env python3
"""Wait for the TensorRT plans of this pod's GPU type on the shared plan volume, then verify them.

Runs as the Triton pod's init container (gpu overlay), in the Triton image, standard library only.
The `trt-plans` Job renders a model repository for one GPU product and TensorRT version into
`<plan dir>/repository/` and writes `<plan dir>/READY` last (JSON: gpu, gpu_product, tensorrt,
release, the sha256 of each model's manifest.json). This waits for READY (up to --wait-s),
then checks: the plans were built for the GPU product the pod was scheduled for and for the
TensorRT release the Triton image loads (major.minor), this pod's GPU (nvidia-smi) is that
product, and every file each manifest lists has its recorded sha256.

Exit 0: Triton may load the repository; 1: a mismatch (the message says which and what to do);
2: no READY before the deadline (is the Job running? `kubectl -n vtfuse logs job/trt-plans`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path


def slug(name: str) -> str:
    """A GPU name as GPU Feature Discovery writes `nvidia.com/gpu.product` (spaces to '-'), lower case."""
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


def same_product(gpu_name: str, product: str) -> bool:
    """Whether a GPU name (nvidia-smi) is the product label (which may add -SHARED or -MIG-...)."""
    a, b = slug(gpu_name), slug(product)
    return a == b or b.startswith(a + "-")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def local_gpu() -> str:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=60, check=True).stdout.strip()
    if not out:
        raise OSError("nvidia-smi lists no GPU")
    return out.splitlines()[0].strip()


def wait_ready(plan_dir: Path, wait_s: float, poll_s: float) -> dict | None:
    deadline = time.monotonic() + wait_s
    while True:
        ready = plan_dir / "READY"
        if ready.exists():
            return json.loads(ready.read_text())
        if time.monotonic() >= deadline:
            return None
        print(f"waiting for {ready} (the trt-plans Job writes it last)", flush=True)
        time.sleep(poll_s)


def verify(plan_dir: Path, ready: dict, product: str, tensorrt: str, gpu: str | None) -> list[str]:
    """Problems with the plans in plan_dir (empty: Triton may load them)."""
    problems = []
    if not same_product(ready.get("gpu", ""), product):
        problems.append(f"plans were built on a {ready.get('gpu')!r}, this pod was scheduled for {product!r}")
    built = str(ready.get("tensorrt", ""))
    if not (built == tensorrt or built.startswith(tensorrt + ".")):
        problems.append(f"plans were built by TensorRT {built}, the Triton image loads {tensorrt}: "
                        "rebuild them with the export image of the same NGC release")
    if gpu is not None and not same_product(gpu, product):
        problems.append(f"this pod's GPU is a {gpu!r}, not {product!r}: fix the gpu-product the overlay sets")
    repo = plan_dir / "repository"
    manifests = ready.get("manifests") or {}
    if not manifests:
        problems.append(f"{plan_dir / 'READY'} lists no models")
    for model, want in sorted(manifests.items()):
        path = repo / model
        found = sorted(path.glob("[0-9]*/manifest.json"))
        if not found:
            problems.append(f"{model}: no manifest.json under {path}")
            continue
        manifest_path = found[-1]
        if sha256(manifest_path) != want:
            problems.append(f"{manifest_path}: sha256 differs from READY's")
            continue
        manifest = json.loads(manifest_path.read_text())
        trt = manifest.get("tensorrt")
        if trt and gpu is not None and not same_product(gpu, trt.get("gpu", "")):
            problems.append(f"{model}: plan built on {trt.get('gpu')!r}, this GPU is {gpu!r}")
        for rel, digest in sorted((manifest.get("artefacts") or {}).items()):
            f = manifest_path.parent / rel
            if not f.is_file():
                problems.append(f"{model}: {rel} is missing")
            elif sha256(f) != digest:
                problems.append(f"{model}: {rel} does not match its manifest's sha256")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan-dir", required=True, type=Path)
    p.add_argument("--gpu-product", required=True, help="the nvidia.com/gpu.product the pod was scheduled on")
    p.add_argument("--tensorrt", required=True, help="TensorRT major.minor of the Triton image, e.g. 10.5")
    p.add_argument("--wait-s", type=float, default=3600.0)
    p.add_argument("--poll-s", type=float, default=10.0)
    p.add_argument("--gpu-name", help="this pod's GPU name (default: ask nvidia-smi); 'none' skips that check")
    args = p.parse_args(argv)
    ready = wait_ready(args.plan_dir, args.wait_s, args.poll_s)
    if ready is None:
        print(f"no {args.plan_dir / 'READY'} after {args.wait_s:.0f} s: is the trt-plans Job for "
              f"{args.gpu_product} running? (kubectl -n vtfuse logs job/trt-plans)", file=sys.stderr)
        return 2
    try:
        gpu = None if args.gpu_name == "none" else (args.gpu_name or local_gpu())
    except (OSError, subprocess.SubprocessError) as e:
        print(f"cannot read this pod's GPU name (nvidia-smi: {e})", file=sys.stderr)
        return 1
    problems = verify(args.plan_dir, ready, args.gpu_product, args.tensorrt, gpu)
    for line in problems:
        print(f"FAILED {line}", file=sys.stderr)
    if not problems:
        print(f"ok: {len(ready['manifests'])} models in {args.plan_dir / 'repository'}, built on {ready['gpu']} "
              f"with TensorRT {ready['tensorrt']}", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
