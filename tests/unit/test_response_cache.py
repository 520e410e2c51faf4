"""Triton's response cache on image_encoder: the server flags, the model config, and callers asking for every output."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import numpy as np

from serving.app.pipeline import NATIVE_IMAGE_OUTPUTS, RequestContext
from serving.model.checkpoint import REPO_ROOT
from serving.triton.launcher import TritonInstall, TritonSettings, build_command
from serving.triton.model_config import load_config
from tests.unit.app_fakes import make_args, make_checkpoint, make_pipeline


def test_cache_flags_follow_one_setting(monkeypatch):
    bundle = TritonInstall(Path("/b/bin/tritonserver"), Path("/b/backends"), (), Path("/b/caches"))
    on = build_command(replace(TritonSettings(), response_cache_mb=64), bundle)
    assert f"--cache-config=local,size={64 * 1024 * 1024}" in on and "--cache-directory=/b/caches" in on
    assert not [c for c in build_command(replace(TritonSettings(), response_cache_mb=0), bundle) if "cache" in c]
    monkeypatch.setenv("VTFUSE_RESPONSE_CACHE_MB", "0")  # the one setting that turns it off everywhere
    assert TritonSettings().response_cache_mb == 0
    monkeypatch.delenv("VTFUSE_RESPONSE_CACHE_MB")
    assert TritonSettings().response_cache_mb == 64
    ngc = build_command(TritonSettings(), TritonInstall(Path("/opt/tritonserver/bin/tritonserver"), None, ()))
    assert "--cache-config=local,size=67108864" in ngc and not [c for c in ngc if c.startswith("--cache-directory")]


def test_only_the_image_encoder_enables_the_cache():
    enabled = {
        p.parent.name for p in (REPO_ROOT / "model_repository").glob("*/config.pbtxt")
        if load_config(p).response_cache.enable
    }
    assert enabled == {"image_encoder"}


def test_the_ingress_asks_the_image_encoder_for_every_output(tmp_path):
    """Triton's cache keys an answer by the pixels alone: a call asking for one output must not leave an
    entry that lacks the other, so the pipeline asks for both and hands back what the caller wanted."""
    pipeline, triton = make_pipeline(make_args(make_checkpoint(tmp_path)))
    rt = pipeline.runtimes["tiny"]
    px = np.zeros((1, 64, 64, 3), np.uint8)
    ctx = RequestContext("rid", 1e12)
    out = asyncio.run(pipeline.infer(rt, "image_encoder", {"PIXELS": px}, ("IMAGE_EMBEDDING",), ctx))
    assert set(out) == {"IMAGE_EMBEDDING"}
    assert set(triton.calls[-1][2]) == set(NATIVE_IMAGE_OUTPUTS)
    out = asyncio.run(pipeline.infer(rt, "text_encoder", {"INPUT_IDS": np.zeros((1, 24), np.int64),
                                                          "ATTENTION_MASK": np.ones((1, 24), np.int64)},
                                     ("TEXT_EMBEDDING",), ctx))
    assert set(out) == {"TEXT_EMBEDDING"} and triton.calls[-1][2] == ("TEXT_EMBEDDING",)  # other engines: as asked
