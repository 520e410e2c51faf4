"""Imported Hugging Face checkpoints served by the real stack equal `transformers`' own forward.

`blip-test` (BlipForImageTextRetrieval) and `vilt-test` (ViltForQuestionAnswering) are random-weight
checkpoints imported fp32 into the session's repository (tests/conftest.py); every served figure
is compared with the module's forward on the processor's tensors for the same images and texts.
"""

from __future__ import annotations

import base64
import random

import grpc
import httpx
import numpy as np
import pytest
import torch

from serving.proto import vtfuse_pb2 as pb
from serving.proto import vtfuse_pb2_grpc as pb_grpc
from serving.shapes import world
from tests.helpers import metric_value
from tests.hf.checkpoints import VQA_LABELS

pytestmark = pytest.mark.integration

CAPTIONS = [
    "a red circle",
    "a blue square and a green triangle",
    "a yellow triangle",
    "a green circle and a red square",
    "a blue circle",
    "two red squares",
    "a yellow square and a blue triangle and a red circle",
    "a green triangle",
]
QUESTIONS = ["what color is the circle?", "how many squares are there?", "is there a red triangle?", "What SHAPE?"]


def _images(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    sizes = [(64, 64), (120, 90), (90, 150), (200, 200), (77, 64)]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        img = world.render(world.random_scene(rng), max(w, h), supersample=2).resize((w, h))
        out.append(world.encode(img, "JPEG" if i % 2 else "PNG"))
    return out


def _pil(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@torch.no_grad()
def _itm_reference(blip, image: bytes, texts: list[str]) -> np.ndarray:
    model, proc = blip
    enc = proc(images=[_pil(image)] * len(texts), text=texts, return_tensors="pt", padding=True)
    return model(**enc, use_itm_head=True).itm_score.softmax(-1)[:, 1].numpy().astype(np.float64)


@torch.no_grad()
def _embed_reference(blip, images: list[bytes], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    model, proc = blip
    enc = proc(images=[_pil(b) for b in images], text=texts, return_tensors="pt", padding=True)
    hidden = model.vision_model(pixel_values=enc["pixel_values"]).last_hidden_state
    img = torch.nn.functional.normalize(model.vision_proj(hidden[:, 0]), dim=-1)
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                pixel_values=enc["pixel_values"][:1], use_itm_head=False)
    txt = torch.nn.functional.normalize(model.text_proj(out.question_embeds[:, 0]), dim=-1)
    return img.numpy(), txt.numpy()


def test_models_lists_native_and_imported(serve_app):
    r = httpx.get(serve_app.http_url + "/v1/models", timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["default"] == "tiny"
    models = {m["name"]: m for m in body["models"]}
    assert {"tiny", "blip-test", "vilt-test"} <= set(models)
    assert models["blip-test"]["family"] == "blip_retrieval"
    assert models["blip-test"]["tasks"] == ["match", "retrieve", "embed"]
    assert models["blip-test"]["engines"] == {
        "image_encoder": "blip-test_image_encoder",
        "text_encoder": "blip-test_text_encoder",
        "fusion": "blip-test_fusion",
        "itm": "blip-test_itm",  # the image encoder and fusion in one call, the image sent once
    }
    assert models["blip-test"]["precision"] == "fp32"
    assert models["blip-test"]["parity"]["fp32"]["fusion"]["ITM_LOGITS"]["max_abs"] <= 1e-4
    assert models["vilt-test"]["tasks"] == ["vqa"]
    assert models["vilt-test"]["architecture"] == "ViltForQuestionAnswering"
    assert models["tiny"]["tasks"] == ["vqa", "match", "retrieve", "embed", "caption"]


def test_the_python_clients_list_models(serve_app):
    from serving.client.grpc_client import VtfuseGrpcClient
    from serving.client.http_client import VtfuseClient

    with VtfuseClient(serve_app.http_url) as http:
        listed = http.models()
    assert listed.default == "tiny" and {"blip-test", "vilt-test"} <= set(listed.names)
    assert listed.get("blip-test").tasks == ["match", "retrieve", "embed"]
    with VtfuseGrpcClient(serve_app.grpc_target) as g:
        over_grpc = g.list_models()
    assert over_grpc.names == sorted(listed.names) and over_grpc.default == "tiny"
    assert over_grpc.get("blip-test") == listed.get("blip-test"), "the same ModelInfo, parity figures included"


def test_grpc_list_models(serve_app):
    with grpc.insecure_channel(serve_app.grpc_target) as ch:
        resp = pb_grpc.VtfuseStub(ch).ListModels(pb.ListModelsRequest(), timeout=10)
    models = {m.name: m for m in resp.models}
    assert resp.default_model == "tiny"
    assert list(models["blip-test"].tasks) == ["match", "retrieve", "embed"]
    assert dict(models["vilt-test"].engines) == {"single_stream": "vilt-test_single_stream"}


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_match_equals_transformers_itm_probability(serve_app, blip, seed):
    image = _images(1, seed)[0]
    r = httpx.post(serve_app.http_url + "/v1/match",
                   json={"model": "blip-test", "image": _b64(image), "texts": CAPTIONS}, timeout=30)
    assert r.status_code == 200, r.text
    served = np.array(r.json()["scores"])
    ref = _itm_reference(blip, image, CAPTIONS)
    assert r.json()["model"] == "blip-test"
    assert np.abs(served - ref).max() < 1e-3
    assert ref.max() - ref.min() > 0.05  # the weights are spread: the comparison discriminates


def test_match_over_grpc_equals_transformers(serve_app, blip):
    image = _images(1, 21)[0]
    with grpc.insecure_channel(serve_app.grpc_target) as ch:
        resp = pb_grpc.VtfuseStub(ch).Match(pb.MatchRequest(image=image, texts=CAPTIONS, model="blip-test"), timeout=30)
    assert np.abs(np.array(resp.scores) - _itm_reference(blip, image, CAPTIONS)).max() < 1e-3


def test_embed_equals_transformers_projections(serve_app, blip):
    images = _images(3, 31)
    texts = CAPTIONS[:4]
    r = httpx.post(serve_app.http_url + "/v1/embed",
                   json={"model": "blip-test", "images": [_b64(b) for b in images], "texts": texts}, timeout=30)
    assert r.status_code == 200, r.text
    img_ref, txt_ref = _embed_reference(blip, images, texts)
    for served, ref in ((r.json()["image_embeddings"], img_ref), (r.json()["text_embeddings"], txt_ref)):
        s = np.array(served)
        assert s.shape == ref.shape
        cos = (s * ref).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(ref, axis=-1))
        assert cos.min() >= 0.999


def test_retrieve_texts_ranks_as_the_itm_head(serve_app, blip):
    image = _images(1, 41)[0]
    r = httpx.post(serve_app.http_url + "/v1/retrieve",
                   json={"model": "blip-test", "image": _b64(image), "texts": CAPTIONS, "top_k": 3}, timeout=30)
    assert r.status_code == 200, r.text
    ref = _itm_reference(blip, image, CAPTIONS)
    results = r.json()["results"]
    assert [x["index"] for x in results] == list(np.argsort(-ref, kind="stable")[:3])
    assert all(abs(x["score"] - ref[x["index"]]) < 1e-3 and x["text"] == CAPTIONS[x["index"]] for x in results)


def test_retrieve_many_texts_reranks_the_itc_shortlist(serve_app, blip):
    """20 texts: the 16 most ITC-similar are re-ranked by ITM (BLIP's recipe); the best of them comes first."""
    image = _images(1, 42)[0]
    texts = [f"{c} and a {col} {s}" for c in CAPTIONS[:5] for col, s in (("red", "circle"), ("blue", "square"),
                                                                          ("green", "triangle"), ("yellow", "square"))]
    r = httpx.post(serve_app.http_url + "/v1/retrieve",
                   json={"model": "blip-test", "image": _b64(image), "texts": texts, "top_k": 2}, timeout=30)
    assert r.status_code == 200, r.text
    img, txt = _embed_reference(blip, [image], texts)
    shortlist = np.argsort(-(txt @ img[0]), kind="stable")[:16]
    itm = _itm_reference(blip, image, texts)
    best = shortlist[np.argsort(-itm[shortlist], kind="stable")[:2]]
    assert [x["index"] for x in r.json()["results"]] == list(best)


def test_retrieve_images_for_a_text(serve_app, blip):
    images = _images(5, 51)
    text = "a red circle and a blue square"
    r = httpx.post(serve_app.http_url + "/v1/retrieve",
                   json={"model": "blip-test", "text": text, "images": [_b64(b) for b in images], "top_k": 5},
                   timeout=30)
    assert r.status_code == 200, r.text
    ref = np.array([_itm_reference(blip, b, [text])[0] for b in images])
    results = r.json()["results"]
    assert [x["index"] for x in results] == list(np.argsort(-ref, kind="stable"))
    assert all(abs(x["score"] - ref[x["index"]]) < 1e-3 for x in results)


@pytest.mark.parametrize("seed", [61, 62])
def test_vilt_vqa_answers_as_transformers(serve_app, vilt, seed):
    model, proc = vilt
    for image in _images(3, seed):
        r = httpx.post(serve_app.http_url + "/v1/vqa",
                       json={"model": "vilt-test", "image": _b64(image), "questions": QUESTIONS, "top_k": 3},
                       timeout=30)
        assert r.status_code == 200, r.text
        with torch.no_grad():
            enc = proc(images=[_pil(image)] * len(QUESTIONS), text=QUESTIONS, return_tensors="pt", padding=True)
            logits = model(**enc).logits.numpy().astype(np.float64)
        for a, row in zip(r.json()["answers"], logits):
            assert a["answer"] == model.config.id2label[int(row.argmax())]
            assert a["answer"] in VQA_LABELS
            assert abs(a["score"] - 1 / (1 + np.exp(-row.max()))) < 1e-3
            assert [t["answer"] for t in a["top_k"]] == [model.config.id2label[int(i)] for i in np.argsort(-row)[:3]]


def test_vilt_over_grpc(serve_app, vilt):
    model, proc = vilt
    image = _images(1, 71)[0]
    with grpc.insecure_channel(serve_app.grpc_target) as ch:
        resp = pb_grpc.VtfuseStub(ch).Vqa(pb.VqaRequest(image=image, questions=QUESTIONS[:2], model="vilt-test"),
                                           timeout=30)
    with torch.no_grad():
        enc = proc(images=[_pil(image)] * 2, text=QUESTIONS[:2], return_tensors="pt", padding=True)
        logits = model(**enc).logits
    assert [a.answer for a in resp.answers] == [model.config.id2label[int(i)] for i in logits.argmax(-1)]


@pytest.mark.parametrize(
    ("route", "model", "body", "tasks"),
    [
        ("/v1/vqa", "blip-test", {"questions": ["what color is the circle?"]}, "match, retrieve, embed"),
        ("/v1/match", "vilt-test", {"texts": ["a red circle"]}, "vqa"),
        ("/v1/embed", "vilt-test", None, "vqa"),
    ],
)
def test_a_task_the_model_lacks_is_422_naming_its_tasks(serve_app, route, model, body, tasks):
    image = _b64(_images(1, 81)[0])
    payload = {"model": model, **(body or {"images": [image]})}
    if body is not None:
        payload["image"] = image
    r = httpx.post(serve_app.http_url + route, json=payload, timeout=30)
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "task_not_supported"
    assert f"its tasks are {tasks}" in err["message"] and model in err["message"]


def test_bad_input_to_imported_models_keeps_the_error_contract(serve_app):
    url = serve_app.http_url
    bad_image = httpx.post(url + "/v1/match", json={"model": "blip-test", "image": _b64(b"not an image at all"),
                                                    "texts": ["a red circle"]}, timeout=30)
    assert bad_image.status_code == 415 and bad_image.json()["error"]["code"] == "unsupported_media_type"
    long_text = " ".join(["red"] * 60)  # over the checkpoint's 48 positions
    too_long = httpx.post(url + "/v1/match", json={"model": "blip-test", "image": _b64(_images(1, 1)[0]),
                                                   "texts": [long_text]}, timeout=30)
    assert too_long.status_code == 422 and "over this model's limit of 48" in too_long.json()["error"]["message"]
    attention = httpx.post(url + "/v1/vqa", json={"model": "vilt-test", "image": _b64(_images(1, 2)[0]),
                                                  "questions": ["what color?"], "return_attention": True}, timeout=30)
    assert attention.status_code == 422 and "single-stream" in attention.json()["error"]["message"]
    assert httpx.get(url + "/healthz", timeout=10).status_code == 200


def test_a_replica_apart_from_the_repository_learns_imported_models_from_triton(triton, tmp_path, blip):
    """As on Kubernetes: the API's repository folder has tiny only; Triton's vtfuse_catalog names the rest."""
    import asyncio

    from serving.app.catalog import fetch_catalog
    from serving.app.metrics import ApiMetrics
    from serving.app.models import load_runtimes
    from serving.app.pipeline import Pipeline, RequestContext
    from serving.app.preprocess import InlinePreprocess, Preprocessor, imported_catalog
    from serving.app.settings import AppArgs, ModelSpec
    from serving.app.tasks import MatchTask
    from serving.families.imported import from_catalog, read_repository_models
    from serving.triton.client import TritonClient

    repo = triton.settings.repository
    served = fetch_catalog(AppArgs(triton_url=triton.url_grpc).triton_settings())
    from tests.conftest import HF_MODELS, TIGHT_CAPTION

    assert sorted(served["models"]) == sorted([*HF_MODELS, TIGHT_CAPTION])
    learnt, _ = from_catalog(served["models"]["blip-test"])
    assert learnt == read_repository_models(repo)["blip-test"]

    args = AppArgs(
        triton_url=triton.url_grpc,
        repository=str(tmp_path),  # no vtfuse_models.json here
        models={"tiny": ModelSpec(checkpoint=str(repo / "fusion" / "1" / "checkpoint"))},
    )
    image = _images(1, 91)[0]

    async def run() -> list[float]:
        runtimes = load_runtimes(args)
        assert sorted(runtimes) == ["tiny"]
        triton_client = TritonClient(args.triton_settings())
        pipeline = Pipeline(runtimes, triton_client, InlinePreprocess(Preprocessor(runtimes, args.limits.max_pixels)),
                            ApiMetrics(), catalog=imported_catalog(args))
        try:
            await pipeline.learn("blip-test")
            assert {"blip-test", "vilt-test"} <= set(runtimes)
            ctx = RequestContext("catalog-test", __import__("time").monotonic() + 30)
            res = await pipeline.run(MatchTask("blip-test", image, CAPTIONS), ctx)
            return list(res.scores)
        finally:
            await triton_client.close()

    scores = asyncio.run(run())
    assert np.abs(np.array(scores) - _itm_reference(blip, image, CAPTIONS)).max() < 1e-3


def test_match_sends_the_image_once_and_never_its_features(serve_app, blip):
    """/v1/match on BLIP: one call to `blip-test_itm` with the pixels; no features per text on the wire."""
    from tests.integration.test_api_metrics import settled as settled_api
    from tests.integration.test_api_metrics import wait_for

    def sent(text: str, engine: str) -> float:
        return metric_value(text, "vtfuse_triton_tensor_bytes_total", engine=engine, direction="sent")

    texts = [f"{c} {extra}".strip() for c in CAPTIONS for extra in ("", "and a circle", "?", "and a square")][:32]
    image = _images(1, 77)[0]
    before = settled_api(serve_app.http_url, lambda t: (sent(t, "itm"), sent(t, "fusion")))
    r = httpx.post(serve_app.http_url + "/v1/match",
                   json={"model": "blip-test", "image": _b64(image), "texts": texts}, timeout=30)
    assert r.status_code == 200, r.text
    assert np.abs(np.array(r.json()["scores"]) - _itm_reference(blip, image, texts)).max() < 1e-3
    after = wait_for(serve_app.http_url, lambda t: sent(t, "itm") > sent(before, "itm"))
    assert sent(after, "fusion") == sent(before, "fusion")  # nothing went to the fusion engine from the API
    pixels, ids = 64 * 64 * 3, 2 * 32 * 16 * 8  # one uint8 image; ids and mask, 32 texts x 16 tokens, int64
    assert sent(after, "itm") - sent(before, "itm") == pixels + ids


def test_retrieve_with_every_candidate_shortlisted_is_exact(serve_app, blip):
    """`shortlist: "all"` scores every text with ITM: the ranking is transformers' ITM order itself."""
    texts = [f"{c} {extra}".strip() for c in CAPTIONS for extra in ("", "and a circle", "?", "and a square")][:30]
    image = _images(1, 78)[0]
    body = {"model": "blip-test", "image": _b64(image), "texts": texts, "top_k": 5, "shortlist": "all"}
    r = httpx.post(serve_app.http_url + "/v1/retrieve", json=body, timeout=30)
    assert r.status_code == 200, r.text
    with torch.no_grad():
        itm = _itm_reference(blip, image, texts)
    assert [x["index"] for x in r.json()["results"]] == [int(i) for i in np.argsort(-itm, kind="stable")[:5]]
    with grpc.insecure_channel(serve_app.grpc_target) as ch:
        resp = pb_grpc.VtfuseStub(ch).Retrieve(pb.RetrieveRequest(image=image, texts=texts, top_k=5, shortlist=-1,
                                                                  model="blip-test"), timeout=30)
    assert [x.index for x in resp.results] == [x["index"] for x in r.json()["results"]]
