"""The API's error list on the real stack: exact status, the JSON error body, and the service still answers."""

from __future__ import annotations

import base64
import io
import random
import time

import httpx
import pytest
from PIL import Image

from serving.app.settings import AppArgs, Limits
from serving.procs import free_port
from serving.shapes import world
from tests.integration.conftest import side_app

pytestmark = pytest.mark.integration

SCENE = world.random_scene(random.Random(1))
PNG = world.encode(world.render(SCENE, 64), "PNG")
JPEG = world.encode(world.render(SCENE, 128), "JPEG", 90)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bomb_png() -> bytes:
    """A 20000 x 20000 PNG of a few KB: 400 M pixels, far over any pixel limit."""
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


GOOD = {"image": b64(PNG), "questions": ["how many circles are there?"]}
CASES = [
    # (id, path, request kwargs, status, code)
    (
        "bad-json",
        "/v1/vqa",
        {"content": b'{"image": ', "headers": {"content-type": "application/json"}},
        400,
        "invalid_json",
    ),
    ("bad-base64", "/v1/vqa", {"json": {"image": "@@not-base64@@", "questions": ["q"]}}, 400, "invalid_base64"),
    (
        "not-an-image",
        "/v1/vqa",
        {"json": {"image": b64(b"GIF89a but not really"), "questions": ["q"]}},
        415,
        "unsupported_media_type",
    ),
    (
        "text-file",
        "/v1/match",
        {"json": {"image": b64(b"hello world\n" * 50), "texts": ["a red circle"]}},
        415,
        "unsupported_media_type",
    ),
    (
        "truncated-jpeg",
        "/v1/vqa",
        {"json": {"image": b64(JPEG[: len(JPEG) // 2]), "questions": ["q"]}},
        415,
        "unsupported_media_type",
    ),
    (
        "decompression-bomb",
        "/v1/vqa",
        {"json": {"image": b64(bomb_png()), "questions": ["q"]}},
        413,
        "payload_too_large",
    ),
    (
        "body-too-large",
        "/v1/vqa",
        {"content": b'{"image": "' + b"A" * (5 * 1024 * 1024) + b'"}', "headers": {"content-type": "application/json"}},
        413,
        "payload_too_large",
    ),
    ("too-many-questions", "/v1/vqa", {"json": {"image": b64(PNG), "questions": ["q"] * 33}}, 413, "payload_too_large"),
    (
        "too-many-texts",
        "/v1/match",
        {"json": {"image": b64(PNG), "texts": ["a red circle"] * 65}},
        413,
        "payload_too_large",
    ),
    ("empty-questions", "/v1/vqa", {"json": {"image": b64(PNG), "questions": []}}, 422, "schema_violation"),
    ("empty-texts", "/v1/match", {"json": {"image": b64(PNG), "texts": []}}, 422, "schema_violation"),
    ("empty-string-question", "/v1/vqa", {"json": {"image": b64(PNG), "questions": [""]}}, 422, "schema_violation"),
    ("huge-text", "/v1/vqa", {"json": {"image": b64(PNG), "questions": ["x" * 100_000]}}, 422, "schema_violation"),
    (
        "text-over-token-limit",
        "/v1/match",
        {"json": {"image": b64(PNG), "texts": ["a red circle and " * 10]}},
        422,
        "schema_violation",
    ),
    (
        "wrong-type-questions",
        "/v1/vqa",
        {"json": {"image": b64(PNG), "questions": "how many?"}},
        422,
        "schema_violation",
    ),
    ("wrong-type-top-k", "/v1/vqa", {"json": {**GOOD, "top_k": "three"}}, 422, "schema_violation"),
    ("wrong-type-image", "/v1/vqa", {"json": {"image": 12345, "questions": ["q"]}}, 422, "schema_violation"),
    ("body-is-a-list", "/v1/embed", {"json": ["a red circle"]}, 422, "schema_violation"),
    ("unknown-field", "/v1/vqa", {"json": {**GOOD, "temperature": 0.5}}, 422, "schema_violation"),
    ("unknown-model", "/v1/vqa", {"json": {**GOOD, "model": "gpt-5"}}, 422, "unknown_model"),
    (
        "both-retrieval-forms",
        "/v1/retrieve",
        {"json": {"image": b64(PNG), "texts": ["a"], "text": "a red circle", "images": [b64(PNG)]}},
        422,
        "schema_violation",
    ),
    ("neither-retrieval-form", "/v1/retrieve", {"json": {"top_k": 1}}, 422, "schema_violation"),
    ("half-retrieval-form", "/v1/retrieve", {"json": {"image": b64(PNG)}}, 422, "schema_violation"),
    ("empty-embed", "/v1/embed", {"json": {}}, 422, "schema_violation"),
    (
        "top-k-zero",
        "/v1/retrieve",
        {"json": {"image": b64(PNG), "texts": ["a red circle"], "top_k": 0}},
        422,
        "schema_violation",
    ),
    (
        "multipart-not-an-image",
        "/v1/vqa",
        {"files": {"image": ("x.png", b"junk")}, "data": {"question": "q"}},
        415,
        "unsupported_media_type",
    ),
    (
        "multipart-missing-image",
        "/v1/vqa",
        {"data": {"question": "q"}, "files": {"other": ("x", b"1")}},
        422,
        "schema_violation",
    ),
]


@pytest.fixture(scope="module")
def http(serve_app):
    with httpx.Client(base_url=serve_app.http_url, timeout=60) as c:
        yield c


def assert_json_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, f"{r.status_code} {r.text[:300]}"
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert list(body) == ["error"] and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code and body["error"]["message"], body
    assert r.headers.get("x-request-id")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_its_status_and_json_error_then_service_answers(http, case):
    _, path, kwargs, status, code = case
    assert_json_error(http.post(path, **kwargs), status, code)
    ok = http.post("/v1/vqa", json=GOOD)
    assert ok.status_code == 200 and ok.json()["answers"][0]["answer"]


def test_unknown_route_and_wrong_method_are_json(http):
    assert_json_error(http.get("/v2/whatever"), 404, "not_found")
    assert_json_error(http.get("/v1/vqa"), 405, "method_not_allowed")
    assert_json_error(http.delete("/v1/embed"), 405, "method_not_allowed")


def test_a_burst_of_garbage_does_not_take_the_service_down(http):
    rng = random.Random(0)
    for _ in range(30):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 2000)))
        r = http.post(
            rng.choice(["/v1/vqa", "/v1/match", "/v1/retrieve", "/v1/embed"]),
            content=junk,
            headers={"content-type": rng.choice(["application/json", "multipart/form-data; boundary=x", "text/plain"])},
        )
        assert 400 <= r.status_code < 500, r.text
        assert "error" in r.json()
    assert http.get("/readyz").status_code == 200
    assert http.post("/v1/vqa", json=GOOD).status_code == 200


def test_triton_unreachable_is_503_with_retry_after(serve_app, http):
    """A second app on the same Serve instance whose Triton address answers nothing."""

    args = AppArgs(triton_url=f"127.0.0.1:{free_port()}", preprocess="inline", limits=Limits(request_timeout_s=5))
    with side_app(serve_app, args, "vtfuse-dead-triton", "/dead", http):
        t0 = time.monotonic()
        r = http.post("/dead/v1/vqa", json=GOOD)
        assert_json_error(r, 503, "upstream_unavailable")
        assert r.headers["retry-after"].isdigit()
        assert time.monotonic() - t0 < 5, "a down Triton must be refused fast, not at the deadline"
        assert_json_error(http.get("/dead/readyz"), 503, "upstream_unavailable")
        assert http.get("/dead/healthz").status_code == 200
    assert http.post("/v1/vqa", json=GOOD).status_code == 200


def test_expired_deadline_is_504(serve_app, http):

    args = AppArgs(triton_url=serve_app.triton.url_grpc, preprocess="inline", limits=Limits(request_timeout_s=0.001))
    with side_app(serve_app, args, "vtfuse-no-time", "/notime", http):
        assert_json_error(http.post("/notime/v1/vqa", json=GOOD), 504, "upstream_timeout")
