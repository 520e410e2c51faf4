"""Every input limit on the real stack, beyond test_api_errors' list: each a setting, each a clear 4xx, memory bounded.

Also Triton itself: requests with wrong shapes, dtypes or values sent straight to an engine
are refused one by one while the requests batched with them are answered, and the
per-key rate limit through Serve's proxy.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import os
import random

import grpc
import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from loadtests import chaos
from serving.app.settings import AppArgs, Limits
from serving.proto import vtfuse_pb2 as pb
from serving.proto import vtfuse_pb2_grpc as pb_grpc
from serving.shapes import world
from tests.integration.conftest import TEST_LIMITS, side_app

pytestmark = pytest.mark.integration

SCENE = world.random_scene(random.Random(4))
PNG = world.encode(world.render(SCENE, 64), "PNG")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def big_png(side: int) -> bytes:
    """A real (not a bomb: it decodes to what it says) 1-bit PNG of side x side, a few KB."""
    return encoded(Image.new("1", (side, side)), "PNG", optimize=True)


@pytest.fixture(scope="module")
def http(serve_app):
    with httpx.Client(base_url=serve_app.http_url, timeout=60) as c:
        yield c


def assert_error(r: httpx.Response, status: int, code: str, setting: str | None = None) -> None:
    assert r.status_code == status, r.text[:300]
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["code"] == code, err
    if setting:
        assert setting in err["message"], f"the message should name the setting {setting}: {err['message']}"


GOOD = {"image": b64(PNG), "questions": ["how many circles are there?"]}
WEBP = encoded(world.render(SCENE, 96), "WEBP", quality=90)
CASES = [
    # (id, path, request kwargs, status, code, setting named in the message)
    (
        "max_images",
        "/v1/embed",
        {"json": {"images": [b64(PNG)] * (TEST_LIMITS.max_images + 1)}},
        413,
        "payload_too_large",
        "max_images",
    ),
    (
        "max_texts-embed",
        "/v1/embed",
        {"json": {"texts": ["a red circle"] * (TEST_LIMITS.max_texts + 1)}},
        413,
        "payload_too_large",
        "max_texts",
    ),
    (
        "max_images-retrieve",
        "/v1/retrieve",
        {"json": {"text": "a red circle", "images": [b64(PNG)] * (TEST_LIMITS.max_images + 1)}},
        413,
        "payload_too_large",
        "max_images",
    ),
    (
        "max_top_k",
        "/v1/retrieve",
        {"json": {"image": b64(PNG), "texts": ["a red circle"], "top_k": TEST_LIMITS.max_top_k + 1}},
        422,
        "schema_violation",
        "max_top_k",
    ),
    (
        "max_text_chars",
        "/v1/match",
        {"json": {"image": b64(PNG), "texts": ["x" * (TEST_LIMITS.max_text_chars + 1)]}},
        422,
        "schema_violation",
        "max_text_chars",
    ),
    ("max_pixels", "/v1/vqa", {"json": {**GOOD, "image": b64(big_png(4100))}}, 413, "payload_too_large", "limit"),
    (
        "max_body_bytes-chunked",
        "/v1/vqa",
        {
            "content": iter([b'{"image": "'] + [b"A" * 65536] * (TEST_LIMITS.max_body_bytes // 65536 + 2) + [b'"}']),
            "headers": {"content-type": "application/json"},
        },
        413,
        "payload_too_large",
        "max_body_bytes",
    ),
    (
        "gif",
        "/v1/vqa",
        {"json": {**GOOD, "image": b64(encoded(world.render(SCENE, 64), "GIF"))}},
        415,
        "unsupported_media_type",
        None,
    ),
    (
        "bmp",
        "/v1/vqa",
        {"json": {**GOOD, "image": b64(encoded(world.render(SCENE, 64), "BMP"))}},
        415,
        "unsupported_media_type",
        None,
    ),
    ("png-header-only", "/v1/vqa", {"json": {**GOOD, "image": b64(PNG[:40])}}, 415, "unsupported_media_type", None),
    (
        "deep-json",
        "/v1/vqa",
        {"content": b"[" * 100_000 + b"]" * 100_000, "headers": {"content-type": "application/json"}},
        400,
        "invalid_json",
        None,
    ),
    (
        "not-utf8",
        "/v1/vqa",
        {"content": b'{"image": "\xff\xfe"}', "headers": {"content-type": "application/json"}},
        400,
        "invalid_json",
        None,
    ),
    ("null-body-fields", "/v1/vqa", {"json": {"image": None, "questions": None}}, 422, "schema_violation", None),
    ("float-top-k", "/v1/vqa", {"json": {**GOOD, "top_k": 1.5}}, 422, "schema_violation", None),
    ("negative-top-k", "/v1/vqa", {"json": {**GOOD, "top_k": -3}}, 422, "schema_violation", None),
    ("whitespace-question", "/v1/vqa", {"json": {**GOOD, "questions": ["   "]}}, 422, "schema_violation", None),
    (
        "multipart-too-many-files",
        "/v1/embed",
        {"files": [("images", (f"{i}.png", PNG)) for i in range(TEST_LIMITS.max_images + 2)]},
        413,
        "payload_too_large",
        None,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_each_limit_is_a_clear_4xx(http, case):
    _, path, kwargs, status, code, setting = case
    assert_error(http.post(path, **kwargs), status, code, setting)


def test_webp_is_accepted(http):
    r = http.post("/v1/vqa", json={**GOOD, "image": b64(WEBP)})
    assert r.status_code == 200, r.text


def _replica_rss_mb(pid: int) -> float:
    total = 0
    for p in chaos.find_replicas(pid) + chaos.find_replicas(pid, deployment="Preprocess"):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


def test_bombs_and_big_images_keep_memory_bounded(http):
    """40 hostile images (decompression bombs, images just under and over the pixel limit): RSS stays put."""
    bomb = encoded(Image.new("1", (20000, 20000)), "PNG", optimize=True)
    under = big_png(4000)  # 16 M pixels: allowed, decoded, resized
    rss0 = _replica_rss_mb(os.getpid())
    assert rss0 > 0, "the Serve replicas of the session fixture should be found"

    def one(i: int) -> int:
        img = (bomb, big_png(4100), under)[i % 3]
        return http.post("/v1/vqa", json={**GOOD, "image": b64(img)}).status_code

    with cf.ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(one, range(42)))
    assert set(codes) <= {200, 413} and codes.count(200) == 14, codes
    rss1 = _replica_rss_mb(os.getpid())
    chaos.LOG_DIR.mkdir(parents=True, exist_ok=True)
    (chaos.LOG_DIR / "hostile-images-rss.json").write_text(json.dumps({"rss_mb_before_after": [rss0, rss1]}) + "\n")
    assert rss1 - rss0 < 600, f"replica memory grew {rss0:.0f} → {rss1:.0f} MB"
    assert http.post("/v1/vqa", json=GOOD).status_code == 200


def test_grpc_message_over_the_body_limit(serve_app):
    big = pb.EmbedRequest(images=[b"\0" * (1024 * 1024)] * 5)  # 5 MB > 4 MiB
    with grpc.insecure_channel(
        serve_app.grpc_target, options=[("grpc.max_send_message_length", 64 * 2**20)]
    ) as ch, pytest.raises(grpc.RpcError) as e:
        pb_grpc.VtfuseStub(ch).Embed(big, timeout=60)
    assert e.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED,), e.value.details()


def test_rate_limit_per_key_through_serve(serve_app, http):
    """A side app with keys and 1 request/s, burst 3: the 4th quick call of a key is 429 `rate_limited`."""

    args = AppArgs(
        triton_url=serve_app.triton.url_grpc,
        preprocess="inline",
        api_keys=["key-a", "key-b"],
        limits=Limits(rate_limit_rps=1.0, rate_limit_burst=3),
    )
    with side_app(serve_app, args, "vtfuse-ratelimit", "/rl", http):
        a = {"X-API-Key": "key-a"}
        codes = [http.post("/rl/v1/vqa", json=GOOD, headers=a).status_code for _ in range(4)]
        assert codes[:3] == [200, 200, 200] and codes[3] == 429, codes
        r = http.post("/rl/v1/vqa", json=GOOD, headers=a)
        assert_error(r, 429, "rate_limited", "rate_limit_rps")
        assert int(r.headers["retry-after"]) >= 1
        assert http.post("/rl/v1/vqa", json=GOOD, headers={"X-API-Key": "key-b"}).status_code == 200
        assert_error(http.post("/rl/v1/vqa", json=GOOD), 401, "unauthorized")
        _keys_and_rate_limit_through_the_python_clients(serve_app)


def _keys_and_rate_limit_through_the_python_clients(serve_app):
    """The SDK on the same side app: the key over HTTP and gRPC, typed refusals, retries that wait out Retry-After."""
    from serving.client import AuthenticationError, Overloaded, Retry, VtfuseClient, VtfuseGrpcClient

    once = Retry(max_retries=0)
    with VtfuseGrpcClient(serve_app.grpc_target, application="vtfuse-ratelimit", api_key="key-b", retry=once) as g:
        assert g.vqa(PNG, ["how many circles are there?"]).answer  # x-api-key metadata reaches the ingress
        with pytest.raises(Overloaded) as e:  # key-b's burst of 3 is spent by then
            for _ in range(4):
                g.vqa(PNG, ["how many circles are there?"])
    assert (e.value.status, e.value.code) == ("RESOURCE_EXHAUSTED", "rate_limited") and e.value.retry_after >= 1
    with VtfuseGrpcClient(serve_app.grpc_target, application="vtfuse-ratelimit", api_key="key-b") as g:
        assert g.vqa(PNG, ["how many circles are there?"]).answer, "the default retries wait out the rate limit"
    with VtfuseGrpcClient(serve_app.grpc_target, application="vtfuse-ratelimit", api_key="nope") as g:
        with pytest.raises(AuthenticationError) as auth:
            g.list_models()
    assert (auth.value.status, auth.value.code) == ("UNAUTHENTICATED", "unauthorized")
    with VtfuseClient(serve_app.http_url + "/rl", api_key="key-a") as c:
        assert c.vqa(PNG, ["how many circles are there?"]).answer, "HTTP: X-API-Key, retried past the 429s"


# -- straight to Triton ------------------------------------------------------------------------


def _ids(valid: bool) -> np.ndarray:
    ids = np.zeros((1, 24), np.int64)
    ids[0, :4] = [1, 5, 6, 2] if valid else [1, 10**9, 6, 2]  # an id far outside the vocabulary
    return ids


def _text_request(client: grpcclient.InferenceServerClient, kind: str):
    if kind == "shape":
        ids = np.zeros((1, 23), np.int64)
        mask = np.ones((1, 23), np.int64)
    elif kind == "dtype":
        ids = np.zeros((1, 24), np.float32)
        mask = np.ones((1, 24), np.int64)
    else:
        ids = _ids(kind == "good")
        mask = (ids != 0).astype(np.int64)
    inputs = []
    for name, arr in (("INPUT_IDS", ids), ("ATTENTION_MASK", mask)):
        x = grpcclient.InferInput(name, list(arr.shape), "FP32" if arr.dtype == np.float32 else "INT64")
        x.set_data_from_numpy(arr)
        inputs.append(x)
    try:
        res = client.infer("text_encoder", inputs, client_timeout=60)
        return res.as_numpy("TEXT_EMBEDDING").shape
    except InferenceServerException as e:
        return e


def test_bad_tensors_straight_to_triton_fail_alone_in_their_batch(triton):
    """48 concurrent requests to text_encoder, 12 of them bad (ids out of range, wrong shape, wrong dtype):
    the dynamic batcher groups them, yet only the bad ones fail, each with its own error."""
    kinds = ["good"] * 36 + ["range"] * 6 + ["shape"] * 3 + ["dtype"] * 3
    random.Random(0).shuffle(kinds)

    def one(kind: str):
        return _text_request(grpcclient.InferenceServerClient(triton.url_grpc), kind)

    with cf.ThreadPoolExecutor(16) as pool:
        out = list(pool.map(one, kinds))
    for kind, res in zip(kinds, out):
        if kind == "good":
            assert res == (1, 64), res
        else:
            assert isinstance(res, InferenceServerException), (kind, res)
    msgs = {k: str(r) for k, r in zip(kinds, out) if k != "good"}
    assert "shape" in msgs["shape"].lower() and "data-type" in msgs["dtype"].lower().replace("datatype", "data-type")
    assert grpcclient.InferenceServerClient(triton.url_grpc).is_server_ready()

