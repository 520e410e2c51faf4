"""Run the naive baseline: `python -m loadtests.baseline --checkpoint tiny --port 8090 [--precision int8]`.

One uvicorn worker per core by default (a worker is a process with its own model copy).
"""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="tiny", help="tiny, small, base or a checkpoint folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="uvicorn workers (default: one per core)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                   help="int8: torch.ao.quantization.quantize_dynamic on the Linear layers")
    args = p.parse_args(argv)
    os.environ["VTFUSE_BASELINE_CHECKPOINT"] = args.checkpoint
    os.environ["VTFUSE_BASELINE_THREADS"] = str(args.threads)
    os.environ["VTFUSE_BASELINE_PRECISION"] = args.precision
    uvicorn.run(
        "loadtests.baseline.app:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
