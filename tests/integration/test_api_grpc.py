"""The gRPC API on Ray Serve's gRPC proxy: the four calls answer right, errors carry the right status codes."""

from __future__ import annotations

import asyncio
import random

import grpc
import numpy as np
import pytest

from serving.client import (
    ApiError,
    AsyncVtfuseClient,
    AsyncVtfuseGrpcClient,
    BadRequest,
    EmbedResult,
    MatchResult,
    RetrieveResult,
    VqaResult,
    VtfuseClient,
    VtfuseGrpcClient,
)
from serving.proto import vtfuse_pb2 as pb
from serving.proto import vtfuse_pb2_grpc as pb_grpc
from serving.shapes import world
from tests.helpers import fresh_samples

pytestmark = pytest.mark.integration

PNG = world.encode(world.render(world.random_scene(random.Random(0)), 64), "PNG")


@pytest.fixture(scope="module")
def client(serve_app):
    with VtfuseGrpcClient(serve_app.grpc_target, timeout=60) as c:
        yield c


def render(scene, rng) -> bytes:
    return world.encode(world.render(scene, rng.choice([64, 128]), supersample=2), "PNG")


def test_vqa_over_grpc_answers_fresh_renders(client):
    samples = fresh_samples(60, seed=5150)
    correct = 0
    for img, qa, _ in samples:
        resp = client.vqa(img, [qa.question], top_k=2)
        assert resp.model == "tiny" and len(resp.answers) == 1 and len(resp.answers[0].top_k) == 2
        correct += resp.answers[0].answer == qa.answer
    assert correct / len(samples) >= 0.90, f"VQA over gRPC {correct}/{len(samples)}"


def test_vqa_attention_grid_over_grpc(client):
    img, qa, _ = fresh_samples(1, seed=3)[0]
    (a,) = client.vqa(img, [qa.question], return_attention=True).answers
    assert (len(a.attention), {len(row) for row in a.attention}) == (8, {8})
    assert sum(map(sum, a.attention)) == pytest.approx(1.0, abs=1e-3)
    assert a.tokens[0] == "[CLS]" and a.tokens[-1] == "[SEP]" and len(a.tokens) > 3


def test_match_retrieve_embed_over_grpc(client):
    rng = random.Random(66)
    wins = first = 0
    for _ in range(20):
        scene = world.random_scene(rng)
        img = render(scene, rng)
        true = world.caption(world.scene_items(scene), rng)
        distractors = world.distractor_captions(scene, rng, 7)
        s = client.match(img, [true, distractors[0]]).scores
        wins += s[0] > s[1]
        texts = [true, *distractors]
        rng.shuffle(texts)
        res = client.retrieve_texts(img, texts, top_k=2).results
        assert len(res) == 2 and res[0].score >= res[1].score and texts[res[0].index] == res[0].text
        first += res[0].text == true
    assert wins >= 18 and first >= 17, (wins, first)
    scenes = [world.random_scene(rng) for _ in range(4)]
    res = client.retrieve_images(world.caption(world.scene_items(scenes[2])), [render(s, rng) for s in scenes]).results
    assert len(res) == 1 and 0 <= res[0].index < 4 and res[0].text is None
    emb = client.embed(images=[render(scenes[0], rng)], texts=["a red circle", "a blue square"])
    assert len(emb.image_embeddings) == 1 and len(emb.text_embeddings) == 2
    assert np.linalg.norm(emb.image_embeddings[0]) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize(
    "method, request_, status, code",
    [
        ("Vqa", pb.VqaRequest(image=b"not an image", questions=["q"]), "INVALID_ARGUMENT", "unsupported_media_type"),
        (
            "Vqa",
            pb.VqaRequest(image=b"\xff\xd8\xff\xe0trunc", questions=["q"]),
            "INVALID_ARGUMENT",
            "unsupported_media_type",
        ),
        ("Vqa", pb.VqaRequest(questions=["q"]), "INVALID_ARGUMENT", "schema_violation"),
        ("Vqa", pb.VqaRequest(image=PNG, questions=[]), "INVALID_ARGUMENT", "schema_violation"),
        ("Vqa", pb.VqaRequest(image=PNG, questions=["q"] * 33), "RESOURCE_EXHAUSTED", "payload_too_large"),
        ("Vqa", pb.VqaRequest(image=PNG, questions=["circle " * 50]), "INVALID_ARGUMENT", "schema_violation"),
        ("Match", pb.MatchRequest(image=PNG, texts=["a"], model="huge"), "INVALID_ARGUMENT", "unknown_model"),
        ("Retrieve", pb.RetrieveRequest(image=PNG, texts=["a"], text="b"), "INVALID_ARGUMENT", "schema_violation"),
        ("Retrieve", pb.RetrieveRequest(top_k=1), "INVALID_ARGUMENT", "schema_violation"),
        ("Embed", pb.EmbedRequest(), "INVALID_ARGUMENT", "schema_violation"),
    ],
)
def test_bad_requests_get_grpc_status_codes(serve_app, client, method, request_, status, code):
    with grpc.insecure_channel(serve_app.grpc_target) as ch:
        stub = pb_grpc.VtfuseStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            getattr(stub, method)(request_, timeout=30, metadata=[("request_id", "grpc-bad-1")])
        assert e.value.code().name == status
        assert e.value.details().startswith(code)
        meta = dict(e.value.trailing_metadata())
        assert meta.get("error-code") == code and meta.get("request_id") == "grpc-bad-1"
    img, qa, _ = fresh_samples(1, seed=11)[0]
    assert client.vqa(img, [qa.question]).answers[0].answer  # still serving


def test_client_raises_api_error(client):
    with pytest.raises(ApiError) as e:
        client.embed()
    assert e.value.status == "INVALID_ARGUMENT" and e.value.code == "schema_violation"


def test_every_client_gives_the_same_typed_results(serve_app, client):
    """HTTP and gRPC, sync and async: the same inputs give the same typed results, each with its request id."""
    img, qa, scene = fresh_samples(1, seed=77)[0]
    true = world.caption(world.scene_items(scene), random.Random(1))
    texts = [true, "a purple star", "two dogs on a beach"]

    def calls(c):
        return c.vqa(img, [qa.question], top_k=2), c.match(img, texts), c.retrieve_texts(img, texts, top_k=2), (
            c.embed(images=[img], texts=texts[:1])
        ), c.models()

    async def acalls(c):
        return await asyncio.gather(
            c.vqa(img, [qa.question], top_k=2),
            c.match(img, texts),
            c.retrieve_texts(img, texts, top_k=2),
            c.embed(images=[img], texts=texts[:1]),
            c.models(),
        )

    async def both_async():
        async with AsyncVtfuseClient(serve_app.http_url) as h, AsyncVtfuseGrpcClient(serve_app.grpc_target) as g:
            return await acalls(h), await acalls(g)

    with VtfuseClient(serve_app.http_url) as http:
        runs = {"http": calls(http), "grpc": calls(client)}
    runs["http-async"], runs["grpc-async"] = asyncio.run(both_async())
    ref_vqa, ref_match, ref_ret, ref_emb, ref_models = runs["http"]
    assert isinstance(ref_vqa, VqaResult) and ref_vqa.answer == qa.answer and len(ref_vqa.top_k) == 2
    assert isinstance(ref_match, MatchResult) and ref_match.best == 0
    assert isinstance(ref_ret, RetrieveResult) and ref_ret.best.text == true and ref_ret.best.index == 0
    assert isinstance(ref_emb, EmbedResult) and len(ref_emb.image_embeddings[0]) == len(ref_emb.text_embeddings[0])
    assert ref_models.default == "tiny" and ref_models.get("tiny").tasks == ["vqa", "match", "retrieve", "embed",
                                                                                  "caption"]
    for name, (vqa, match, ret, emb, models) in runs.items():
        assert vqa.model == "tiny" and vqa.answer == ref_vqa.answer, name
        assert [t.answer for t in vqa.top_k] == [t.answer for t in ref_vqa.top_k], name
        assert vqa.score == pytest.approx(ref_vqa.score, abs=1e-4), name
        assert match.scores == pytest.approx(ref_match.scores, abs=1e-4), name
        assert [(h.index, h.text) for h in ret.results] == [(h.index, h.text) for h in ref_ret.results], name
        assert np.allclose(emb.image_embeddings, ref_emb.image_embeddings, atol=1e-4), name
        assert models.names == ref_models.names, name
        assert all(r.request_id for r in (vqa, match, ret, emb, models)), name
    with pytest.raises(BadRequest) as e:
        client.embed(request_id="typed-err-1")
    assert (e.value.status, e.value.code, e.value.request_id) == ("INVALID_ARGUMENT", "schema_violation", "typed-err-1")
