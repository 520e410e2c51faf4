"""`vtfuse import-hf --target torch`: imported checkpoints' PyTorch modules in Triton's Python backend.

The random-weight BLIP retrieval and ViLT VQA checkpoints of the session are imported with the
CLI, as a user runs it, into a repository of this module's own; a real tritonserver serves it
(here on the CPU: KIND_AUTO without a GPU), and the API's pipeline (real preprocessing, the real
async gRPC Triton client) answers match, embed and VQA requests, compared with `transformers`'
own forward on the processor's tensors.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from serving.app.metrics import ApiMetrics
from serving.app.models import load_imported_runtime
from serving.app.pipeline import Pipeline, RequestContext
from serving.app.preprocess import InlinePreprocess, Preprocessor
from serving.app.tasks import CaptionTask, EmbedTask, MatchTask, VqaTask
from serving.families.imported import read_repository_models
from serving.generation.params import GenerationParams
from serving.model.checkpoint import REPO_ROOT
from serving.triton.client import TritonClient, TritonClientSettings
from serving.triton.launcher import TritonServer
from tests.conftest import ARTIFACTS
from tests.helpers import running_triton
from tests.integration.test_api_hf import CAPTIONS, QUESTIONS, _embed_reference, _images, _itm_reference, _pil

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

BLIP, VILT, CAPTION, VQA_GEN = "blip-torch", "vilt-torch", "cap-torch", "vqa-gen-torch"
ROLES = {BLIP: ("image_encoder", "text_encoder", "fusion"), VILT: ("single_stream",)}
SOURCES = {BLIP: "blip", VILT: "vilt", CAPTION: "blip_caption", VQA_GEN: "blip_vqa"}


@pytest.fixture(scope="module")
def torch_repository(hf_checkpoints, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("hf-torch-target") / "repo"
    for name, key in SOURCES.items():
        cmd = [sys.executable, "-m", "serving.cli", "import-hf", str(hf_checkpoints[key]), "--name", name,
               "--repo", str(repo), "--target", "torch", "--threads", "1"]
        done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout)["precision"] == "fp32"
    return repo


@pytest.fixture(scope="module")
def triton(torch_repository: Path) -> Iterator[TritonServer]:
    with running_triton(torch_repository, ARTIFACTS / "tritonserver-hf-torch-target.log") as server:
        yield server  # type: ignore[misc]


@pytest.fixture(scope="module")
def pipeline(triton: TritonServer, torch_repository: Path) -> Pipeline:
    records = read_repository_models(torch_repository)
    runtimes = {n: load_imported_runtime(r, r.checkpoint_dir(torch_repository)) for n, r in records.items()}
    metrics = ApiMetrics()
    client = TritonClient(TritonClientSettings(url=triton.url_grpc))
    pre = InlinePreprocess(Preprocessor(runtimes, 10_000_000, metrics))
    return Pipeline(runtimes, client, pre, metrics, engine_max_batch=64)


def _run(pipeline: Pipeline, task):
    return asyncio.run(pipeline.run(task, RequestContext("test", time.monotonic() + 120)))


@pytest.mark.parametrize("name", [BLIP, VILT])
def test_engines_are_pytorch_python_models_with_the_checkpoint_weights(torch_repository, hf_checkpoints, name):
    source = hf_checkpoints["blip" if name == BLIP else "vilt"]
    for role in ROLES[name]:
        mdir = torch_repository / f"{name}_{role}"
        config = text_format.Parse((mdir / "config.pbtxt").read_text(), mc.ModelConfig())
        assert config.backend == "python" and not config.platform
        assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_AUTO]
        params = {k: v.string_value for k, v in config.parameters.items()}
        assert params["role"] == role and params["autocast"] == "fp16" and params["mode"] == "eager"
        assert params["FORCE_CPU_ONLY_INPUT_TENSORS"] == "no"
        assert "HfTorchEngineModel" in (mdir / "1" / "model.py").read_text()
        assert not (mdir / "1" / "model.onnx").exists()
        weights = mdir / "1" / "checkpoint" / "model.safetensors"
        assert hashlib.sha256(weights.read_bytes()).digest() == hashlib.sha256(
            (source / "model.safetensors").read_bytes()).digest()
        manifest = json.loads((mdir / "1" / "manifest.json").read_text())
        assert manifest["target"] == "torch" and manifest["precision"] == "fp32"
        torch_parity = manifest["parity"]["torch"]
        assert torch_parity["ok"] and torch_parity["cpu_fp32"]["ok"]
        assert torch_parity["cpu_fp32"]["tolerance"] == 1e-4
        if not torch.cuda.is_available():
            assert torch_parity["cuda"] == {"skipped": "no CUDA device visible to PyTorch here"}


def test_int8_is_refused_for_the_torch_target(hf_checkpoints, tmp_path):
    cmd = [sys.executable, "-m", "serving.cli", "import-hf", str(hf_checkpoints["vilt"]), "--name", "v",
           "--repo", str(tmp_path / "repo"), "--target", "torch", "--precision", "int8"]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "--precision int8 is for the ONNX targets" in done.stderr
    assert not (tmp_path / "repo").exists()


def test_match_equals_transformers_itm_probability(pipeline, blip):
    for image in _images(3, 81):
        res = _run(pipeline, MatchTask(model=BLIP, image=image, texts=CAPTIONS))
        ref = _itm_reference(blip, image, CAPTIONS)
        assert np.abs(np.array(res.scores) - ref).max() <= 1e-4
        assert ref.max() - ref.min() > 0.05  # the captions differ: the comparison means something


def test_embed_equals_transformers_projections(pipeline, blip):
    images = _images(2, 82)
    res = _run(pipeline, EmbedTask(model=BLIP, images=images, texts=CAPTIONS[:4]))
    img, txt = _embed_reference(blip, images, CAPTIONS[:4])
    np.testing.assert_allclose(np.array(res.image_embeddings), img, atol=1e-4)
    np.testing.assert_allclose(np.array(res.text_embeddings), txt, atol=1e-4)


def test_vqa_answers_are_vilt_answers_batched_across_image_sizes(pipeline, vilt):
    model, proc = vilt
    images = _images(4, 83)  # four sizes: requests of different shapes in one batch window

    async def all_at_once():
        ctx = RequestContext("test", time.monotonic() + 120)
        return await asyncio.gather(*(pipeline.run(VqaTask(model=VILT, image=im, questions=QUESTIONS, top_k=3), ctx)
                                      for im in images))

    results = asyncio.run(all_at_once())
    for image, res in zip(images, results):
        with torch.no_grad():
            enc = proc(images=[_pil(image)] * len(QUESTIONS), text=QUESTIONS, return_tensors="pt", padding=True)
            probs = torch.sigmoid(model(**enc).logits.double()).numpy()
        for answer, row in zip(res.answers, probs):
            order = np.argsort(-row, kind="stable")[:3]
            assert answer.answer == model.config.id2label[int(order[0])]
            assert [a.answer for a in answer.top_k] == [model.config.id2label[int(j)] for j in order]
            assert abs(answer.score - row[order[0]]) <= 1e-4


def test_generation_models_run_the_decoder_in_pytorch(torch_repository, hf_checkpoints):
    for name in (CAPTION, VQA_GEN):
        mdir = torch_repository / f"{name}_generate"
        config = text_format.Parse((mdir / "config.pbtxt").read_text(), mc.ModelConfig())
        params = {k: v.string_value for k, v in config.parameters.items()}
        assert config.model_transaction_policy.decoupled and params["engine"] == "torch"
        assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_AUTO]
        assert not list((mdir / "1").glob("*.onnx"))  # the decoder is the checkpoint's own modules
        weights = mdir / "1" / "checkpoint" / "model.safetensors"
        assert weights.read_bytes() == (hf_checkpoints[SOURCES[name]] / "model.safetensors").read_bytes()


def test_torch_target_captions_and_answers_equal_generate(pipeline, hf_checkpoints):
    from transformers import AutoProcessor, BlipForConditionalGeneration, BlipForQuestionAnswering

    cap_dir, vqa_dir = str(hf_checkpoints["blip_caption"]), str(hf_checkpoints["blip_vqa"])
    cap, cap_proc = BlipForConditionalGeneration.from_pretrained(cap_dir).eval(), AutoProcessor.from_pretrained(cap_dir)
    vqa, vqa_proc = BlipForQuestionAnswering.from_pretrained(vqa_dir).eval(), AutoProcessor.from_pretrained(vqa_dir)
    for image in _images(2, 84):
        for params in ({}, {"num_beams": 3, "max_new_tokens": 8}):
            res = _run(pipeline, CaptionTask(model=CAPTION, image=image, params=GenerationParams(**params)))
            with torch.no_grad():
                ref = cap.generate(**cap_proc(images=_pil(image), return_tensors="pt"), **params)[0]
            assert res.token_ids == [int(t) for t in ref]
        res = _run(pipeline, VqaTask(model=VQA_GEN, image=image, questions=QUESTIONS))
        for answer in res.answers:
            with torch.no_grad():
                ref = vqa.generate(**vqa_proc(images=_pil(image), text=answer.question, return_tensors="pt"))[0]
            assert answer.answer == vqa_proc.decode(ref, skip_special_tokens=True)
