"""The HTTP API on the real stack (Ray Serve → Triton): right answers on fresh renders, JSON and multipart."""

from __future__ import annotations

import base64
import random

import httpx
import numpy as np
import pytest

from serving.shapes import world
from tests.helpers import fresh_samples
from tests.integration.conftest import side_app

pytestmark = pytest.mark.integration


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def http(serve_app):
    with httpx.Client(base_url=serve_app.http_url, timeout=60) as c:
        yield c


def render(scene: world.Scene, rng: random.Random) -> bytes:
    img = world.render(scene, rng.choice([64, 96, 128, 200]), supersample=rng.choice([1, 2]))
    return world.encode(img, "JPEG", rng.randint(80, 95)) if rng.random() < 0.5 else world.encode(img, "PNG")


def test_vqa_answers_fresh_renders(http):
    samples = fresh_samples(80, seed=3101)
    correct = 0
    for img, qa, _ in samples:
        r = http.post("/v1/vqa", json={"image": b64(img), "questions": [qa.question]})
        assert r.status_code == 200, r.text
        (a,) = r.json()["answers"]
        assert a["question"] == qa.question and 0 < a["score"] <= 1 and a["top_k"][0]["answer"] == a["answer"]
        correct += a["answer"] == qa.answer
    assert correct / len(samples) >= 0.90, f"VQA {correct}/{len(samples)}"


def test_vqa_many_questions_per_image_top_k_and_attention(http):
    rng = random.Random(17)
    correct = total = 0
    for _ in range(10):
        scene = world.random_scene(rng)
        qas = world.all_questions(scene)
        qas = rng.sample(qas, min(8, len(qas)))
        r = http.post(
            "/v1/vqa",
            json={
                "image": b64(render(scene, rng)),
                "questions": [q.question for q in qas],
                "top_k": 3,
                "return_attention": True,
            },
        )
        assert r.status_code == 200, r.text
        answers = r.json()["answers"]
        assert [a["question"] for a in answers] == [q.question for q in qas]
        for a, qa in zip(answers, qas):
            scores = [t["score"] for t in a["top_k"]]
            assert len(scores) == 3 and scores == sorted(scores, reverse=True)
            grid = np.array(a["attention"])
            assert grid.shape == (8, 8) and grid.sum() == pytest.approx(1.0, abs=1e-3)
            assert a["tokens"][0] == "[CLS]" and a["tokens"][-1] == "[SEP]" and len(a["tokens"]) > 3
            correct += a["answer"] == qa.answer
            total += 1
    assert correct / total >= 0.90, f"VQA with 8 questions per image: {correct}/{total}"


def test_vqa_multipart_gives_the_json_answers(http):
    for img, qa, _ in fresh_samples(5, seed=77):
        questions = [qa.question, "how many circles are there?"]
        j = http.post("/v1/vqa", json={"image": b64(img), "questions": questions, "top_k": 2}).json()
        m = http.post(
            "/v1/vqa",
            files={"image": ("img", img, "application/octet-stream")},
            data={"question": questions, "top_k": "2"},
        )
        assert m.status_code == 200, m.text
        assert [a["answer"] for a in m.json()["answers"]] == [a["answer"] for a in j["answers"]]
        for x, y in zip(m.json()["answers"], j["answers"]):
            assert x["score"] == pytest.approx(y["score"], abs=1e-5)


def test_match_true_caption_beats_one_attribute_distractor(http):
    rng = random.Random(4242)
    wins = n = 0
    for _ in range(40):
        scene = world.random_scene(rng)
        true = world.caption(world.scene_items(scene), rng)
        (wrong,) = world.distractor_captions(scene, rng, 1)
        r = http.post("/v1/match", json={"image": b64(render(scene, rng)), "texts": [true, wrong]})
        assert r.status_code == 200, r.text
        s_true, s_wrong = r.json()["scores"]
        assert 0 <= s_true <= 1 and 0 <= s_wrong <= 1
        wins += s_true > s_wrong
        n += 1
    assert wins / n >= 0.90, f"true caption above a distractor for {wins}/{n}"


def test_match_multipart(http):
    rng = random.Random(5)
    scene = world.random_scene(rng)
    img = render(scene, rng)
    texts = [world.caption(world.scene_items(scene)), "a yellow triangle and a green circle"]
    j = http.post("/v1/match", json={"image": b64(img), "texts": texts}).json()["scores"]
    m = http.post("/v1/match", files={"image": ("img", img)}, data={"texts": texts})
    assert m.status_code == 200, m.text
    assert m.json()["scores"] == pytest.approx(j, abs=1e-5)


def test_retrieve_ranks_the_true_caption_first_among_8(http):
    rng = random.Random(9090)
    first = n = 0
    for _ in range(40):
        scene = world.random_scene(rng)
        true = world.caption(world.scene_items(scene), rng)
        texts = [true, *world.distractor_captions(scene, rng, 7)]
        rng.shuffle(texts)
        r = http.post("/v1/retrieve", json={"image": b64(render(scene, rng)), "texts": texts, "top_k": 3})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        scores = [x["score"] for x in results]
        assert len(results) == 3 and scores == sorted(scores, reverse=True)
        assert all(texts[x["index"]] == x["text"] for x in results)
        first += results[0]["text"] == true
        n += 1
    assert first / n >= 0.85, f"true caption first among 8 for {first}/{n}"


def test_retrieve_images_for_a_caption(http):
    rng = random.Random(1212)
    first = n = 0
    for _ in range(20):
        scenes = [world.random_scene(rng) for _ in range(8)]
        target = rng.randrange(8)
        caption = world.caption(world.scene_items(scenes[target]), rng)
        # other scenes must not also match the caption
        if sum(sorted(world.scene_items(s)) == sorted(world.scene_items(scenes[target])) for s in scenes) > 1:
            continue
        r = http.post(
            "/v1/retrieve", json={"text": caption, "images": [b64(render(s, rng)) for s in scenes], "top_k": 2}
        )
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert len(results) == 2 and all("text" not in x for x in results)
        first += results[0]["index"] == target
        n += 1
    assert first / n >= 0.85, f"right image first among 8 for {first}/{n}"


def test_embed_routes_images_and_texts(http):
    rng = random.Random(8)
    scenes = [world.random_scene(rng) for _ in range(6)]
    imgs = [render(s, rng) for s in scenes]
    caps = [world.caption(world.scene_items(s)) for s in scenes]
    r = http.post("/v1/embed", json={"images": [b64(i) for i in imgs], "texts": caps})
    assert r.status_code == 200, r.text
    body = r.json()
    ie, te = np.array(body["image_embeddings"]), np.array(body["text_embeddings"])
    assert ie.shape == (6, 64) and te.shape == (6, 64)
    assert np.allclose(np.linalg.norm(ie, axis=1), 1, atol=1e-3)
    assert np.allclose(np.linalg.norm(te, axis=1), 1, atol=1e-3)
    # the contrastive heads put each image nearest its own caption most of the time
    hits = int((np.argmax(ie @ te.T, axis=1) == np.arange(6)).sum())
    assert hits >= 4, f"{hits}/6 images nearest their own caption"
    only_i = http.post("/v1/embed", json={"images": [b64(imgs[0])]}).json()
    only_t = http.post("/v1/embed", json={"texts": [caps[0]]}).json()

    def same(a: list, b: np.ndarray) -> bool:
        # The int8 engines quantise activations with one scale per batch, so a row's embedding moves
        # slightly with the rows it is batched with (export/README.md): equal up to cosine 0.999.
        a2, b2 = np.atleast_2d(a), np.atleast_2d(b)
        return bool(((a2 * b2).sum(axis=1) >= 0.999).all())

    assert only_i["text_embeddings"] == [] and same(only_i["image_embeddings"][0], ie[0])
    assert only_t["image_embeddings"] == [] and same(only_t["text_embeddings"][0], te[0])
    m = http.post("/v1/embed", files=[("images", ("a", imgs[0])), ("images", ("b", imgs[1]))], data={"texts": caps[:1]})
    assert m.status_code == 200, m.text
    assert same(m.json()["image_embeddings"], ie[:2])


def test_model_field_routes_to_a_served_model_or_version(http):
    img, qa, _ = fresh_samples(1, seed=1)[0]
    answers = {}
    for model in ("tiny", "tiny@1"):
        r = http.post("/v1/vqa", json={"image": b64(img), "questions": [qa.question], "model": model})
        assert r.status_code == 200 and r.json()["model"] == model
        answers[model] = r.json()["answers"][0]["answer"]
    assert answers["tiny"] == answers["tiny@1"]  # version 1 is the latest here
    r = http.post("/v1/vqa", json={"image": b64(img), "questions": [qa.question], "model": "tiny@7"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_model"


def test_inline_composition_answers_like_the_preprocess_deployment(serve_app, http):
    """The shipped composition (preprocess in the ingress) as a side app on the same Serve instance."""
    from serving.app.settings import AppArgs

    args = AppArgs(triton_url=serve_app.triton.url_grpc, preprocess="inline")
    with side_app(serve_app, args, "vtfuse-inline", "/inline", http):
        for img, qa, _ in fresh_samples(6, seed=606):
            body = {"image": b64(img), "questions": [qa.question, "how many squares are there?"], "top_k": 2}
            a = http.post("/v1/vqa", json=body).json()["answers"]
            b = http.post("/inline/v1/vqa", json=body).json()["answers"]
            assert [x["answer"] for x in a] == [x["answer"] for x in b]
            assert [x["score"] for x in a] == pytest.approx([x["score"] for x in b], abs=1e-5)


def test_probes_docs_and_request_ids(http):
    assert http.get("/healthz").json()["status"] == "live"
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == {
        "image_encoder": True,
        "text_encoder": True,
        "fusion": True,
        "vqa": True,  # where one-question calls go (ModelSpec.vqa)
        "caption": True,  # where captions are generated (ModelSpec.generate)
    }
    assert http.get("/docs").status_code == 200
    spec = http.get("/openapi.json").json()
    paths = {"/v1/vqa", "/v1/match", "/v1/retrieve", "/v1/embed", "/healthz", "/readyz", "/metrics"}
    assert paths <= set(spec["paths"])
    r = http.post("/v1/embed", json={"texts": ["a red circle"]}, headers={"X-Request-ID": "it-req-1"})
    assert r.headers.get_list("x-request-id") == ["it-req-1"]
    r = http.post("/v1/embed", json={"texts": ["a red circle"]})
    assert len(r.headers.get_list("x-request-id")) == 1 and r.headers["x-request-id"]
