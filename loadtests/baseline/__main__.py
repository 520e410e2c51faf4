"""Run the naive baseline: `python -m loadtests.baseline --checkpoint tiny --port 8090 [--precision int8]`.

One worker per core by default (a worker is a process with its own model copy), each listening on the
port with SO_REUSEPORT (loadtests/baseline/workers.py says why; `--balance shared` is uvicorn's workers).
"""

from __future__ import annotations

import argparse
import os
import sys

from loadtests.baseline.workers import BALANCES, run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="tiny", help="tiny, small, base or a checkpoint folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: one per core)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                   help="int8: torch.ao.quantization.quantize_dynamic on the Linear layers")
    p.add_argument("--balance", choices=BALANCES, default="reuseport",
                   help="reuseport: a socket per worker, the kernel spreads connections; shared: uvicorn's workers")
    args = p.parse_args(argv)
    os.environ["VTFUSE_BASELINE_CHECKPOINT"] = args.checkpoint
    os.environ["VTFUSE_BASELINE_THREADS"] = str(args.threads)
    os.environ["VTFUSE_BASELINE_PRECISION"] = args.precision
    return run("loadtests.baseline.app:app", args.host, args.port, args.workers, args.balance)


if __name__ == "__main__":
    sys.exit(main())
