"""The HTTP layer without servers: the FastAPI app over a fake Triton, every error in the one JSON shape."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image
from starlette.testclient import TestClient

from serving.app.http_api import create_api
from serving.app.metrics import ApiMetrics
from serving.app.pipeline import Admission
from serving.app.settings import Limits
from serving.errors import UpstreamTimeout, UpstreamUnavailable
from tests.unit.app_fakes import make_args, make_checkpoint, make_pipeline


def png(side: int = 64, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), color).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


def make_client(ckpt, admission=None, ready=True, **limits):
    args = make_args(ckpt, limits=Limits(**{"max_body_bytes": 200_000, "max_pixels": 300 * 300, **limits}))
    pipeline, fake = make_pipeline(args)
    fake.ready = ready

    async def collect() -> str:
        return "# TYPE vtfuse_requests_total counter\nvtfuse_requests_total 1\n"

    app = create_api(pipeline, args, ApiMetrics(), collect, admission)
    return TestClient(app, raise_server_exceptions=False), fake


@pytest.fixture()
def client(ckpt):
    c, _ = make_client(ckpt)
    return c


def assert_error(r, status: int, code: str):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code and body["error"]["message"]
    assert r.headers.get("x-request-id")


def test_vqa_json_happy_path_shapes_and_request_id(ckpt):
    c, fake = make_client(ckpt)
    r = c.post(
        "/v1/vqa",
        json={"image": b64(png()), "questions": ["what color is the circle?", "how many"], "top_k": 3},
        headers={"X-Request-ID": "my-id-1"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny"
    assert [a["question"] for a in body["answers"]] == ["what color is the circle?", "how many"]
    assert all(len(a["top_k"]) == 3 and "attention" not in a and "tokens" not in a for a in body["answers"])
    # Off by default and free when off: the fusion engine is not asked for CROSS_ATTENTION.
    assert [outs for m, _, outs, _ in fake.calls if m == "fusion"] == [("VQA_LOGITS",)]
    assert r.headers["x-request-id"] == "my-id-1"
    assert [(m, n) for m, n, _, _ in fake.calls] == [("image_encoder", 1), ("text_encoder", 2), ("fusion", 2)]
    assert {rid for *_, rid in fake.calls} == {"my-id-1"}


def test_request_id_is_generated_when_absent(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and len(r.headers["x-request-id"]) == 32


def test_vqa_multipart_matches_json(ckpt):
    c, _ = make_client(ckpt)
    img = png()
    questions = ["is there a red circle?", "how many squares are there?"]
    j = c.post("/v1/vqa", json={"image": b64(img), "questions": questions})
    m = c.post(
        "/v1/vqa",
        files={"image": ("x.png", img, "image/png")},
        data={"question": ["is there a red circle?", "how many squares are there?"]},
    )
    assert m.status_code == 200, m.text
    assert m.json() == j.json()


def test_return_attention_adds_a_grid_and_the_token_list(ckpt):
    c, fake = make_client(ckpt)
    questions = ["what color is the circle?", "how many squares are there?"]
    r = c.post("/v1/vqa", json={"image": b64(png()), "questions": questions, "return_attention": True})
    assert r.status_code == 200, r.text
    for a, q in zip(r.json()["answers"], questions):
        grid = a["attention"]
        assert len(grid) == 8 and all(len(row) == 8 for row in grid)
        assert sum(map(sum, grid)) == pytest.approx(1.0, abs=1e-3)
        tokens = a["tokens"]
        assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and all(isinstance(t, str) and t for t in tokens)
        assert q.split()[-1].rstrip("?") in tokens  # "circle", "there"
    assert [outs for m, _, outs, _ in fake.calls if m == "fusion"] == [("VQA_LOGITS", "CROSS_ATTENTION")]


def test_match_retrieve_embed(ckpt):
    c, fake = make_client(ckpt)
    r = c.post("/v1/match", json={"image": b64(png()), "texts": ["a red circle", "a blue square and a red circle"]})
    scores = r.json()["scores"]
    assert len(scores) == 2 and all(0 <= s <= 1 for s in scores)
    texts = [f"a red circle and a {c} square" for c in ("red", "green", "blue", "yellow")] * 10
    fake.calls.clear()
    r = c.post("/v1/retrieve", json={"image": b64(png()), "texts": texts, "top_k": 2})
    res = r.json()["results"]
    assert len(res) == 2 and all(texts[x["index"]] == x["text"] for x in res)
    assert [m for m, n, *_ in fake.calls if m == "fusion"] == ["fusion"] and fake.calls[-1][1] == 16
    imgs = [b64(png(64, (10 * i, 0, 0))) for i in range(20)]
    r = c.post("/v1/retrieve", json={"text": "a red circle", "images": imgs, "top_k": 3})
    res = r.json()["results"]
    assert len(res) == 3 and all("text" not in x and 0 <= x["index"] < 20 for x in res)
    r = c.post("/v1/embed", json={"images": [b64(png())]})
    assert len(r.json()["image_embeddings"]) == 1 and r.json()["text_embeddings"] == []
    r = c.post("/v1/embed", json={"texts": ["a red circle", "a blue square"]})
    assert r.json()["image_embeddings"] == [] and len(r.json()["text_embeddings"]) == 2


@pytest.mark.parametrize(
    "kwargs, status, code",
    [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
        ({"content": b"", "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
        ({"content": b"[" * 100_000, "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
        ({"json": {"image": "!!!", "questions": ["q"]}}, 400, "invalid_base64"),
        ({"json": {"image": b64(b"not an image"), "questions": ["q"]}}, 415, "unsupported_media_type"),
        ({"json": {"image": b64(png()[:40]), "questions": ["q"]}}, 415, "unsupported_media_type"),
        ({"json": {"image": b64(png(400)), "questions": ["q"]}}, 413, "payload_too_large"),
        ({"content": b"x" * 300_000, "headers": {"content-type": "application/json"}}, 413, "payload_too_large"),
        ({"json": {"image": b64(png()), "questions": ["q"] * 33}}, 413, "payload_too_large"),
        ({"json": {"image": b64(png()), "questions": []}}, 422, "schema_violation"),
        ({"json": {"image": b64(png()), "questions": ["circle " * 100]}}, 422, "schema_violation"),
        ({"json": {"image": b64(png()), "questions": ["x " * 600]}}, 422, "schema_violation"),
        ({"json": {"image": b64(png()), "questions": [1, 2]}}, 422, "schema_violation"),
        ({"json": {"image": b64(png()), "questions": ["q"], "extra": 1}}, 422, "schema_violation"),
        ({"json": {"image": b64(png()), "questions": ["q"], "model": "nope"}}, 422, "unknown_model"),
        ({"files": {"image": ("a", b"junk")}, "data": {"question": "q"}}, 415, "unsupported_media_type"),
        ({"files": {"image": ("a", png())}, "data": {"question": "q", "top_k": "many"}}, 422, "schema_violation"),
        ({"files": {"image": ("a", png())}, "data": {"question": "q", "colour": "red"}}, 422, "schema_violation"),
    ],
)
def test_bad_vqa_requests_get_their_status_and_json_error(client, kwargs, status, code):
    assert_error(client.post("/v1/vqa", **kwargs), status, code)
    # and the service still answers a good request
    assert client.post("/v1/vqa", json={"image": b64(png()), "questions": ["q"]}).status_code == 200


@pytest.mark.parametrize(
    "path, body, status, code",
    [
        ("/v1/retrieve", {"image": "AAAA", "texts": ["a"], "text": "b", "images": ["AAAA"]}, 422, "schema_violation"),
        ("/v1/retrieve", {"top_k": 2}, 422, "schema_violation"),
        ("/v1/embed", {}, 422, "schema_violation"),
        ("/v1/match", {"image": b64(png()), "texts": []}, 422, "schema_violation"),
        ("/v1/match", {"image": b64(png()), "texts": "a red circle"}, 422, "schema_violation"),
    ],
)
def test_bad_requests_on_other_routes(client, path, body, status, code):
    assert_error(client.post(path, json=body), status, code)


def test_404_405_are_json_too(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/v1/vqa"), 405, "method_not_allowed")
    assert_error(client.put("/v1/embed", json={}), 405, "method_not_allowed")


def test_declared_content_length_over_the_limit_is_refused_before_reading(client):
    r = client.post(
        "/v1/vqa", content=b"{}", headers={"content-type": "application/json", "content-length": "999999999"}
    )
    assert_error(r, 413, "payload_too_large")


def test_admission_control_refuses_with_429_and_retry_after(ckpt):
    admission = Admission(1)
    c, _ = make_client(ckpt, admission=admission)
    admission.inflight = 1  # one request already being served
    r = c.post("/v1/vqa", json={"image": b64(png()), "questions": ["q"]})
    assert_error(r, 429, "overloaded")
    assert r.headers["retry-after"] == "1"
    assert c.get("/healthz").status_code == 200  # probes are never refused
    admission.inflight = 0
    assert c.post("/v1/vqa", json={"image": b64(png()), "questions": ["q"]}).status_code == 200
    assert admission.inflight == 0


def test_upstream_errors_are_503_504_with_json(ckpt):
    c, fake = make_client(ckpt)
    fake.error = UpstreamUnavailable("Triton is unavailable: retry shortly", retry_after=1.0)
    r = c.post("/v1/embed", json={"texts": ["a red circle"]})
    assert_error(r, 503, "upstream_unavailable")
    assert r.headers["retry-after"] == "1"
    fake.error = UpstreamTimeout("too slow")
    assert_error(c.post("/v1/embed", json={"texts": ["a red circle"]}), 504, "upstream_timeout")
    fake.error = RuntimeError("a bug")
    assert_error(c.post("/v1/embed", json={"texts": ["a red circle"]}), 500, "internal")
    fake.error = None
    assert c.post("/v1/embed", json={"texts": ["a red circle"]}).status_code == 200


def test_readyz_follows_triton(ckpt):
    c, fake = make_client(ckpt, ready=False)
    assert_error(c.get("/readyz"), 503, "upstream_unavailable")
    fake.ready = True
    r = c.get("/readyz")
    assert r.status_code == 200 and r.json()["models"] == {"image_encoder": True, "text_encoder": True, "fusion": True}


def test_metrics_docs_and_openapi(client):
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "vtfuse_requests_total 1" in r.text
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    for path in ("/v1/vqa", "/v1/match", "/v1/retrieve", "/v1/embed"):
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert set(content) == {"application/json", "multipart/form-data"}
        assert "422" in spec["paths"][path]["post"]["responses"]
    vqa = spec["components"]["schemas"]["VqaRequest"]
    assert vqa["additionalProperties"] is False and "questions" in vqa["required"]


def test_api_keys_guard_the_task_routes_only(ckpt):
    args = make_args(ckpt, api_keys=["s3cret"])
    pipeline, _ = make_pipeline(args)

    async def collect() -> str:
        return ""

    c = TestClient(create_api(pipeline, args, ApiMetrics(), collect), raise_server_exceptions=False)
    body = {"texts": ["a red circle"]}
    r = c.post("/v1/embed", json=body)
    assert_error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    assert_error(c.post("/v1/embed", json=body, headers={"X-API-Key": "wrong"}), 401, "unauthorized")
    assert c.post("/v1/embed", json=body, headers={"X-API-Key": "s3cret"}).status_code == 200
    assert c.post("/v1/embed", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_api_keys_guard_the_model_list_too(ckpt):
    args = make_args(ckpt, api_keys=["s3cret"])
    pipeline, _ = make_pipeline(args)

    async def collect() -> str:
        return ""

    c = TestClient(create_api(pipeline, args, ApiMetrics(), collect), raise_server_exceptions=False)
    r = c.get("/v1/models")
    assert_error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    ok = c.get("/v1/models", headers={"X-API-Key": "s3cret"})
    assert ok.status_code == 200 and [m["name"] for m in ok.json()["models"]] == sorted(pipeline.runtimes)
