"""One-question /v1/vqa calls sent whole to Triton's `vqa` (ModelSpec.vqa): the same answers and the
same errors as the ingress path, counted on Triton's own metrics."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

from tests.helpers import fresh_samples, metric_value, scrape, settled

pytestmark = pytest.mark.integration


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def vqa_runs(app) -> float:
    """Requests Triton's `vqa` model has answered so far."""
    return settled(lambda: metric_value(scrape(app.triton.url_metrics), "nv_inference_request_success", model="vqa"))


def fusion_runs(app) -> float:
    return settled(
        lambda: metric_value(scrape(app.triton.url_metrics), "nv_inference_request_success", model="fusion")
    )


def test_one_question_goes_to_triton_vqa_and_answers_right(serve_app):
    samples = fresh_samples(20, seed=515)
    before = vqa_runs(serve_app)
    with httpx.Client(base_url=serve_app.http_url, timeout=30) as c:
        got = [
            c.post("/v1/vqa", json={"image": b64(img), "questions": [qa.question]}).json()["answers"][0]
            for img, qa, _ in samples
        ]
    assert vqa_runs(serve_app) - before == len(samples)
    assert sum(g["answer"] == qa.answer for g, (_, qa, _) in zip(got, samples)) >= 18
    for g in got:
        assert g["top_k"] == [{"answer": g["answer"], "score": g["score"]}] and 0 < g["score"] <= 1


def test_both_paths_give_the_same_answer_and_score(serve_app):
    img, qa, _ = fresh_samples(1, seed=516)[0]
    body = {"image": b64(img), "questions": [qa.question]}
    with httpx.Client(base_url=serve_app.http_url, timeout=30) as c:
        triton_side = c.post("/v1/vqa", json=body).json()["answers"][0]
        ingress_side = c.post("/v1/vqa", json={**body, "model": "tiny@1"}).json()["answers"][0]
    assert triton_side["answer"] == ingress_side["answer"]
    assert triton_side["score"] == pytest.approx(ingress_side["score"], abs=1e-5)


@pytest.mark.parametrize(
    "extra",
    [
        {"questions": ["how many circles are there?", "is there a red square?"]},
        {"top_k": 3},
        {"return_attention": True},
        {"model": "tiny@1"},
    ],
    ids=["two-questions", "top-k-3", "attention", "pinned-version"],
)
def test_other_calls_run_the_engines_from_the_ingress(serve_app, extra):
    img, qa, _ = fresh_samples(1, seed=517)[0]
    vqa0, fusion0 = vqa_runs(serve_app), fusion_runs(serve_app)
    with httpx.Client(base_url=serve_app.http_url, timeout=30) as c:
        r = c.post("/v1/vqa", json={"image": b64(img), "questions": [qa.question], **extra})
    assert r.status_code == 200, r.text
    assert vqa_runs(serve_app) == vqa0 and fusion_runs(serve_app) == fusion0 + 1


def _truncated_png() -> bytes:
    img, _, _ = fresh_samples(1, seed=518)[0]
    buf = io.BytesIO()
    Image.open(io.BytesIO(img)).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()[:-200]  # the header reads fine; decoding fails


def _big_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@pytest.mark.parametrize(
    "image, question, status, code",
    [
        (_truncated_png, "how many circles are there?", 415, "unsupported_media_type"),
        (lambda: b"\x89PNG\r\n\x1a\n not really", "how many circles are there?", 415, "unsupported_media_type"),
        (lambda: _big_png(4100), "how many circles are there?", 413, "payload_too_large"),
        (lambda: fresh_samples(1, seed=519)[0][0], "what " * 40 + "?", 422, "schema_violation"),
    ],
    ids=["truncated-png", "bad-header", "over-pixel-limit", "question-over-token-limit"],
)
def test_bad_input_gets_the_ingress_paths_exact_error(serve_app, image, question, status, code):
    body = {"image": b64(image()), "questions": [question]}
    with httpx.Client(base_url=serve_app.http_url, timeout=30) as c:
        via_triton = c.post("/v1/vqa", json=body)
        via_ingress = c.post("/v1/vqa", json={**body, "model": "tiny@1"})
        good = {"image": b64(fresh_samples(1, seed=520)[0][0]), "questions": ["is there a circle?"]}
        after = c.post("/v1/vqa", json=good)
    assert via_triton.status_code == status, via_triton.text
    assert via_triton.json()["error"]["code"] == code
    assert via_triton.json()["error"]["message"] == via_ingress.json()["error"]["message"]
    assert after.status_code == 200  # and the service still answers
