"""`caption` and `caption_stream` on the four clients, and `vtfuse caption`, against small real servers.

A threaded `http.server` answers /v1/caption from a script (JSON, or a `text/event-stream` of
events, or one that never ends), and a `grpc.server` plays Caption and CaptionStream the same
way; each notes when its client went away. The clients are the real ones.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest

from serving.client import (
    ApiConnectionError,
    AsyncVtfuseClient,
    AsyncVtfuseGrpcClient,
    BadRequest,
    CaptionEvent,
    CaptionResult,
    DeadlineExceeded,
    Overloaded,
    Retry,
    Unavailable,
    VtfuseClient,
    VtfuseGrpcClient,
)
from serving.client import cli as client_cli
from serving.proto import vtfuse_pb2 as pb
from serving.proto import vtfuse_pb2_grpc as pb_grpc

FAST = Retry(max_retries=3, backoff_s=0.01, max_backoff_s=0.05)
RESULT = {
    "model": "tiny",
    "caption": "a red circle",
    "token_ids": [30522, 1037, 2417, 4418, 102],
    "finish_reason": "stop",
    "usage": {"prompt_tokens": 1, "generated_tokens": 4},
    "request_id": "srv-1",
}
# The last event's delta holds text the token events held back: the deltas still add up to the caption.
TOKENS = [
    {"index": 0, "token_id": 1037, "delta": "a"},
    {"index": 1, "token_id": 2417, "delta": " red"},
    {"index": 2, "token_id": 4418, "delta": ""},
    {"index": 3, "token_id": 102, "delta": ""},
]
EVENTS = [*TOKENS, {"delta": " circle", **RESULT}]
ERROR = {"error": {"code": "overloaded", "message": "the queue is full"}}


def _error(code: str, message: str = "scripted") -> dict:
    return {"error": {"code": code, "message": message}}


# ---------------------------------------------------------------- a scripted HTTP API


@dataclass
class Reply:
    """One answer: JSON (`body`), or an event stream (`events`), which `endless` keeps going until the client leaves."""

    status: int = 200
    body: dict | None = None
    events: list[dict] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    endless: bool = False


@dataclass
class HttpApi:
    script: list[Reply] = field(default_factory=list)
    bodies: list[dict] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    left: threading.Event = field(default_factory=threading.Event)  # a client went away mid-stream
    url: str = ""


@pytest.fixture
def http_api() -> Iterator[HttpApi]:
    api = HttpApi()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            api.bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            api.headers.append({k.lower(): v for k, v in self.headers.items()})
            reply = api.script.pop(0) if len(api.script) > 1 else api.script[0]
            self.send_response(reply.status)
            for k, v in reply.headers.items():
                self.send_header(k, v)
            self.send_header("x-request-id", self.headers.get("x-request-id", "server-made"))
            if reply.body is not None:
                data = json.dumps(reply.body).encode()
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            # HTTP/1.0 without a length: the body ends when the connection closes, as a stream's may.
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            try:
                for event in reply.events:
                    self.wfile.write(b": keep-alive\n\ndata: " + json.dumps(event).encode() + b"\n\n")
                    time.sleep(0.002)
                for i in range(1000 if reply.endless else 0):  # ~10 s at most
                    self.wfile.write(f'data: {{"index": {i}, "token_id": 7, "delta": " x"}}\n\n'.encode())
                    time.sleep(0.01)
            except (BrokenPipeError, ConnectionResetError):
                api.left.set()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield api
    server.shutdown()
    server.server_close()


def check_events(events: list[CaptionEvent], request_id: str = "srv-1") -> CaptionResult:
    """The events are the script's, typed; the deltas add up to the caption; returns the result."""
    assert [e.to_dict() for e in events] == EVENTS
    assert [(e.index, e.token_id) for e in events[:-1]] == [(t["index"], t["token_id"]) for t in TOKENS]
    assert not any(e.last for e in events[:-1]) and events[-1].last and events[-1].index is None
    result = events[-1].result
    assert result is not None and "".join(e.delta for e in events) == result.caption == "a red circle"
    assert (result.finish_reason, result.usage.generated_tokens, result.request_id) == ("stop", 4, request_id)
    return result


# ---------------------------------------------------------------- HTTP, sync


def test_http_caption_sends_only_the_parameters_given(http_api):
    http_api.script = [Reply(body=RESULT)]
    with VtfuseClient(http_api.url, api_key="k1") as c:
        out = c.caption(b"IMG", prompt="a picture of", max_new_tokens=5, do_sample=False, early_stopping="never")
        assert isinstance(out, CaptionResult) and out.to_dict() == RESULT
        assert (out.caption, out.token_ids, out.usage.prompt_tokens) == ("a red circle", RESULT["token_ids"], 1)
        c.caption(b"IMG", model="blip", temperature=None)
        with pytest.raises(TypeError, match="unknown generation parameter 'beams'"):
            c.caption(b"IMG", beams=3)  # type: ignore[call-arg]
    first, second = http_api.bodies
    assert base64.b64decode(first.pop("image")) == b"IMG"
    assert first == {"prompt": "a picture of", "max_new_tokens": 5, "do_sample": False, "early_stopping": "never"}
    assert set(second) == {"image", "model"}, "None means not given: the checkpoint's default"
    assert http_api.headers[0]["x-api-key"] == "k1"


def test_http_stream_events_add_up_to_the_caption(http_api):
    http_api.script = [Reply(events=EVENTS)]
    with VtfuseClient(http_api.url) as c:
        with c.caption_stream(b"IMG", prompt="a", num_beams=1) as stream:
            events = list(stream)
    check_events(events)
    assert stream.result == events[-1].result
    assert http_api.bodies[0]["stream"] is True and http_api.bodies[0]["num_beams"] == 1
    assert http_api.headers[0]["accept"] == "text/event-stream"


def test_http_unary_and_stream_retry_a_429_before_the_first_event(http_api):
    refusal = Reply(429, _error("overloaded"), headers={"Retry-After": "0"})
    http_api.script = [refusal, Reply(body=RESULT)]
    with VtfuseClient(http_api.url, retry=FAST) as c:
        assert c.caption(b"IMG", request_id="r1").caption == "a red circle"
        http_api.script = [refusal, Reply(events=EVENTS)]
        check_events(list(c.caption_stream(b"IMG", request_id="r2")))
    assert [h["x-request-id"] for h in http_api.headers] == ["r1", "r1", "r2", "r2"]


def test_http_stream_error_event_raises_its_class_and_is_not_retried(http_api):
    http_api.script = [Reply(events=[TOKENS[0], ERROR]), Reply(events=EVENTS)]
    seen = []
    with VtfuseClient(http_api.url, retry=FAST) as c:
        with pytest.raises(Overloaded) as e:
            for event in c.caption_stream(b"IMG", request_id="r3"):
                seen.append(event.delta)
    assert seen == ["a"], "the caller saw a token: the stream is not tried again"
    assert len(http_api.bodies) == 1
    assert (e.value.status, e.value.code, e.value.message, e.value.request_id) == (
        429,
        "overloaded",
        "the queue is full",
        "r3",
    )
    # An error event before any token event is retried like a refusal.
    http_api.script = [Reply(events=[_error("upstream_unavailable")]), Reply(events=EVENTS)]
    with VtfuseClient(http_api.url, retry=FAST) as c:
        check_events(list(c.caption_stream(b"IMG")))
    assert len(http_api.bodies) == 3


def test_http_stream_422_before_the_stream_and_a_cut_stream(http_api):
    http_api.script = [Reply(422, _error("schema_violation", "num_beams is 2: beam search cannot stream"))]
    with VtfuseClient(http_api.url, retry=FAST) as c:
        with pytest.raises(BadRequest, match="beam search cannot stream") as e:
            next(iter(c.caption_stream(b"IMG", num_beams=2)))
        assert e.value.status == 422 and len(http_api.bodies) == 1
        http_api.script = [Reply(events=TOKENS[:2])]  # the connection closes before the last event
        with pytest.raises(ApiConnectionError, match="after 2 events"):
            list(c.caption_stream(b"IMG"))
    assert len(http_api.bodies) == 2
    http_api.script = [Reply(events=[TOKENS[0], _error("upstream_timeout", "deadline passed")])]
    with VtfuseClient(http_api.url) as c, pytest.raises(DeadlineExceeded):
        list(c.caption_stream(b"IMG"))


@pytest.mark.parametrize("how", ["close", "break"])
def test_http_stream_closed_early_closes_the_connection(http_api, how):
    http_api.script = [Reply(events=TOKENS[:1], endless=True)]
    with VtfuseClient(http_api.url) as c:
        if how == "close":
            stream = c.caption_stream(b"IMG")
            assert next(stream).delta == "a"
            stream.close()
        else:
            for event in c.caption_stream(b"IMG"):
                assert event.delta == "a"
                break
        assert http_api.left.wait(5), "the server never saw the client go away"


# ---------------------------------------------------------------- HTTP, async


def test_async_http_caption_stream_retry_and_close(http_api):
    async def main() -> tuple[CaptionResult, list[CaptionEvent], list[str]]:
        async with AsyncVtfuseClient(http_api.url, retry=FAST, api_key="k2") as c:
            http_api.script = [Reply(503, _error("shutting_down"), headers={"Retry-After": "0"}), Reply(body=RESULT)]
            result = await c.caption(b"IMG", max_new_tokens=4)
            http_api.script = [Reply(429, _error("overloaded")), Reply(events=EVENTS)]
            async with c.caption_stream(b"IMG") as stream:
                events = [e async for e in stream]
            http_api.script = [Reply(events=[TOKENS[0], ERROR]), Reply(events=EVENTS)]
            seen: list[str] = []
            with pytest.raises(Overloaded):
                async for event in c.caption_stream(b"IMG"):
                    seen.append(event.delta)
            http_api.script = [Reply(422, _error("schema_violation", "top_p is 2"))]
            with pytest.raises(BadRequest, match="top_p is 2"):
                await c.caption_stream(b"IMG", top_p=2).__anext__()
            http_api.script = [Reply(events=TOKENS[:1], endless=True)]
            async with c.caption_stream(b"IMG") as stream:
                async for _ in stream:
                    break
            # Seen while the client is still open: leaving the stream's block closed its response.
            assert await asyncio.to_thread(http_api.left.wait, 5), "the server never saw the client go away"
            return result, events, seen

    result, events, seen = asyncio.run(main())
    assert result.to_dict() == RESULT and http_api.bodies[1]["max_new_tokens"] == 4
    check_events(events)
    assert seen == ["a"] and len(http_api.bodies) == 4 + 1 + 1 + 1, "no retry after a token arrived"
    assert http_api.headers[0]["x-api-key"] == "k2"


# ---------------------------------------------------------------- a scripted gRPC API


@dataclass
class Step:
    """One answer: a refusal (`status`, `code`) after `events`, or the events then the end; `endless` never ends."""

    status: str | None = None
    code: str = ""
    retry_after: str | None = None
    events: list[dict] = field(default_factory=list)
    endless: bool = False


def _event_proto(event: dict) -> pb.CaptionEvent:
    if "caption" not in event:
        return pb.CaptionEvent(**event)
    usage = pb.CaptionUsage(**event["usage"])
    result = pb.CaptionResponse(**{k: v for k, v in event.items() if k not in ("delta", "usage")}, usage=usage)
    return pb.CaptionEvent(delta=event["delta"], result=result)


class _Servicer(pb_grpc.VtfuseServicer):
    def __init__(self) -> None:
        self.script: list[Step] = []
        self.requests: list[Any] = []
        self.metadata: list[dict[str, str]] = []
        self.cancelled = threading.Event()

    def _step(self, request: Any, context: Any) -> Step:
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    def _refuse(self, step: Step, context: Any) -> None:
        meta = [("request_id", self.metadata[-1].get("request_id", "server-made")), ("error-code", step.code)]
        if step.retry_after is not None:
            meta.append(("retry-after", step.retry_after))
        context.set_trailing_metadata(meta)
        context.set_code(getattr(grpc.StatusCode, step.status or "OK"))
        context.set_details(f"{step.code}: scripted refusal")

    def Caption(self, request, context):  # noqa: N802 - gRPC name
        step = self._step(request, context)
        if step.status is not None:
            self._refuse(step, context)
            return pb.CaptionResponse()
        return _event_proto({"delta": "", **RESULT}).result

    def CaptionStream(self, request, context):  # noqa: N802 - gRPC name
        step = self._step(request, context)
        done = threading.Event()
        # The call ended before this handler did: the client cancelled it.
        context.add_callback(lambda: done.is_set() or self.cancelled.set())
        for event in step.events:
            yield _event_proto(event)
        for i in range(1000 if step.endless else 0):  # ~10 s at most
            yield pb.CaptionEvent(index=i, token_id=7, delta=" x")
            time.sleep(0.01)
        if step.status is not None:
            self._refuse(step, context)
        done.set()


@dataclass
class GrpcApi:
    servicer: _Servicer
    target: str


@pytest.fixture
def grpc_api() -> Iterator[GrpcApi]:
    servicer = _Servicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_VtfuseServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield GrpcApi(servicer, f"127.0.0.1:{port}")
    server.stop(grace=None)


def test_grpc_caption_sends_only_the_parameters_given_and_retries(grpc_api):
    grpc_api.servicer.script = [Step("RESOURCE_EXHAUSTED", "overloaded", "0"), Step()]
    with VtfuseGrpcClient(grpc_api.target, retry=FAST, api_key="k1") as c:
        out = c.caption(b"IMG", prompt="a picture of", request_id="g1", top_k=0, early_stopping=True, seed=7)
        assert out.to_dict() == RESULT
        c.caption(b"IMG", model="blip")
        with pytest.raises(TypeError, match="unknown generation parameter"):
            c.caption(b"IMG", beams=3)  # type: ignore[call-arg]
    first, _, second = grpc_api.servicer.requests
    assert first.image == b"IMG" and first.prompt == "a picture of" and first.HasField("prompt")
    p = first.parameters
    assert (p.top_k, p.early_stopping, p.seed) == (0, "true", 7) and p.HasField("top_k")
    assert not p.HasField("max_new_tokens") and not p.HasField("temperature"), "only the parameters given"
    assert second.model == "blip" and not second.HasField("prompt") and not second.HasField("parameters")
    assert [m["request_id"] for m in grpc_api.servicer.metadata[:2]] == ["g1", "g1"]
    assert grpc_api.servicer.metadata[0]["x-api-key"] == "k1"


def test_grpc_stream_retry_before_the_first_event_errors_after_it(grpc_api):
    grpc_api.servicer.script = [Step("UNAVAILABLE", "upstream_unavailable"), Step(events=EVENTS)]
    with VtfuseGrpcClient(grpc_api.target, retry=FAST) as c:
        with c.caption_stream(b"IMG", max_new_tokens=4) as stream:
            events = list(stream)
        check_events(events)
        assert stream.result is not None and stream.result.caption == "a red circle"
        assert not grpc_api.servicer.cancelled.is_set(), "read to its end, the call ends OK, not cancelled"
        assert len(grpc_api.servicer.requests) == 2
        assert grpc_api.servicer.requests[0].parameters.max_new_tokens == 4

        grpc_api.servicer.script = [Step("RESOURCE_EXHAUSTED", "overloaded", events=TOKENS[:1]), Step(events=EVENTS)]
        seen = []
        with pytest.raises(Overloaded) as e:
            for event in c.caption_stream(b"IMG", request_id="g2"):
                seen.append(event.delta)
        assert seen == ["a"] and len(grpc_api.servicer.requests) == 3, "not retried once a token arrived"
        assert (e.value.status, e.value.code, e.value.request_id) == ("RESOURCE_EXHAUSTED", "overloaded", "g2")

        grpc_api.servicer.script = [Step("INVALID_ARGUMENT", "schema_violation")]
        with pytest.raises(BadRequest, match="scripted refusal"):
            next(c.caption_stream(b"IMG", num_beams=2))
        assert len(grpc_api.servicer.requests) == 4
        grpc_api.servicer.script = [Step(events=TOKENS[:2])]
        with pytest.raises(ApiConnectionError, match="after 2 events"):
            list(c.caption_stream(b"IMG"))


@pytest.mark.parametrize("how", ["close", "break"])
def test_grpc_stream_closed_early_cancels_the_call(grpc_api, how):
    grpc_api.servicer.script = [Step(events=TOKENS[:1], endless=True)]
    with VtfuseGrpcClient(grpc_api.target) as c:
        if how == "close":
            with c.caption_stream(b"IMG") as stream:
                assert next(stream).delta == "a"
        else:
            for event in c.caption_stream(b"IMG"):
                assert event.delta == "a"
                break
        assert grpc_api.servicer.cancelled.wait(5), "the server never saw the call cancelled"


def test_async_grpc_caption_stream_retry_and_cancel(grpc_api):
    async def main() -> tuple[CaptionResult, list[CaptionEvent], list[str]]:
        async with AsyncVtfuseGrpcClient(grpc_api.target, retry=FAST) as c:
            grpc_api.servicer.script = [Step("UNAVAILABLE", "shutting_down", "0"), Step()]
            result = await c.caption(b"IMG", temperature=0.5, do_sample=True)
            grpc_api.servicer.script = [Step("RESOURCE_EXHAUSTED", "overloaded"), Step(events=EVENTS)]
            events = [e async for e in c.caption_stream(b"IMG")]
            grpc_api.servicer.script = [Step("UNAVAILABLE", "upstream_unavailable", events=TOKENS[:1]), Step()]
            seen: list[str] = []
            with pytest.raises(Unavailable):
                async for event in c.caption_stream(b"IMG"):
                    seen.append(event.delta)
            grpc_api.servicer.script = [Step("INVALID_ARGUMENT", "schema_violation")]
            with pytest.raises(BadRequest):
                await c.caption_stream(b"IMG").__anext__()
            grpc_api.servicer.script = [Step(events=TOKENS[:1], endless=True)]
            async with c.caption_stream(b"IMG") as stream:
                async for _ in stream:
                    break
            # Seen while the channel is still open: leaving the stream's block cancelled the call.
            assert await asyncio.to_thread(grpc_api.servicer.cancelled.wait, 5), "the call was never cancelled"
            return result, events, seen

    result, events, seen = asyncio.run(main())
    assert result.caption == "a red circle"
    p = grpc_api.servicer.requests[0].parameters
    assert (p.temperature, p.do_sample) == (0.5, True) and not p.HasField("top_p")
    check_events(events)
    assert seen == ["a"] and len(grpc_api.servicer.requests) == 2 + 2 + 1 + 1 + 1


# ---------------------------------------------------------------- the CLI


class Stdout:
    """A stdout that notes what each flush pushed out."""

    def __init__(self) -> None:
        self.text = ""
        self.flushed: list[str] = []
        self._mark = 0

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        if len(self.text) > self._mark:
            self.flushed.append(self.text[self._mark :])
            self._mark = len(self.text)


def vtfuse(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    client_cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_caption_streams_deltas_and_prints_json(http_api, tmp_path, capsys, monkeypatch):
    img = tmp_path / "x.png"
    img.write_bytes(b"IMG")
    url = ["--url", http_api.url]
    http_api.script = [Reply(events=EVENTS)]
    out = Stdout()
    monkeypatch.setattr("sys.stdout", out)
    argv = ["caption", str(img), "--stream", "--prompt", "a", "--max-new-tokens", "9", "--do-sample", *url]
    assert vtfuse([*argv, "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9", "--seed", "3"]) == 0
    assert out.text == "a red circle\n"
    assert out.flushed[:3] == ["a", " red", " circle"], "each delta is flushed as it arrives"
    body = http_api.bodies[-1]
    assert {k: body[k] for k in ("stream", "prompt", "max_new_tokens", "do_sample", "temperature")} == {
        "stream": True,
        "prompt": "a",
        "max_new_tokens": 9,
        "do_sample": True,
        "temperature": 0.7,
    }
    assert (body["top_k"], body["top_p"], body["seed"]) == (5, 0.9, 3) and "num_beams" not in body
    monkeypatch.undo()

    http_api.script = [Reply(body=RESULT)]
    assert vtfuse(["caption", str(img), "--json", "--num-beams", "3", "--no-do-sample", *url]) == 0
    assert json.loads(capsys.readouterr().out) == RESULT
    assert http_api.bodies[-1]["num_beams"] == 3 and http_api.bodies[-1]["do_sample"] is False
    assert "stream" not in http_api.bodies[-1]
    assert vtfuse(["caption", str(img), *url]) == 0 and capsys.readouterr().out == "a red circle\n"

    http_api.script = [Reply(events=EVENTS)]
    assert vtfuse(["caption", str(img), "--stream", "--json", *url]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == RESULT and captured.err == "a red circle\n", "--json: stdout is the JSON"

    http_api.script = [Reply(events=[TOKENS[0], ERROR])]
    assert vtfuse(["caption", str(img), "--stream", "--retries", "0", *url]) == 1
    captured = capsys.readouterr()
    assert captured.out == "a\n" and "429 overloaded: the queue is full" in captured.err


def test_cli_caption_over_grpc(grpc_api, tmp_path, capsys):
    img = tmp_path / "x.png"
    img.write_bytes(b"IMG")
    grpc_api.servicer.script = [Step(events=EVENTS)]
    assert vtfuse(["caption", str(img), "--stream", "--grpc", grpc_api.target, "--repetition-penalty", "1.5"]) == 0
    assert capsys.readouterr().out == "a red circle\n"
    p = grpc_api.servicer.requests[-1].parameters
    assert p.repetition_penalty == 1.5 and not p.HasField("num_beams")
    grpc_api.servicer.script = [Step()]
    assert vtfuse(["caption", str(img), "--json", "--grpc", grpc_api.target, "--no-repeat-ngram-size", "2"]) == 0
    assert json.loads(capsys.readouterr().out) == RESULT
    assert grpc_api.servicer.requests[-1].parameters.no_repeat_ngram_size == 2
