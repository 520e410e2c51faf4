"""Generation served by the real stack equals transformers' `generate()`: captions, streams, generated VQA.

`blip-cap-test` (BlipForConditionalGeneration, a 512-position decoder) and `blip-vqa-test`
(BlipForQuestionAnswering) are random-weight checkpoints imported fp32 into the session's
repository (tests/conftest.py). Every served sequence is compared, token for token, with
`model.generate()` on that request alone, whatever else the server was decoding at the time.
"""

from __future__ import annotations

import base64
import io
import json
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
import torch

from serving.proto import vtfuse_pb2 as pb
from serving.proto import vtfuse_pb2_grpc as pb_grpc
from serving.shapes import world
from tests.conftest import TIGHT_CAPTION
from tests.helpers import metric_value, scrape, settled

pytestmark = pytest.mark.integration

CAPTION, VQA = "blip-cap-test", "blip-vqa-test"
GENERATE = f"{CAPTION}_generate"
SETTINGS: list[dict] = [
    {},
    {"prompt": "a picture of"},
    {"num_beams": 3},
    {"num_beams": 8, "max_new_tokens": 6},
    {"max_new_tokens": 5},
    {"min_new_tokens": 12, "max_new_tokens": 14},
    {"repetition_penalty": 1.4, "no_repeat_ngram_size": 2},
    {"prompt": "a blue", "num_beams": 2, "length_penalty": 0.5},
]
QUESTIONS = ["what color is the circle?", "how many squares are there?", "is there a red triangle?", "What SHAPE?"]


def _images(n: int, seed: int) -> list[bytes]:
    """Hidden-style renders: sizes 64-256, PNG and JPEG."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        side = rng.choice([64, 96, 150, 256])
        img = world.render(world.random_scene(rng), side, supersample=rng.choice([1, 2]))
        out.append(world.encode(img, "JPEG", 90) if i % 2 else world.encode(img, "PNG"))
    return out


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="session")
def blip_caption(hf_checkpoints):
    """The captioning test checkpoint as transformers loads it, with its processor: the reference."""
    from transformers import AutoProcessor, BlipForConditionalGeneration

    folder = str(hf_checkpoints["blip_caption"])
    return BlipForConditionalGeneration.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="session")
def blip_vqa(hf_checkpoints):
    """The generative VQA test checkpoint as transformers loads it, with its processor: the reference."""
    from transformers import AutoProcessor, BlipForQuestionAnswering

    folder = str(hf_checkpoints["blip_vqa"])
    return BlipForQuestionAnswering.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def reference(blip_caption, data: bytes, settings: dict) -> dict:
    """transformers: `generate(**processor(images, text=prompt), **params)[0]` and its decoded text."""
    from PIL import Image

    model, processor = blip_caption
    params = {k: v for k, v in settings.items() if k not in ("prompt", "stream", "seed")}
    image = Image.open(io.BytesIO(data))
    prompt = settings.get("prompt")
    enc = processor(images=image, text=prompt, return_tensors="pt") if prompt else processor(images=image,
                                                                                            return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**enc, **params)[0]
    return {"token_ids": [int(t) for t in ids], "caption": processor.decode(ids, skip_special_tokens=True)}


def caption(client: httpx.Client, url: str, data: bytes, settings: dict, model: str = CAPTION) -> httpx.Response:
    return client.post(f"{url}/v1/caption", json={"model": model, "image": _b64(data), **settings}, timeout=120)


def test_captions_equal_generate_for_every_setting(serve_app, blip_caption):
    with httpx.Client() as client:
        for i, data in enumerate(_images(4, seed=51)):
            for settings in SETTINGS:
                r = caption(client, serve_app.http_url, data, settings)
                assert r.status_code == 200, r.text
                body, ref = r.json(), reference(blip_caption, data, settings)
                assert body["token_ids"] == ref["token_ids"], (i, settings)
                assert body["caption"] == ref["caption"]
                assert body["model"] == CAPTION and body["request_id"] == r.headers["x-request-id"]
                eos = blip_caption[0].config.text_config.sep_token_id
                assert body["finish_reason"] == ("stop" if body["token_ids"][-1] == eos else "length")
                prompt = 1 + (len(settings["prompt"].split()) if "prompt" in settings else 0)
                assert body["usage"] == {"prompt_tokens": prompt, "generated_tokens": len(body["token_ids"]) - prompt}


def test_sixteen_mixed_requests_at_once_each_equal_its_solo_reference(serve_app, blip_caption):
    images = _images(16, seed=52)
    jobs = [(images[i], SETTINGS[i % len(SETTINGS)]) for i in range(16)]
    before = scrape(serve_app.triton.url_metrics)
    with httpx.Client() as client, ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda job: caption(client, serve_app.http_url, *job), jobs))
    for (data, settings), r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        assert r.json()["token_ids"] == reference(blip_caption, data, settings)["token_ids"], settings
    after = scrape(serve_app.triton.url_metrics)
    steps = metric_value(after, "vtfuse_generate_decode_steps_total", model=GENERATE) - metric_value(
        before, "vtfuse_generate_decode_steps_total", model=GENERATE)
    rows = metric_value(after, "vtfuse_generate_step_rows_sum", model=GENERATE) - metric_value(
        before, "vtfuse_generate_step_rows_sum", model=GENERATE)
    assert steps > 0 and rows / steps > 1.5  # sequences of different requests shared decoder steps


def test_a_seed_makes_sampling_reproducible_over_http_and_grpc(serve_app):
    data = _images(1, seed=53)[0]
    sample = {"do_sample": True, "temperature": 1.5, "top_k": 0, "top_p": 0.95, "max_new_tokens": 12}
    with httpx.Client() as client:
        first = caption(client, serve_app.http_url, data, {**sample, "seed": 11}).json()
        again = caption(client, serve_app.http_url, data, {**sample, "seed": 11}).json()
        others = [caption(client, serve_app.http_url, data, {**sample, "seed": s}).json() for s in (12, 13, 14)]
    assert first["token_ids"] == again["token_ids"]
    assert any(o["token_ids"] != first["token_ids"] for o in others)
    params = pb.GenerationParameters(do_sample=True, temperature=1.5, top_k=0, top_p=0.95, max_new_tokens=12, seed=11)
    with grpc.insecure_channel(serve_app.grpc_target) as ch:
        got = pb_grpc.VtfuseStub(ch).Caption(pb.CaptionRequest(image=data, model=CAPTION, parameters=params),
                                             timeout=60)
    assert list(got.token_ids) == first["token_ids"] and got.caption == first["caption"]


def test_generated_vqa_answers_equal_generate_on_each_question_alone(serve_app, blip_vqa):
    from PIL import Image

    model, processor = blip_vqa
    with httpx.Client() as client:
        for data in _images(3, seed=54):
            r = client.post(f"{serve_app.http_url}/v1/vqa", json={"model": VQA, "image": _b64(data),
                                                                  "questions": QUESTIONS}, timeout=60)
            assert r.status_code == 200, r.text
            answers = r.json()["answers"]
            assert [a["question"] for a in answers] == QUESTIONS
            for a in answers:
                enc = processor(images=Image.open(io.BytesIO(data)), text=a["question"], return_tensors="pt")
                with torch.no_grad():
                    out = model.generate(**enc)[0]
                    logits = model.text_decoder(
                        input_ids=out[None, :-1],
                        encoder_hidden_states=model.text_encoder(
                            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                            encoder_hidden_states=model.vision_model(enc["pixel_values"]).last_hidden_state,
                        ).last_hidden_state,
                    ).logits[0]
                assert a["answer"] == processor.decode(out, skip_special_tokens=True)
                logprob = torch.log_softmax(logits, -1)[torch.arange(len(out) - 1), out[1:]].sum()
                # The sequence's probability: its log within 0.01 (fp32 rounding of ~20 steps, ONNX against PyTorch).
                assert math.log(a["score"]) == pytest.approx(float(logprob), abs=1e-2)
                assert a["top_k"] == [{"answer": a["answer"], "score": a["score"]}]


def _sse(response: httpx.Response) -> list[dict]:
    return [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]


def test_http_stream_deltas_add_up_to_the_caption(serve_app, blip_caption):
    data = _images(1, seed=55)[0]
    for settings in ({}, {"prompt": "a picture of", "max_new_tokens": 9}, {"min_new_tokens": 20, "max_new_tokens": 25}):
        with httpx.Client() as client, client.stream(
            "POST", f"{serve_app.http_url}/v1/caption",
            json={"model": CAPTION, "image": _b64(data), "stream": True, **settings}, timeout=60,
        ) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = _sse(r)
        *tokens, last = events
        ref = reference(blip_caption, data, settings)
        prompt = last["usage"]["prompt_tokens"]
        assert [e["token_id"] for e in tokens] == ref["token_ids"][prompt:]  # one event per generated token
        assert [e["index"] for e in tokens] == list(range(len(tokens)))
        assert "".join(e["delta"] for e in events) == last["caption"] == ref["caption"]
        assert last["token_ids"] == ref["token_ids"] and last["finish_reason"] in ("stop", "length")


def test_grpc_stream_deltas_add_up_to_the_caption(serve_app, blip_caption):
    data = _images(1, seed=56)[0]
    with grpc.insecure_channel(serve_app.grpc_target) as ch:
        events = list(pb_grpc.VtfuseStub(ch).CaptionStream(
            pb.CaptionRequest(image=data, model=CAPTION, prompt="a picture of"), timeout=60))
    ref = reference(blip_caption, data, {"prompt": "a picture of"})
    *tokens, last = events
    assert [e.token_id for e in tokens] == ref["token_ids"][last.result.usage.prompt_tokens:]
    assert "".join(e.delta for e in events) == last.result.caption == ref["caption"]
    assert list(last.result.token_ids) == ref["token_ids"]


def _generate_metrics(serve_app, model: str = GENERATE) -> dict[str, float]:
    text = scrape(serve_app.triton.url_metrics)
    names = ("decode_steps_total", "step_rows_sum", "tokens_total", "active_sequences")
    out = {n: metric_value(text, f"vtfuse_generate_{n}", model=model) for n in names}
    out["cancelled"] = metric_value(text, "vtfuse_generate_sequences_total", model=model, outcome="cancelled")
    return out


LONG = {"min_new_tokens": 500, "max_new_tokens": 500}
SHORT = {"min_new_tokens": 6, "max_new_tokens": 6}


def test_a_request_joins_a_running_decode_and_leaves_first(serve_app, blip_caption):
    data_a, data_b = _images(2, seed=57)
    before = _generate_metrics(serve_app)
    with httpx.Client() as client, client.stream(
        "POST", f"{serve_app.http_url}/v1/caption",
        json={"model": CAPTION, "image": _b64(data_a), "stream": True, **LONG}, timeout=120,
    ) as long_stream:
        lines = long_stream.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))  # A is decoding
        short = caption(client, serve_app.http_url, data_b, SHORT)  # B joins, finishes, leaves
        assert short.status_code == 200
        events = [json.loads(first[5:])] + [json.loads(line[5:]) for line in lines if line.startswith("data:")]
    assert short.json()["token_ids"] == reference(blip_caption, data_b, SHORT)["token_ids"]
    assert events[-1]["token_ids"] == reference(blip_caption, data_a, LONG)["token_ids"]
    after = _generate_metrics(serve_app)
    steps = after["decode_steps_total"] - before["decode_steps_total"]
    rows = after["step_rows_sum"] - before["step_rows_sum"]
    tokens = after["tokens_total"] - before["tokens_total"]
    assert tokens == 500 + 6 and rows > steps  # B rode along on A's steps
    assert steps <= 500 + 1  # and added none of its own (A's 500 steps plus, at most, one)


def test_a_client_that_goes_away_frees_its_slot_within_a_step(serve_app):
    data = _images(1, seed=58)[0]
    before = _generate_metrics(serve_app)
    with httpx.Client() as client, client.stream(
        "POST", f"{serve_app.http_url}/v1/caption",
        json={"model": CAPTION, "image": _b64(data), "stream": True, **LONG}, timeout=60,
    ) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data:")
            if seen == 3:
                break  # leaving the block closes the connection
    after = settled(lambda: _generate_metrics(serve_app), until=lambda m: m["cancelled"] > before["cancelled"])
    assert after["cancelled"] == before["cancelled"] + 1 and after["active_sequences"] == 0
    assert after["tokens_total"] - before["tokens_total"] < 500  # it did not decode to the end

    with grpc.insecure_channel(serve_app.grpc_target) as ch:  # a cancelled gRPC stream alike
        call = pb_grpc.VtfuseStub(ch).CaptionStream(
            pb.CaptionRequest(image=data, model=CAPTION, parameters=pb.GenerationParameters(**LONG)), timeout=60)
        for i, _ in enumerate(call):
            if i == 2:
                call.cancel()
                break
    final = settled(lambda: _generate_metrics(serve_app), until=lambda m: m["cancelled"] > after["cancelled"])
    assert final["cancelled"] == after["cancelled"] + 1 and final["active_sequences"] == 0


def test_a_full_decoder_queue_is_a_json_429(serve_app):
    """`blip-cap-tight`: one decoder row, one waiting sequence: a third request at once is refused."""
    data = _images(1, seed=59)[0]
    results: list[httpx.Response] = []
    with httpx.Client() as client:
        def one() -> None:
            results.append(caption(client, serve_app.http_url, data, LONG, model=TIGHT_CAPTION))

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.1)
        for t in threads:
            t.join()
        refused = [r for r in results if r.status_code == 429]
        assert refused and all(r.status_code in (200, 429) for r in results)
        body = refused[0].json()
        assert body["error"]["code"] == "overloaded" and "queue is full" in body["error"]["message"]
        assert refused[0].headers["retry-after"] == "1"
        assert caption(client, serve_app.http_url, data, {}, model=TIGHT_CAPTION).status_code == 200  # still serving


@pytest.mark.parametrize(
    ("body", "status", "code", "names"),
    [
        ({"model": CAPTION, "beams": 2}, 422, "schema_violation", "beams"),
        ({"model": CAPTION, "max_new_tokens": 600}, 422, "schema_violation", "max_new_tokens"),
        ({"model": CAPTION, "prompt": " ".join(["red"] * 600)}, 422, "schema_violation", "prompt"),
        ({"model": CAPTION, "num_beams": 9}, 422, "schema_violation", "num_beams"),
        ({"model": CAPTION, "do_sample": True, "temperature": 0}, 422, "schema_violation", "temperature"),
        ({"model": CAPTION, "do_sample": True, "top_p": 1.5}, 422, "schema_violation", "top_p"),
        ({"model": CAPTION, "num_beams": 3, "stream": True}, 422, "schema_violation", "stream"),
        ({"model": CAPTION, "max_new_tokens": "5"}, 422, "schema_violation", "max_new_tokens"),
        ({"model": VQA}, 422, "task_not_supported", "vqa"),
        ({"model": "blip-test"}, 422, "task_not_supported", "match"),
        ({"model": CAPTION, "image": "***"}, 400, "invalid_base64", "image"),
        ({"model": CAPTION, "image": _b64(b"not an image")}, 415, "unsupported_media_type", "PNG"),
    ],
)
def test_bad_caption_requests_are_json_4xx_naming_the_field(serve_app, body, status, code, names):
    data = _images(1, seed=60)[0]
    with httpx.Client() as client:
        r = client.post(f"{serve_app.http_url}/v1/caption", json={"image": _b64(data), **body}, timeout=30)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["code"] == code and names in err["message"]
        assert caption(client, serve_app.http_url, data, {"max_new_tokens": 3}).status_code == 200


def test_match_on_a_caption_model_and_bad_grpc_parameters_are_refused(serve_app):
    data = _images(1, seed=61)[0]
    with httpx.Client() as client:
        r = client.post(f"{serve_app.http_url}/v1/match",
                        json={"model": CAPTION, "image": _b64(data), "texts": ["a red circle"]}, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["code"] == "task_not_supported"
    assert "its tasks are caption" in r.json()["error"]["message"]
    with grpc.insecure_channel(serve_app.grpc_target) as ch:
        stub = pb_grpc.VtfuseStub(ch)
        for params in (pb.GenerationParameters(num_beams=9), pb.GenerationParameters(top_p=0.0),
                       pb.GenerationParameters(early_stopping="sometimes")):
            with pytest.raises(grpc.RpcError) as e:
                stub.Caption(pb.CaptionRequest(image=data, model=CAPTION, parameters=params), timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as e:
            list(stub.CaptionStream(pb.CaptionRequest(image=data, model=CAPTION,
                                                      parameters=pb.GenerationParameters(num_beams=2)), timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "stream" in e.value.details()


def test_a_deadline_that_passes_is_a_504_and_frees_the_slot(serve_app):
    """A side app whose generation deadline is 0.1 s: a 500-token caption gets a JSON 504, and Triton drops it."""
    from tests.integration.conftest import side_app

    args = serve_app.args.model_copy(update={"limits": serve_app.args.limits.model_copy(
        update={"generation_timeout_s": 0.1})})
    data = _images(1, seed=62)[0]
    with httpx.Client() as client, side_app(serve_app, args, "generation-deadline", "/deadline", client):
        before = _generate_metrics(serve_app)
        r = client.post(f"{serve_app.http_url}/deadline/v1/caption",
                        json={"model": CAPTION, "image": _b64(data), **LONG}, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
        after = settled(lambda: _generate_metrics(serve_app), until=lambda m: m["cancelled"] > before["cancelled"])
        assert after["cancelled"] == before["cancelled"] + 1 and after["active_sequences"] == 0


def test_direct_triton_clients_stream_with_tritonclient(serve_app, blip_caption):
    from serving.triton.generate_client import stream_caption

    data = _images(1, seed=63)[0]
    events = list(stream_caption(serve_app.triton.url_grpc, GENERATE, data, prompt="a picture of",
                                 params={"max_new_tokens": 10}))
    ref = reference(blip_caption, data, {"prompt": "a picture of", "max_new_tokens": 10})
    *tokens, last = events
    assert last["token_ids"] == ref["token_ids"] and last["text"] == ref["caption"]
    assert [e["token_id"] for e in tokens] == ref["token_ids"][4:]  # [DEC] a picture of, then one event per token
    assert "".join(e["delta"] for e in tokens) == ref["caption"][: len("".join(e["delta"] for e in tokens))]
    with pytest.raises(RuntimeError, match="vtfuse:schema_violation: .*num_beams"):
        list(stream_caption(serve_app.triton.url_grpc, GENERATE, data, params={"num_beams": 2}))


def test_tiny_captions_fresh_scenes_through_the_api(serve_app):
    """`tiny`'s caption decoder, the default model: fresh renders (sizes 64-256, PNG and JPEG) captioned right."""
    from tests.helpers import fresh_samples

    samples = fresh_samples(40, seed=4242)
    with httpx.Client() as client, ThreadPoolExecutor(8) as pool:
        def one(sample):
            return client.post(f"{serve_app.http_url}/v1/caption", json={"image": _b64(sample[0])}, timeout=60)

        responses = list(pool.map(one, samples))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:2]
    right = sum(world.caption_matches(r.json()["caption"], scene) for r, (_, _, scene) in zip(responses, samples))
    assert right >= 0.9 * len(samples), right
    assert {r.json()["model"] for r in responses} == {"tiny"} and all(
        r.json()["finish_reason"] == "stop" for r in responses)


def test_tiny_caption_streams_over_http_and_grpc(serve_app):
    from tests.helpers import fresh_samples

    data, _, scene = fresh_samples(1, seed=4243)[0]
    with httpx.Client() as client:
        whole = client.post(f"{serve_app.http_url}/v1/caption", json={"image": _b64(data)}, timeout=60).json()
        with client.stream("POST", f"{serve_app.http_url}/v1/caption",
                           json={"image": _b64(data), "stream": True}, timeout=60) as r:
            events = _sse(r)
    assert "".join(e["delta"] for e in events) == events[-1]["caption"] == whole["caption"]
    assert world.caption_matches(whole["caption"], scene)
    with grpc.insecure_channel(serve_app.grpc_target) as ch:
        got = list(pb_grpc.VtfuseStub(ch).CaptionStream(pb.CaptionRequest(image=data), timeout=60))
    assert "".join(e.delta for e in got) == got[-1].result.caption == whole["caption"]
    assert list(got[-1].result.token_ids) == whole["token_ids"]


def test_generative_imports_take_their_layout_from_the_one_table(test_repository):
    """The vision tower 2 × 1 and the decoder 1 thread (measured beside the decode loop); the rest as tiny's fp32."""
    from export.engine_layout import ENGINE_LAYOUT, GENERATION_LAYOUT
    from export.render_repo import load_config

    vision = load_config(test_repository / f"{CAPTION}_image_encoder" / "config.pbtxt")
    assert [g.count for g in vision.instance_group] == [GENERATION_LAYOUT["image_encoder"].instances]
    assert vision.parameters["intra_op_threads"].string_value == str(GENERATION_LAYOUT["image_encoder"].threads)
    generate = load_config(test_repository / GENERATE / "config.pbtxt")
    assert generate.parameters["intra_op_threads"].string_value == str(GENERATION_LAYOUT["decoder"].threads)
    question = load_config(test_repository / f"{VQA}_question_encoder" / "config.pbtxt")
    assert [g.count for g in question.instance_group] == [ENGINE_LAYOUT["fp32"].instances]
    assert question.parameters["intra_op_threads"].string_value == str(ENGINE_LAYOUT["fp32"].threads)
