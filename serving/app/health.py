"""The standard gRPC health service (`grpc.health.v1.Health`) on the API's gRPC port, answered by the Ingress.

Ray Serve's gRPC proxy routes `/grpc.health.v1.Health/Check` to the Ingress replica like any
other method (`HEALTH_SERVICER_FUNCTION` is in `grpc_servicer_functions`), so the answer is
the same as `/readyz`: SERVING when every Triton engine the default model routes to is ready,
NOT_SERVING while Triton is not ready or the replica is draining (SIGTERM). The service names
answered are "" (the whole server) and `vtfuse.v1.Vtfuse`; any other name is NOT_FOUND.
`Watch` sends the current status and ends the stream (an open stream would hold a replica's
request slot); probes (Kubernetes `grpc:`, grpc-health-probe) use Check.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from serving.proto import vtfuse_pb2 as pb

if TYPE_CHECKING:
    from grpc_health.v1 import health_pb2

HEALTH_SERVICER_FUNCTION = "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"
API_SERVICE = pb.DESCRIPTOR.services_by_name["Vtfuse"].full_name  # vtfuse.v1.Vtfuse
SERVICES = frozenset({"", API_SERVICE})


def available() -> bool:
    """Whether `grpcio-health-checking` is installed (the `server` extra): only then is the service offered."""
    return importlib.util.find_spec("grpc_health") is not None


async def check(
    service: str, draining: bool, ready: Callable[[], Awaitable[bool]], grpc_context: Any = None
) -> health_pb2.HealthCheckResponse:
    """Health of `service`: NOT_FOUND (as the call's status) for a name not served, else SERVING / NOT_SERVING."""
    from grpc_health.v1 import health_pb2

    if service not in SERVICES:
        if grpc_context is not None:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {service!r}: ask for '' or {API_SERVICE!r}")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
    if draining or not await ready():
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
    return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
