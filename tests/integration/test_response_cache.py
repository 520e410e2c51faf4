"""Image features reused across requests: Triton's response cache on `image_encoder`, counted by Triton itself.

`nv_inference_count` leaves out answers served from the cache and `nv_cache_num_hits_per_model`
counts them, so "the image tower ran once" is a count on Triton's /metrics, not a timing.
"""

from __future__ import annotations

import base64

import httpx
import pytest

from serving.shapes import world
from tests.helpers import fresh_samples, metric_value, scrape, settled

pytestmark = pytest.mark.integration


def image_encoder(triton) -> dict[str, float]:
    """Runs of image_encoder and its cache hits and misses, once two reads agree."""

    def read() -> dict[str, float]:
        text = scrape(triton.url_metrics)
        return {
            "runs": metric_value(text, "nv_inference_count", model="image_encoder"),
            "hits": metric_value(text, "nv_cache_num_hits_per_model", model="image_encoder"),
            "misses": metric_value(text, "nv_cache_num_misses_per_model", model="image_encoder"),
        }

    return settled(read)


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    return {k: int(after[k] - before[k]) for k in before}


def _questions(scene: world.Scene, n: int) -> list[str]:
    qs = [q.question for q in world.all_questions(scene)][:n]
    assert len(qs) == n
    return qs


@pytest.mark.parametrize("model", ["tiny", "tiny@1"])  # Triton's `vqa` whole / the engines from the ingress
def test_eight_one_question_calls_on_one_image_run_the_image_encoder_once(serve_app, model):
    # Seeds no other test uses: the session's Triton (and its cache) is shared by the whole run.
    img, _, scene = fresh_samples(1, seed=73_421 if model == "tiny" else 73_422)[0]
    image = base64.b64encode(img).decode()
    before = image_encoder(serve_app.triton)
    answers = []
    for q in _questions(scene, 8):  # one after another, as a chat client asks
        r = httpx.post(serve_app.http_url + "/v1/vqa", json={"model": model, "image": image, "questions": [q]},
                       timeout=60)
        assert r.status_code == 200, r.text
        answers.append(r.json()["answers"][0]["answer"])
    d = delta(before, image_encoder(serve_app.triton))
    assert d == {"runs": 1, "hits": 7, "misses": 1}, d
    # the same answers as one call with all 8 questions (features computed once either way)
    r = httpx.post(serve_app.http_url + "/v1/vqa",
                   json={"model": "tiny@1", "image": image, "questions": _questions(scene, 8)}, timeout=60)
    assert [a["answer"] for a in r.json()["answers"]] == answers


def test_a_cached_answer_serves_callers_that_ask_for_other_outputs(serve_app):
    """The cache is keyed by the pixels alone: an embedding first, then VQA on the same image, both right."""
    img, _, scene = fresh_samples(1, seed=73_423)[0]
    image = base64.b64encode(img).decode()
    before = image_encoder(serve_app.triton)
    emb = httpx.post(serve_app.http_url + "/v1/embed", json={"images": [image]}, timeout=60)
    assert emb.status_code == 200, emb.text
    for model in ("tiny@1", "tiny"):
        r = httpx.post(serve_app.http_url + "/v1/vqa",
                       json={"model": model, "image": image, "questions": _questions(scene, 1)}, timeout=60)
        assert r.status_code == 200, r.text
    again = httpx.post(serve_app.http_url + "/v1/embed", json={"images": [image]}, timeout=60)
    assert again.json()["image_embeddings"] == emb.json()["image_embeddings"]
    assert delta(before, image_encoder(serve_app.triton))["runs"] == 1


def test_different_images_are_not_served_from_the_cache(serve_app):
    samples = fresh_samples(3, seed=73_424)
    before = image_encoder(serve_app.triton)
    for img, qa, _ in samples:
        r = httpx.post(serve_app.http_url + "/v1/vqa",
                       json={"image": base64.b64encode(img).decode(), "questions": [qa.question]}, timeout=60)
        assert r.status_code == 200, r.text
    d = delta(before, image_encoder(serve_app.triton))
    assert d["runs"] == 3 and d["hits"] == 0, d
