"""Feature reuse and the retrieval shortlist, counted by Triton itself (nv_inference_count per engine)."""

from __future__ import annotations

import base64
import random

import httpx
import pytest

from serving.shapes import world
from tests.helpers import fresh_samples, metric_value, scrape, settled

pytestmark = pytest.mark.integration

ENGINES = ("image_encoder", "text_encoder", "fusion")


def counts(triton) -> dict[str, float]:
    def read() -> dict[str, float]:
        text = scrape(triton.url_metrics)
        return {m: metric_value(text, "nv_inference_count", model=m) for m in ENGINES}

    return settled(read)


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    return {m: int(after[m] - before[m]) for m in ENGINES}


def test_eight_questions_about_one_image_run_the_image_encoder_once(serve_app):
    img, _, scene = fresh_samples(1, seed=808)[0]
    questions = [q.question for q in world.all_questions(scene)][:8]
    assert len(questions) == 8
    before = counts(serve_app.triton)
    r = httpx.post(
        serve_app.http_url + "/v1/vqa",
        json={"image": base64.b64encode(img).decode(), "questions": questions},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["answers"]) == 8
    assert delta(before, counts(serve_app.triton)) == {"image_encoder": 1, "text_encoder": 8, "fusion": 8}


def test_retrieve_over_40_captions_reranks_16_with_itm(serve_app):
    rng = random.Random(40)
    scene = world.random_scene(rng, n_objects=2)
    img = world.encode(world.render(scene, 96, supersample=2), "PNG")
    true = world.caption(world.scene_items(scene))
    texts = [true, *world.distractor_captions(scene, rng, 14)]
    while len(texts) < 40:
        t = world.random_caption_negative(scene, rng)
        if t not in texts:
            texts.append(t)
    rng.shuffle(texts)
    before = counts(serve_app.triton)
    r = httpx.post(
        serve_app.http_url + "/v1/retrieve",
        json={"image": base64.b64encode(img).decode(), "texts": texts, "top_k": 1},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    d = delta(before, counts(serve_app.triton))
    assert d["fusion"] == 16, d  # max(16, 4·1) shortlisted, re-ranked with ITM
    assert d["image_encoder"] == 1, d
    assert d["text_encoder"] == 40 + 16, d  # embeddings of all 40, features of the 16 shortlisted
    (best,) = r.json()["results"]
    assert texts[best["index"]] == best["text"]


def test_text_to_images_shortlists_and_encodes_each_image_once(serve_app):
    rng = random.Random(41)
    scenes = [world.random_scene(rng) for _ in range(24)]
    images = [base64.b64encode(world.encode(world.render(s, 64), "PNG")).decode() for s in scenes]
    before = counts(serve_app.triton)
    r = httpx.post(
        serve_app.http_url + "/v1/retrieve",
        json={"text": world.caption(world.scene_items(scenes[5])), "images": images, "top_k": 2},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    # Every image through the image tower once: the shortlist's features are the ones fetched with the embeddings.
    assert delta(before, counts(serve_app.triton)) == {"image_encoder": 24, "text_encoder": 1, "fusion": 16}
