"""Python clients of the vtfuse API: HTTP (sync and async, httpx) and gRPC (sync and async), typed results.

Needs only httpx, grpcio and protobuf: `pip install 'vtfuse[client]'` (no Ray, Triton, torch).
"""

from serving.client.captions import AsyncCaptionStream, CaptionStream, GenerationParameters
from serving.client.errors import (
    ApiConnectionError,
    ApiError,
    AuthenticationError,
    BadRequest,
    DeadlineExceeded,
    Overloaded,
    PayloadTooLarge,
    ServerError,
    Unavailable,
)
from serving.client.grpc_client import AsyncVtfuseGrpcClient, VtfuseGrpcClient
from serving.client.http_client import AsyncVtfuseClient, VtfuseClient
from serving.client.results import (
    Answer,
    CaptionEvent,
    CaptionResult,
    CaptionUsage,
    EmbedResult,
    MatchResult,
    ModelInfo,
    ModelList,
    RetrieveHit,
    RetrieveResult,
    VqaAnswer,
    VqaResult,
)
from serving.client.retry import Retry

__all__ = [
    "Answer",
    "ApiConnectionError",
    "ApiError",
    "AsyncCaptionStream",
    "AsyncVtfuseClient",
    "AsyncVtfuseGrpcClient",
    "AuthenticationError",
    "BadRequest",
    "CaptionEvent",
    "CaptionResult",
    "CaptionStream",
    "CaptionUsage",
    "DeadlineExceeded",
    "EmbedResult",
    "GenerationParameters",
    "MatchResult",
    "ModelInfo",
    "ModelList",
    "Overloaded",
    "PayloadTooLarge",
    "Retry",
    "RetrieveHit",
    "RetrieveResult",
    "ServerError",
    "Unavailable",
    "VqaAnswer",
    "VqaResult",
    "VtfuseClient",
    "VtfuseGrpcClient",
]
