"""The clients against small real servers: retries with backoff that honour Retry-After, TLS, the API key.

A threaded `http.server` and a `grpc.server` on free local ports play the API from a script
of answers (a 429 with `Retry-After: 1`, then a 200...); the clients are the real ones.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import random
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from serving.app.auth import check_api_key, presented_key
from serving.cli import main
from serving.client import (
    ApiConnectionError,
    AsyncVtfuseClient,
    AsyncVtfuseGrpcClient,
    AuthenticationError,
    BadRequest,
    Overloaded,
    PayloadTooLarge,
    Retry,
    Unavailable,
    VqaResult,
    VtfuseClient,
    VtfuseGrpcClient,
)
from serving.errors import Unauthorized
from serving.procs import free_port
from serving.proto import vtfuse_pb2 as pb
from serving.proto import vtfuse_pb2_grpc as pb_grpc

VQA_OK = {
    "model": "tiny",
    "answers": [{"question": "q", "answer": "2", "score": 0.9, "top_k": [{"answer": "2", "score": 0.9}]}],
}
FAST = Retry(max_retries=3, backoff_s=0.01, max_backoff_s=0.05)


# ---------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Pki:
    ca_pem: Path
    cert_pem: bytes
    key_pem: bytes


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A self-made CA and a server certificate it signed for localhost and 127.0.0.1."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vtfuse test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = tmp_path_factory.mktemp("pki") / "ca.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Pki(ca_pem, cert.public_bytes(serialization.Encoding.PEM), key_pem)


# ---------------------------------------------------------------- a scripted HTTP API


@dataclass
class HttpApi:
    """Answers POST/GET with the next (status, headers, body) of `script`; the last one repeats."""

    script: list[tuple[int, dict[str, str], dict]]
    seen: list[dict[str, str]] = field(default_factory=list)
    bodies: list[dict] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def http_api(request: pytest.FixtureRequest, pki: Pki) -> Iterator[HttpApi]:
    api = HttpApi(script=[])
    tls = getattr(request, "param", "plain") == "tls"

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length)
            api.bodies.append(json.loads(raw) if raw.startswith(b"{") else {})
            api.seen.append({k.lower(): v for k, v in self.headers.items()})
            api.times.append(time.monotonic())
            status, headers, body = api.script.pop(0) if len(api.script) > 1 else api.script[0]
            data = json.dumps(body).encode()
            self.send_response(status)
            for k, v in {"content-type": "application/json", **headers}.items():
                self.send_header(k, v)
            self.send_header("content-length", str(len(data)))
            self.send_header("x-request-id", self.headers.get("x-request-id", "server-made"))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer  # noqa: N815 - http.server's names

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert_file = pki.ca_pem.parent / "server.pem"
        cert_file.write_bytes(pki.cert_pem + pki.key_pem)
        ctx.load_cert_chain(cert_file)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    api.url = f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield api
    server.shutdown()
    server.server_close()


def _error(code: str, message: str = "try again") -> dict:
    return {"error": {"code": code, "message": message}}


def test_backoff_is_capped_jittered_and_never_shorter_than_retry_after():
    policy = Retry(max_retries=5, backoff_s=0.5, max_backoff_s=4.0, max_retry_after_s=30)
    rng = random.Random(0)
    for retry, cap in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 4.0)]:
        waits = [policy.delay(retry, rng=rng) for _ in range(200)]
        assert all(cap / 2 <= w <= cap for w in waits), (retry, min(waits), max(waits))
        assert max(waits) - min(waits) > cap / 4, "jittered, not one fixed wait"
    assert policy.delay(6) is None, "gives up after max_retries"
    assert all(3.0 <= policy.delay(1, retry_after=3.0, rng=rng) <= 3.25 for _ in range(100))
    assert policy.delay(1, retry_after=31) is None, "a wait longer than max_retry_after_s is not waited"
    assert Retry(max_retries=0).delay(1) is None


def test_http_429_is_retried_after_the_servers_retry_after(http_api):
    http_api.script = [(429, {"Retry-After": "1"}, _error("overloaded")), (200, {}, VQA_OK)]
    with VtfuseClient(http_api.url, retry=FAST, api_key="k1") as c:
        out = c.vqa(b"IMG", ["q"], request_id="rid-1")
    assert isinstance(out, VqaResult) and out.answer == "2" and out.request_id == "rid-1"
    assert len(http_api.seen) == 2 and http_api.times[1] - http_api.times[0] >= 1.0
    assert [h["x-request-id"] for h in http_api.seen] == ["rid-1", "rid-1"], "one id for every try of a call"
    assert all(presented_key(h) == "k1" for h in http_api.seen), "the server's auth reads the key the client sends"


def test_http_503_without_retry_after_backs_off_then_succeeds(http_api):
    http_api.script = [(503, {}, _error("upstream_unavailable")), (503, {}, _error("shutting_down")), (200, {}, VQA_OK)]
    policy = Retry(max_retries=3, backoff_s=0.2, max_backoff_s=1.0)
    with VtfuseClient(http_api.url, retry=policy) as c:
        assert c.vqa(b"IMG", ["q"]).score == 0.9
    gaps = [b - a for a, b in zip(http_api.times, http_api.times[1:])]
    assert len(gaps) == 2 and 0.1 <= gaps[0] <= 0.5 and 0.2 <= gaps[1] <= 0.8, gaps


def test_http_gives_up_after_max_retries_with_a_typed_error(http_api):
    http_api.script = [(429, {"Retry-After": "0"}, _error("rate_limited", "slow down"))]
    with VtfuseClient(http_api.url, retry=Retry(max_retries=2, backoff_s=0.01)) as c:
        with pytest.raises(Overloaded) as e:
            c.embed(texts=["a"], request_id="rid-2")
    assert len(http_api.seen) == 3
    assert (e.value.status, e.value.code, e.value.message, e.value.request_id, e.value.retry_after) == (
        429,
        "rate_limited",
        "slow down",
        "rid-2",
        0.0,
    )


def test_http_does_not_retry_a_bad_request_or_a_long_retry_after(http_api):
    http_api.script = [(422, {}, _error("schema_violation", "texts is empty"))]
    with VtfuseClient(http_api.url, retry=FAST) as c:
        with pytest.raises(BadRequest, match="texts is empty"):
            c.match(b"IMG", [])
        assert len(http_api.seen) == 1
        http_api.script = [(503, {"Retry-After": "3600"}, _error("shutting_down"))]
        with pytest.raises(Unavailable) as e:
            c.match(b"IMG", ["a"])
    assert len(http_api.seen) == 2 and e.value.retry_after == 3600


def test_http_connection_refused_is_retried_then_raised():
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with VtfuseClient(url, retry=Retry(max_retries=2, backoff_s=0.2, max_backoff_s=0.4)) as c:
        with pytest.raises(ApiConnectionError, match="is the API running"):
            c.models()
    assert time.monotonic() - t0 >= 0.1 + 0.2, "waited between the tries"


def test_async_http_client_retries_and_returns_typed_results(http_api):
    http_api.script = [(503, {"Retry-After": "0"}, _error("upstream_unavailable")), (200, {}, VQA_OK)]

    async def main():
        async with AsyncVtfuseClient(http_api.url, retry=FAST, api_key="k2") as c:
            return await c.vqa(b"IMG", ["q"])

    out = asyncio.run(main())
    assert out.top_k[0].answer == "2" and len(http_api.seen) == 2 and http_api.seen[0]["x-api-key"] == "k2"


@pytest.mark.parametrize("http_api", ["tls"], indirect=True)
def test_http_tls_with_a_private_ca(http_api, pki):
    http_api.script = [(200, {}, {"default": "tiny", "models": []})]
    with VtfuseClient(http_api.url, ca_cert=pki.ca_pem) as c:
        assert c.models().default == "tiny"
    with VtfuseClient(http_api.url, retry=Retry(max_retries=0)) as c:  # the system's CAs do not know it
        with pytest.raises(ApiConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            c.models()


# ---------------------------------------------------------------- a scripted gRPC API


class _Servicer(pb_grpc.VtfuseServicer):
    """Vqa answers from a script of (status name or None, error code, retry-after); checks the API key."""

    def __init__(self) -> None:
        self.script: list[tuple[str | None, str, str | None]] = []
        self.metadata: list[dict[str, str]] = []
        self.keys: list[str] = []

    def Vqa(self, request, context):  # noqa: N802 - gRPC name
        md = {k: v for k, v in context.invocation_metadata()}
        self.metadata.append(md)
        rid = md.get("request_id", "server-made")
        try:
            check_api_key(self.keys, presented_key(md))  # the server's own check
        except Unauthorized as e:
            context.set_trailing_metadata([("request_id", rid), ("error-code", e.code)])
            context.set_code(grpc.StatusCode.UNAUTHENTICATED)
            context.set_details(f"{e.code}: {e.message}")
            return pb.VqaResponse()
        status, code, retry_after = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if status is None:
            context.set_trailing_metadata([("request_id", rid)])
            top = [pb.AnswerScore(answer="2", score=0.9)]
            return pb.VqaResponse(model="tiny", answers=[pb.VqaAnswer(question="q", answer="2", score=0.9, top_k=top)])
        meta = [("request_id", rid), ("error-code", code)]
        if retry_after is not None:
            meta.append(("retry-after", retry_after))
        context.set_trailing_metadata(meta)
        context.set_code(getattr(grpc.StatusCode, status))
        context.set_details(f"{code}: scripted refusal")
        return pb.VqaResponse()


@dataclass
class GrpcApi:
    servicer: _Servicer
    target: str


def _grpc_api(tls: Pki | None) -> Iterator[GrpcApi]:
    servicer = _Servicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_VtfuseServicer_to_server(servicer, server)
    if tls is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(tls.key_pem, tls.cert_pem)]))
    server.start()
    yield GrpcApi(servicer, f"127.0.0.1:{port}")
    server.stop(grace=None)


@pytest.fixture
def grpc_api() -> Iterator[GrpcApi]:
    yield from _grpc_api(None)


@pytest.fixture
def grpc_tls_api(pki) -> Iterator[GrpcApi]:
    yield from _grpc_api(pki)


def test_grpc_resource_exhausted_is_retried_after_the_retry_after_metadata(grpc_api):
    grpc_api.servicer.script = [("RESOURCE_EXHAUSTED", "overloaded", "1"), (None, "", None)]
    grpc_api.servicer.keys = ["k1"]
    with VtfuseGrpcClient(grpc_api.target, retry=FAST, api_key="k1") as c:
        t0 = time.monotonic()
        out = c.vqa(b"IMG", ["q"], request_id="g-1")
        elapsed = time.monotonic() - t0
    assert (out.answer, out.score, out.model, out.request_id) == ("2", pytest.approx(0.9), "tiny", "g-1")
    assert elapsed >= 1.0 and len(grpc_api.servicer.metadata) == 2
    assert [m["request_id"] for m in grpc_api.servicer.metadata] == ["g-1", "g-1"]
    assert grpc_api.servicer.metadata[0]["x-api-key"] == "k1"


def test_grpc_unavailable_is_retried_and_too_large_is_not(grpc_api):
    grpc_api.servicer.script = [("UNAVAILABLE", "upstream_unavailable", None), (None, "", None)]
    with VtfuseGrpcClient(grpc_api.target, retry=FAST) as c:
        assert c.vqa(b"IMG", ["q"]).answer == "2"
        assert len(grpc_api.servicer.metadata) == 2
        grpc_api.servicer.script = [("RESOURCE_EXHAUSTED", "payload_too_large", None)]
        with pytest.raises(PayloadTooLarge) as e:
            c.vqa(b"IMG", ["q"])
    assert len(grpc_api.servicer.metadata) == 3, "a message over the limits is never retried"
    assert (e.value.status, e.value.code, e.value.message) == (
        "RESOURCE_EXHAUSTED",
        "payload_too_large",
        "scripted refusal",
    )


def test_grpc_gives_up_after_max_retries_and_a_wrong_key_is_typed(grpc_api):
    grpc_api.servicer.script = [("RESOURCE_EXHAUSTED", "rate_limited", "0")]
    with VtfuseGrpcClient(grpc_api.target, retry=Retry(max_retries=2, backoff_s=0.01)) as c:
        with pytest.raises(Overloaded) as e:
            c.vqa(b"IMG", ["q"], request_id="g-2")
    assert len(grpc_api.servicer.metadata) == 3 and (e.value.code, e.value.request_id, e.value.retry_after) == (
        "rate_limited",
        "g-2",
        0.0,
    )
    grpc_api.servicer.keys = ["right"]
    with VtfuseGrpcClient(grpc_api.target, retry=FAST, api_key="wrong") as c:
        with pytest.raises(AuthenticationError, match="not valid"):
            c.vqa(b"IMG", ["q"])
    assert len(grpc_api.servicer.metadata) == 4, "a wrong key is not retried"


def test_grpc_no_server_is_unavailable_after_the_retries():
    with VtfuseGrpcClient(f"127.0.0.1:{free_port()}", timeout=5, retry=Retry(max_retries=1, backoff_s=0.01)) as c:
        with pytest.raises(Unavailable) as e:
            c.vqa(b"IMG", ["q"])
    assert e.value.status == "UNAVAILABLE" and e.value.code == "unavailable"


def test_async_grpc_client_retries(grpc_api):
    grpc_api.servicer.script = [("UNAVAILABLE", "shutting_down", "0"), (None, "", None)]

    async def main():
        async with AsyncVtfuseGrpcClient(grpc_api.target, retry=FAST, api_key="k3") as c:
            return await c.vqa(b"IMG", ["q"], request_id="a-1")

    out = asyncio.run(main())
    assert out.answer == "2" and out.request_id == "a-1" and len(grpc_api.servicer.metadata) == 2
    assert grpc_api.servicer.metadata[1]["x-api-key"] == "k3"


def test_grpc_tls_with_a_private_ca_sync_and_async(grpc_tls_api, pki):
    grpc_tls_api.servicer.script = [(None, "", None)]
    with VtfuseGrpcClient(grpc_tls_api.target, ca_cert=pki.ca_pem) as c:
        assert c.vqa(b"IMG", ["q"]).answer == "2"

    async def main():
        async with AsyncVtfuseGrpcClient(grpc_tls_api.target, ca_cert=pki.ca_pem.read_bytes()) as c:
            return await c.vqa(b"IMG", ["q"])

    assert asyncio.run(main()).answer == "2"
    with VtfuseGrpcClient(grpc_tls_api.target, tls=True, timeout=5, retry=Retry(max_retries=0)) as c:
        with pytest.raises(Unavailable):  # the system's CAs do not know the server's
            c.vqa(b"IMG", ["q"])
    with VtfuseGrpcClient(grpc_tls_api.target, timeout=5, retry=Retry(max_retries=0)) as c:
        with pytest.raises(Unavailable):  # plaintext to a TLS port
            c.vqa(b"IMG", ["q"])


# ---------------------------------------------------------------- the CLI


def test_cli_commands_print_json_and_send_the_key_from_the_environment(http_api, tmp_path, capsys, monkeypatch):
    img = tmp_path / "x.png"
    img.write_bytes(b"IMG")
    monkeypatch.setenv("VTFUSE_API_KEY", "env-key")
    url = ["--url", http_api.url]
    http_api.script = [(200, {}, {"model": "tiny", "scores": [0.9, 0.1]})]
    assert main(["match", str(img), "a red circle", "two dogs", *url]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scores"] == [0.9, 0.1] and out["model"] == "tiny" and out["request_id"]
    assert http_api.seen[-1]["x-api-key"] == "env-key" and http_api.bodies[-1]["texts"] == ["a red circle", "two dogs"]

    http_api.script = [(200, {}, {"model": "tiny", "results": [{"index": 1, "score": 0.8}]})]
    assert main(["retrieve", "--text", "a red circle", str(img), str(img), "--top-k", "1", *url]) == 0
    assert json.loads(capsys.readouterr().out)["results"] == [{"index": 1, "score": 0.8}]
    assert http_api.bodies[-1]["text"] == "a red circle" and len(http_api.bodies[-1]["images"]) == 2
    http_api.script = [(200, {}, {"model": "tiny", "results": [{"index": 0, "score": 0.8, "text": "a"}]})]
    assert main(["retrieve", str(img), "a", "b", "--top-k", "1", *url]) == 0
    assert http_api.bodies[-1]["texts"] == ["a", "b"] and "image" in http_api.bodies[-1]
    capsys.readouterr()

    http_api.script = [(200, {}, {"model": "tiny", "image_embeddings": [[1.0]], "text_embeddings": [[0.0], [1.0]]})]
    assert main(["embed", "--image", str(img), "--text", "a", "--text", "b", "--model", "tiny", *url]) == 0
    assert json.loads(capsys.readouterr().out)["text_embeddings"] == [[0.0], [1.0]]
    assert http_api.bodies[-1]["texts"] == ["a", "b"] and http_api.bodies[-1]["model"] == "tiny"

    http_api.script = [(401, {}, _error("unauthorized", "the API key is not valid"))]
    assert main(["models", *url, "--api-key", "wrong"]) == 1
    assert "401 unauthorized: the API key is not valid" in capsys.readouterr().err
    assert http_api.seen[-1]["x-api-key"] == "wrong", "--api-key wins over the environment"


def test_cli_over_grpc_with_tls(grpc_tls_api, pki, tmp_path, capsys):
    img = tmp_path / "x.png"
    img.write_bytes(b"IMG")
    grpc_tls_api.servicer.script = [(None, "", None)]
    grpc_tls_api.servicer.keys = ["k9"]
    argv = ["ask", str(img), "q", "--grpc", grpc_tls_api.target, "--ca-cert", str(pki.ca_pem), "--api-key", "k9"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["answers"][0]["answer"] == "2" and out["model"] == "tiny"
    assert main(argv) == 0 and capsys.readouterr().out == "2 (0.90)\n"
