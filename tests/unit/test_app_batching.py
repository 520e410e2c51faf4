"""Preprocessing: the pure batch function and the real @serve.batch deployment method on a bare asyncio loop."""

from __future__ import annotations

import asyncio
import io
import types

import numpy as np
import pytest
from PIL import Image
from ray import serve

from serving.app.models import load_runtimes
from serving.app.preprocess import PreprocessDeployment, Preprocessed, PreprocessItem, Preprocessor
from serving.errors import PayloadTooLarge, SchemaViolation, UnknownModel, UnsupportedMediaType
from tests.unit.app_fakes import make_args, make_checkpoint


def png(side: int = 80, color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    return make_args(make_checkpoint(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def pre(args):
    return Preprocessor(load_runtimes(args), max_pixels=200 * 200)


def test_batch_gives_each_request_its_tensors(pre):
    items = [
        PreprocessItem("tiny", [png()], ["what color is the circle?", "how many squares are there?"], "r1"),
        PreprocessItem("tiny", [png(64), png(200)], ["a red circle"], "r2"),
        PreprocessItem("tiny", [], ["a blue square and a red circle"], "r3"),
    ]
    out = pre.run_batch(items)
    assert [o.error for o in out] == [None, None, None]
    assert out[0].pixels.shape == (1, 64, 64, 3) and out[0].pixels.dtype == np.uint8
    assert out[1].pixels.shape == (2, 64, 64, 3) and out[2].pixels.shape == (0, 64, 64, 3)
    assert out[0].ids.shape == (2, 24) and out[0].ids.dtype == np.int64 and out[2].ids.shape == (1, 24)
    assert tuple(out[0].pixels[0, 10, 10]) == (255, 0, 0)
    # batched tokenization equals tokenizing each request alone
    alone = pre.run_batch([items[2]])[0]
    assert np.array_equal(alone.ids, out[2].ids) and np.array_equal(alone.mask, out[2].mask)


def test_a_bad_request_fails_alone(pre):
    items = [
        PreprocessItem("tiny", [png()], ["how many circles are there?"]),
        PreprocessItem("tiny", [b"not an image"], ["a red circle"]),
        PreprocessItem("tiny", [png()], ["circle " * 40]),
        PreprocessItem("tiny", [png(300)], ["a red circle"]),
        PreprocessItem("huge", [png()], ["a red circle"]),
        PreprocessItem("tiny", [png()], ["is there a red square?"]),
    ]
    out = pre.run_batch(items)
    assert out[0].error is None and out[5].error is None and out[5].ids.shape == (1, 24)
    assert isinstance(out[1].error, UnsupportedMediaType)
    assert isinstance(out[2].error, SchemaViolation) and "over the limit of 24" in out[2].error.message
    assert isinstance(out[3].error, PayloadTooLarge)
    assert isinstance(out[4].error, UnknownModel)
    with pytest.raises(UnsupportedMediaType):
        out[1].unwrap()


@pytest.fixture()
def bare_replica_context(monkeypatch):
    """@serve.batch asks for the replica's max_ongoing_requests; outside Serve we provide one.

    Its queue is created once per decorated method and bound to the first event loop (a
    replica has one); each test runs its own loop, so the queue is dropped after each.
    """
    stub = types.SimpleNamespace(_deployment_config=types.SimpleNamespace(max_ongoing_requests=64))
    monkeypatch.setattr(serve, "get_replica_context", lambda: stub)
    lazy = PreprocessDeployment.func_or_class.batch._get_max_batch_size.__self__
    lazy._queue = None
    yield
    lazy._queue = None


def test_serve_batch_groups_concurrent_requests_on_a_bare_loop(args, bare_replica_context):
    cls = PreprocessDeployment.func_or_class
    sizes: list[int] = []

    async def main() -> list[Preprocessed]:
        replica = cls(args)
        real = replica.pre.run_batch

        def spy(items):
            sizes.append(len(items))
            return real(items)

        replica.pre.run_batch = spy
        items = [
            PreprocessItem("tiny", [png()], [f"how many {s}s are there?"], f"r{i}")
            for i, s in enumerate(["circle", "square", "triangle"] * 4)
        ]
        items[3] = PreprocessItem("tiny", [b"junk"], ["a red circle"], "bad")
        return await asyncio.gather(*(replica(it) for it in items))

    out = asyncio.run(main())
    assert len(out) == 12 and sum(sizes) == 12
    assert max(sizes) > 1, f"no batching happened: {sizes}"
    assert max(sizes) <= args.preprocess_max_batch_size
    assert isinstance(out[3].error, UnsupportedMediaType)
    assert all(o.error is None and o.pixels.shape == (1, 64, 64, 3) for i, o in enumerate(out) if i != 3)


def test_batch_size_setting_is_applied(tmp_path, bare_replica_context):
    args = make_args(make_checkpoint(tmp_path / "c"), preprocess_max_batch_size=3)
    cls = PreprocessDeployment.func_or_class
    sizes: list[int] = []

    async def main() -> None:
        replica = cls(args)
        real = replica.pre.run_batch
        replica.pre.run_batch = lambda items: (sizes.append(len(items)), real(items))[1]
        await asyncio.gather(*(replica(PreprocessItem("tiny", [], ["a red circle"])) for _ in range(7)))

    asyncio.run(main())
    assert max(sizes) <= 3 and sum(sizes) == 7
