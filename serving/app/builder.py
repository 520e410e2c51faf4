"""`build_app`: the Serve import path (`serving.app.builder:build_app`) that turns typed args into the application.

No `from __future__ import annotations` here: Serve reads the parameter's annotation at
run time to validate the YAML `args:` into `AppArgs`.
"""

import logging
from typing import Any

from ray.serve import Application

from serving.app.health import HEALTH_SERVICER_FUNCTION
from serving.app.health import available as health_available
from serving.app.ingress import Ingress
from serving.app.preprocess import PreprocessDeployment
from serving.app.settings import AppArgs

log = logging.getLogger(__name__)

APP_NAME = "vtfuse"
SERVICER_FUNCTION = "serving.proto.vtfuse_pb2_grpc.add_VtfuseServicer_to_server"


def build_app(args: AppArgs) -> Application:
    """Build the Serve application: Ingress (HTTP + gRPC), plus Preprocess unless `preprocess: inline`.

    Replica counts and CPUs come from `args.deployments`; a Serve config's `deployments:`
    section overrides them (and `max_ongoing_requests`, autoscaling, ...).

    Args:
        args: the application's settings (a dict from YAML is validated into AppArgs).
    """
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args or {})
    args = args.with_env()
    d = args.deployments
    ingress = Ingress.options(  # type: ignore[attr-defined]
        num_replicas=d.ingress_replicas, ray_actor_options={"num_cpus": d.ingress_num_cpus}
    )
    if args.preprocess == "inline":
        return ingress.bind(args, None)
    pre = PreprocessDeployment.options(  # type: ignore[attr-defined]
        num_replicas=d.preprocess_replicas,
        ray_actor_options={"num_cpus": d.preprocess_num_cpus},
        max_ongoing_requests=max(64, 4 * args.preprocess_max_batch_size),
    ).bind(args)
    return ingress.bind(args, pre)


def serve_options(http_host: str, http_port: int, grpc_port: int) -> dict[str, Any]:
    """`serve.start` options: HTTP proxy address, gRPC proxy port with our servicer and the gRPC health one."""
    health_servicer = [HEALTH_SERVICER_FUNCTION] if health_available() else []
    return {
        "http_options": {"host": http_host, "port": http_port},
        "grpc_options": {"port": grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION, *health_servicer]},
    }
