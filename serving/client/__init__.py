"""Python clients of the vtfuse API: HTTP (sync and async, httpx) and gRPC."""

from serving.client.errors import ApiError
from serving.client.grpc_client import VtfuseGrpcClient
from serving.client.http_client import AsyncVtfuseClient, VtfuseClient

__all__ = ["ApiError", "AsyncVtfuseClient", "VtfuseClient", "VtfuseGrpcClient"]
