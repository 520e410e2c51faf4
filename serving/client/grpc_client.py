"""gRPC client of the API on Ray Serve's gRPC proxy (port 9000): typed protos in and out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from serving.client.errors import ApiError, read_image
from serving.client.http_client import Image
from serving.proto import vtfuse_pb2 as pb
from serving.proto import vtfuse_pb2_grpc as pb_grpc


def _api_error(e: grpc.RpcError) -> ApiError:
    """A failed call → ApiError with the status name, the API's error code and the request id."""
    meta = dict(e.trailing_metadata() or ())  # type: ignore[attr-defined]
    details = e.details() or ""  # type: ignore[attr-defined]
    code = str(meta.get("error-code") or details.split(":", 1)[0] or "grpc_error")
    message = details.split(": ", 1)[1] if ": " in details else details
    retry = meta.get("retry-after")
    return ApiError(
        e.code().name,
        code,
        message,
        meta.get("request_id"),  # type: ignore[attr-defined]
        float(retry) if retry and str(retry).isdigit() else None,
    )


class VtfuseGrpcClient:
    """Synchronous gRPC client; each method returns the response proto.

    Example:
        >>> c = VtfuseGrpcClient("127.0.0.1:9000")
        >>> c.vqa(open("shapes.png", "rb").read(), ["how many circles are there?"]).answers[0].answer
    """

    def __init__(
        self,
        target: str = "127.0.0.1:9000",
        timeout: float = 30.0,
        application: str | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.timeout = timeout
        self.application = application
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
            ],
        )
        self._stub = pb_grpc.VtfuseStub(self._channel)

    def _call(self, method: str, request: Any, request_id: str | None) -> Any:
        metadata = []
        if self.application:
            metadata.append(("application", self.application))
        if request_id:
            metadata.append(("request_id", request_id))
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout, metadata=metadata or None)
        except grpc.RpcError as e:
            raise _api_error(e) from None

    def vqa(
        self,
        image: Image,
        questions: Sequence[str],
        top_k: int = 1,
        model: str = "",
        return_attention: bool = False,
        request_id: str | None = None,
    ) -> pb.VqaResponse:
        """Answer questions about one image."""
        req = pb.VqaRequest(
            image=read_image(image),
            questions=list(questions),
            top_k=top_k,
            model=model,
            return_attention=return_attention,
        )
        return self._call("Vqa", req, request_id)

    def match(
        self, image: Image, texts: Sequence[str], model: str = "", request_id: str | None = None
    ) -> pb.MatchResponse:
        """ITM probability of each text for one image."""
        return self._call("Match", pb.MatchRequest(image=read_image(image), texts=list(texts), model=model), request_id)

    def retrieve_texts(
        self, image: Image, texts: Sequence[str], top_k: int = 1, model: str = "", request_id: str | None = None
    ) -> pb.RetrieveResponse:
        """Rank texts for an image."""
        req = pb.RetrieveRequest(image=read_image(image), texts=list(texts), top_k=top_k, model=model)
        return self._call("Retrieve", req, request_id)

    def retrieve_images(
        self, text: str, images: Sequence[Image], top_k: int = 1, model: str = "", request_id: str | None = None
    ) -> pb.RetrieveResponse:
        """Rank images for a text."""
        req = pb.RetrieveRequest(text=text, images=[read_image(i) for i in images], top_k=top_k, model=model)
        return self._call("Retrieve", req, request_id)

    def embed(
        self, images: Sequence[Image] = (), texts: Sequence[str] = (), model: str = "", request_id: str | None = None
    ) -> pb.EmbedResponse:
        """Image and/or text embeddings."""
        req = pb.EmbedRequest(images=[read_image(i) for i in images], texts=list(texts), model=model)
        return self._call("Embed", req, request_id)

    def list_models(self, request_id: str | None = None) -> pb.ListModelsResponse:
        """The served models with their tasks, engines, precision, source and parity (ListModels)."""
        return self._call("ListModels", pb.ListModelsRequest(), request_id)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> VtfuseGrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
