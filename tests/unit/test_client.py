"""The Python clients and `vtfuse ask` against mocked transports: bodies sent, errors raised, output printed."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json

import grpc
import httpx
import pytest

from serving.client import ApiError, AsyncVtfuseClient, Overloaded, VqaResult, VtfuseClient
from serving.client import cli as client_cli
from serving.client.grpc_client import _api_error
from serving.client.retry import Retry

VQA_OK = {
    "model": "tiny",
    "answers": [
        {
            "question": "how many circles are there?",
            "answer": "2",
            "score": 0.9,
            "top_k": [{"answer": "2", "score": 0.9}, {"answer": "3", "score": 0.05}],
        }
    ],
}


def transport(seen: list[httpx.Request], status: int = 200, body: dict | None = None, headers=None):
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, json=body if body is not None else VQA_OK, headers=headers)

    return handler


def test_sync_client_sends_base64_json_and_request_id(tmp_path):
    img = tmp_path / "x.png"
    img.write_bytes(b"PNGDATA")
    seen: list[httpx.Request] = []
    with VtfuseClient("http://api", transport=httpx.MockTransport(transport(seen))) as c:
        out = c.vqa(img, ["how many circles are there?"], top_k=2, request_id="rid-9")
    assert out == VqaResult.from_json(VQA_OK, "rid-9") and out.to_dict()["answers"] == VQA_OK["answers"]
    assert (out.answer, out.score, [t.answer for t in out.top_k], out.request_id) == ("2", 0.9, ["2", "3"], "rid-9")
    (req,) = seen
    body = json.loads(req.content)
    assert req.url.path == "/v1/vqa" and req.headers["x-request-id"] == "rid-9"
    assert base64.b64decode(body["image"]) == b"PNGDATA" and body["top_k"] == 2 and "model" not in body


def test_sync_client_multipart_and_other_calls():
    seen: list[httpx.Request] = []
    body = {"model": "tiny", "answers": [], "scores": [0.5], "results": []}
    body |= {"image_embeddings": [], "text_embeddings": []}
    c = VtfuseClient("http://api", transport=httpx.MockTransport(transport(seen, body=body)))
    c.vqa_multipart(b"IMG", ["q1", "q2"])
    assert seen[-1].headers["content-type"].startswith("multipart/form-data")
    assert seen[-1].content.count(b'name="question"') == 2
    assert c.match(b"IMG", ["a"]).scores == [0.5]
    c.retrieve_texts(b"IMG", ["a", "b"], top_k=1)
    c.retrieve_images("a red circle", [b"A", b"B"], top_k=1)
    c.embed(texts=["a"])
    paths = [r.url.path for r in seen]
    assert paths == ["/v1/vqa", "/v1/match", "/v1/retrieve", "/v1/retrieve", "/v1/embed"]
    assert json.loads(seen[3].content)["text"] == "a red circle" and len(json.loads(seen[3].content)["images"]) == 2


def test_errors_raise_api_error_with_code_message_and_retry_after():
    err = {"error": {"code": "overloaded", "message": "retry later"}}
    seen: list[httpx.Request] = []
    c = VtfuseClient(
        "http://api",
        transport=httpx.MockTransport(transport(seen, 429, err, {"Retry-After": "1", "X-Request-ID": "r1"})),
        retry=Retry(max_retries=0),
    )
    with pytest.raises(Overloaded) as e:
        c.embed(texts=["a"])
    assert isinstance(e.value, ApiError)
    assert (e.value.status, e.value.code, e.value.message, e.value.request_id, e.value.retry_after) == (
        429,
        "overloaded",
        "retry later",
        "r1",
        1.0,
    )


def test_async_client():
    seen: list[httpx.Request] = []

    async def main():
        async with AsyncVtfuseClient("http://api", transport=httpx.MockTransport(transport(seen))) as c:
            return await asyncio.gather(*(c.vqa(b"IMG", ["q"]) for _ in range(3)))

    results = asyncio.run(main())
    assert [r.answers for r in results] == [VqaResult.from_json(VQA_OK).answers] * 3 and len(seen) == 3
    assert len({r.request_id for r in results}) == 3, "each call gets its own request id"


class _RpcError(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.INVALID_ARGUMENT

    def details(self):
        return "schema_violation: questions is empty: send at least one"

    def trailing_metadata(self):
        return (("request_id", "r2"), ("error-code", "schema_violation"))


def test_grpc_errors_become_api_errors():
    e = _api_error(_RpcError())
    assert (e.status, e.code, e.message, e.request_id) == (
        "INVALID_ARGUMENT",
        "schema_violation",
        "questions is empty: send at least one",
        "r2",
    )


def test_ask_prints_the_answer(tmp_path, capsys, monkeypatch):
    img = tmp_path / "x.png"
    img.write_bytes(b"PNGDATA")

    class Fake(VtfuseClient):
        def __init__(self, url, timeout, **kwargs):
            super().__init__(url, timeout, transport=httpx.MockTransport(transport([])), **kwargs)

    monkeypatch.setattr("serving.client.http_client.VtfuseClient", Fake)
    parser = argparse.ArgumentParser()
    client_cli.register(parser.add_subparsers())
    args = parser.parse_args(["ask", str(img), "how many circles are there?", "--top-k", "2"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == "2 (0.90; 3 0.05)"


def test_ask_reports_connection_errors(tmp_path, capsys):
    img = tmp_path / "x.png"
    img.write_bytes(b"PNGDATA")
    parser = argparse.ArgumentParser()
    client_cli.register(parser.add_subparsers())
    args = parser.parse_args(["ask", str(img), "q", "--url", "http://127.0.0.1:9", "--timeout", "2", "--retries", "0"])
    assert args.func(args) == 1
    assert "error" in capsys.readouterr().err
