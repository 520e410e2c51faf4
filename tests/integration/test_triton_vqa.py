"""The real tritonserver on the built embedded repository: `vqa` answers, batches, and refuses bad input."""

from __future__ import annotations

import concurrent.futures as cf
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.helpers import fresh_samples, metric_value, scrape, settled

pytestmark = pytest.mark.integration


def _inputs(mod, image: bytes, question: str):
    a = mod.InferInput("IMAGE", [1, 1], "BYTES")
    a.set_data_from_numpy(np.array([[image]], dtype=object))
    b = mod.InferInput("QUESTION", [1, 1], "BYTES")
    b.set_data_from_numpy(np.array([[question.encode()]], dtype=object))
    return [a, b]


def _answer(result) -> str:
    return result.as_numpy("ANSWER").reshape(-1)[0].decode()


def test_vqa_over_grpc_answers_fresh_renders(triton):
    client = grpcclient.InferenceServerClient(triton.url_grpc)
    samples = fresh_samples(100, seed=2024)
    correct = sum(
        _answer(client.infer("vqa", _inputs(grpcclient, img, qa.question))) == qa.answer for img, qa, _ in samples
    )
    assert correct >= 90, f"{correct}/100 correct over gRPC"


def test_vqa_over_http_answers_fresh_renders(triton):
    client = httpclient.InferenceServerClient(triton.url_http.removeprefix("http://"))
    samples = fresh_samples(100, seed=7)
    correct = 0
    for img, qa, _ in samples:
        res = client.infer("vqa", _inputs(httpclient, img, qa.question))
        correct += _answer(res) == qa.answer
        score = float(res.as_numpy("SCORE").reshape(-1)[0])
        assert 0.0 < score <= 1.0
    assert correct >= 90, f"{correct}/100 correct over HTTP"


def _counts(text: str, model: str) -> tuple[float, float]:
    """(items the model ran, executions).

    The burst's 256 images are all distinct: image_encoder's response cache (keyed on the whole
    request) cannot answer any of them. With repeats it did, and a hit on a request `vqa` had
    batched counts once for all its images, so no count says how many items were answered.
    """
    return (
        metric_value(text, "nv_inference_count", model=model),
        metric_value(text, "nv_inference_exec_count", model=model),
    )


def test_burst_of_256_at_concurrency_32_batches_every_engine(triton):
    samples = fresh_samples(256, seed=99)
    before = scrape(triton.url_metrics)

    local = threading.local()

    def one(i: int) -> str:
        # One connection per worker, kept, as a client at concurrency 32 holds them (a new channel per
        # request spreads the burst out by its connection set-up; with queue delay 0 nothing waits for it).
        if not hasattr(local, "client"):
            local.client = grpcclient.InferenceServerClient(triton.url_grpc)
        c = local.client
        img, qa, _ = samples[i]
        return _answer(c.infer("vqa", _inputs(grpcclient, img, qa.question), client_timeout=60))

    with cf.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, range(256)))
    assert len(answers) == 256  # any error would have raised
    models = ("image_encoder", "text_encoder", "fusion", "vqa")

    def deltas() -> dict[str, tuple[float, float]]:
        after = scrape(triton.url_metrics)
        out = {}
        for model in models:
            (c0, e0), (c1, e1) = _counts(before, model), _counts(after, model)
            out[model] = (c1 - c0, e1 - e0)
        return out

    counted = settled(deltas, timeout=30, until=lambda c: all(c[m][0] >= 256 for m in models))
    hits = metric_value(scrape(triton.url_metrics), "nv_cache_num_hits_per_model", model="image_encoder") - (
        metric_value(before, "nv_cache_num_hits_per_model", model="image_encoder"))
    for model in models:
        assert counted[model][0] >= 256, (model, counted[model], f"image_encoder cache hits {hits:.0f}")
    items, execs = counted["fusion"]
    assert items / execs >= 4, f"fusion ran {items:.0f} items in {execs:.0f} executions"


@pytest.fixture()
def grpc_client(triton):
    return grpcclient.InferenceServerClient(triton.url_grpc)


def test_wrong_dtype_is_refused(grpc_client):
    x = grpcclient.InferInput("PIXELS", [1, 64, 64, 3], "FP32")
    x.set_data_from_numpy(np.zeros((1, 64, 64, 3), dtype=np.float32))
    with pytest.raises(InferenceServerException, match="(?i)data-type|datatype"):
        grpc_client.infer("image_encoder", [x])


def test_wrong_shape_is_refused(grpc_client):
    x = grpcclient.InferInput("PIXELS", [1, 32, 32, 3], "UINT8")
    x.set_data_from_numpy(np.zeros((1, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(InferenceServerException, match="(?i)shape"):
        grpc_client.infer("image_encoder", [x])


def test_missing_input_is_refused(grpc_client):
    img, _, _ = fresh_samples(1, seed=1)[0]
    with pytest.raises(InferenceServerException, match="(?i)expected 2 inputs|QUESTION"):
        grpc_client.infer("vqa", _inputs(grpcclient, img, "how many circles are there?")[:1])


def test_non_image_bytes_fail_only_their_request(triton, grpc_client):
    good, qa, _ = fresh_samples(1, seed=5)[0]
    with pytest.raises(InferenceServerException, match="unsupported_media_type"):
        grpc_client.infer("vqa", _inputs(grpcclient, b"not an image at all", "how many circles are there?"))
    # The server stays ready and answers the next request.
    assert grpc_client.is_server_ready()
    assert _answer(grpc_client.infer("vqa", _inputs(grpcclient, good, qa.question))) == qa.answer


def test_bad_request_in_a_batch_leaves_the_others_answered(triton):
    """Sent concurrently so the dynamic batcher groups them: only the bad one errs."""
    samples = fresh_samples(16, seed=11)

    def one(i: int):
        c = grpcclient.InferenceServerClient(triton.url_grpc)
        img, qa, _ = samples[i]
        data = b"\x89PNG garbage" if i == 3 else img
        try:
            return _answer(c.infer("vqa", _inputs(grpcclient, data, qa.question)))
        except InferenceServerException as e:
            return e

    with cf.ThreadPoolExecutor(16) as pool:
        out = list(pool.map(one, range(16)))
    assert isinstance(out[3], InferenceServerException)
    assert all(isinstance(o, str) for i, o in enumerate(out) if i != 3)
