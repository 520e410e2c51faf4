"""`vtfuse triton`: run tritonserver alone on a model repository, in the foreground."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from serving.procs import PortInUse, SignalRelay
from serving.triton.launcher import DEFAULT_REPOSITORY, TritonServer, TritonSettings


def run_triton(args: argparse.Namespace) -> int:
    """Start Triton, print its URLs, stay in the foreground until SIGINT/SIGTERM, then drain and stop.

    A port another process holds is refused at once (exit 2), naming the port and its holder.
    """
    settings = TritonSettings(
        repository=Path(args.repository).resolve(),
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        host=args.host,
        exit_timeout_s=args.exit_timeout,
        restrict_apis=args.restrict_apis,
    )
    stop = threading.Event()
    SignalRelay(lambda _signum: stop.set()).install()  # not Event.set in a signal handler (SignalRelay says why)
    server = TritonServer(settings)
    try:
        server.start()
        server.wait_ready()
        print(f"Triton ready: HTTP {server.url_http}  gRPC {server.url_grpc}  metrics {server.url_metrics}", flush=True)
        while not stop.wait(1.0):
            if server.poll() is not None:
                return server.poll() or 1
        return 0
    except PortInUse as e:
        print(f"vtfuse triton: not started: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        server.stop()


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    """Triton's port/host/repository flags, shared by `triton` and `serve`."""
    p.add_argument("--repository", default=str(DEFAULT_REPOSITORY))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--exit-timeout", type=int, default=30, help="seconds Triton drains in-flight requests")
    p.add_argument("--restrict-apis", action="store_true", help="model-control APIs need $TRITON_ADMIN_KEY")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `triton` subcommand."""
    p = sub.add_parser("triton", help="run tritonserver alone on the model repository (foreground)")
    add_server_arguments(p)
    p.set_defaults(func=run_triton)
