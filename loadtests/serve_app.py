"""Run the vtfuse Ray Serve application in front of an existing Triton, for benchmarks; stops cleanly on SIGTERM.

    python -m loadtests.serve_app --triton-url 127.0.0.1:8001 --repository model_repository --http-port 8080

It starts a new local Ray cluster of its own (never joins one already running; `num_cpus` =
cores) with the application built by `serving.app.builder:build_app`; the served model is
named after `--model`. `--front` picks the HTTP front door as `VTFUSE_FRONT` does for `vtfuse
serve` (serving/app/front.py): `haproxy` (HAProxy in front of the replicas, the default) or `ray` (Ray's proxy).
serving.app.proxy's middleware runs as under `vtfuse serve` (`--no-proxy-middleware`: without it).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from serving.app.front import DEFAULT_FRONT, FRONTS

log = logging.getLogger("loadtests.serve_app")


def _stop(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--triton-url", required=True)
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--model", default="tiny", help="name requests use for the repository's preset")
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("--grpc-port", type=int, default=0, help="Serve gRPC proxy port (0: a free one)")
    p.add_argument("--preprocess", choices=("deployment", "inline"), default="inline")
    p.add_argument("--ingress-replicas", type=int, default=2)
    p.add_argument("--preprocess-replicas", type=int, default=1)
    p.add_argument("--pool-size", type=int, default=2, help="gRPC channels to Triton per ingress replica")
    p.add_argument("--front", choices=FRONTS, default=DEFAULT_FRONT, help="HTTP front door (VTFUSE_FRONT)")
    p.add_argument("--no-proxy-middleware", action="store_true", help="front ray: without serving.app.proxy")
    p.add_argument("--haproxy-dir", type=Path, help="front haproxy: folder for HAProxy's files")
    p.add_argument("--no-access-log", action="store_true", help="Serve's per-request access log off (proxy, replicas)")
    p.add_argument("--server-vqa", default="vqa",
                   help="Triton model for one-question /v1/vqa calls (ModelSpec.vqa); empty: off")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _stop)

    import ray
    from ray import serve

    from loadtests.servers import REPO_ROOT
    from serving.app.builder import APP_NAME, build_app, serve_options
    from serving.app.settings import AppArgs, DeploymentDefaults, ModelSpec
    from serving.procs import free_port, reserve_ports

    reserve_ports(p for p in (args.http_port, args.grpc_port) if p)  # HAProxy's and Serve's own picks avoid them
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    # Ray's processes inherit the front door's environment, as under `vtfuse serve` (serving.app.cli).
    if not args.no_proxy_middleware:
        from serving.app.proxy import CALLBACK
        from serving.app.settings import Limits

        os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] = CALLBACK
        os.environ.setdefault("VTFUSE_PROXY_MAX_INFLIGHT", str(args.ingress_replicas * Limits().max_inflight))
    from serving.app.ray_background import background_environment

    os.environ.update(background_environment())  # as under `vtfuse serve`
    if args.front == "haproxy":
        from serving.app.front import haproxy_environment

        os.environ.update(haproxy_environment(args.haproxy_dir))
    else:
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "0"  # Ray's proxy, whatever the caller's environment says
    app_args = AppArgs(
        triton_url=args.triton_url,
        triton_pool_size=args.pool_size,
        repository=str(args.repository.resolve()),
        models={args.model: ModelSpec(vqa=args.server_vqa or None)},
        default_model=args.model,
        preprocess=args.preprocess,
        deployments=DeploymentDefaults(
            ingress_replicas=args.ingress_replicas, preprocess_replicas=args.preprocess_replicas
        ),
        log_level="WARNING",
    )
    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
             namespace="vtfuse-bench")
    try:
        logging_config = {"enable_access_log": False} if args.no_access_log else None
        serve.start(**serve_options("127.0.0.1", args.http_port, args.grpc_port or free_port()),
                    logging_config=logging_config)
        serve.run(build_app(app_args), name=APP_NAME, route_prefix="/", logging_config=logging_config)
        log.info("serving on http://127.0.0.1:%d", args.http_port)
        while True:
            time.sleep(3600)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
