"""Stage 4: artefacts land in `<repo>/<model>/<version>/` with a manifest whose hashes are the files'."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from export.engine import ENGINES_FILE
from export.errors import InstallError
from export.install import install
from export.onnx_export import sha256_file
from export.render_repo import load_config
from serving.model.io_spec import ENGINES, engine_specs
from serving.model.model import FusionConfig

MODELS = sorted((*ENGINES, "preprocess", "vqa", "vtfuse_catalog", "caption"))
# The caption decoder's generate model (export/caption.py): its graphs and generation files, no engine.
CAPTION_ARTEFACTS = {
    "cross_kv.onnx", "decoder_step.onnx", "decoder.json", "checkpoint/generation.json", "checkpoint/tokenizer.json",
}


def _manifest(repo: Path, model: str, version: int = 1) -> dict:
    return json.loads((repo / model / str(version) / "manifest.json").read_text())


def test_onnxruntime_install_hashes_every_artefact(onnx_dir, source_repo, tmp_path):
    repo = tmp_path / "ort"
    result = install(onnx_dir, "onnxruntime", repo=repo, source_repo=source_repo)
    assert sorted(result["models"]) == MODELS
    for model in MODELS:
        vdir = repo / model / "1"
        m = _manifest(repo, model)
        expected = {"checkpoint/config.json", "checkpoint/tokenizer.json", "checkpoint/answers.json"}
        if model in ENGINES:
            expected.add("model.onnx")
            assert sha256_file(vdir / "model.onnx") == sha256_file(onnx_dir / f"{model}.onnx")
        if model == "caption":
            expected = CAPTION_ARTEFACTS
        assert set(m["artefacts"]) == expected
        for rel, sha in m["artefacts"].items():
            assert sha256_file(vdir / rel) == sha, rel
        assert m["config_pbtxt_sha256"] == sha256_file(repo / model / "config.pbtxt")
        assert (m["target"], m["preset"], m["version"], m["export"]["opset"]) == ("onnxruntime", "tiny", 1, 17)
        assert m["source_checkpoint"]["source"] == "random:tiny"
        assert len(m["source_checkpoint"]["model_safetensors_sha256"]) == 64
        assert m["created"].endswith("Z")


def test_engine_manifests_hold_their_own_parity_figures(onnx_dir, source_repo, tmp_path):
    repo = tmp_path / "ort"
    install(onnx_dir, "onnxruntime", repo=repo, source_repo=source_repo)
    parity = json.loads((onnx_dir / "parity.json").read_text())
    m = _manifest(repo, "fusion")
    assert m["parity"]["ok"] is True
    assert m["parity"]["real"] == parity["real"]["fusion"]
    assert sorted(m["parity"]["random"]) == ["CROSS_ATTENTION", "ITM_LOGIT", "VQA_LOGITS"]
    assert _manifest(repo, "vqa")["parity"]["random"] == parity["random"]


def test_onnxruntime_configs_parse_with_native_backend_and_io_spec_dims(onnx_dir, source_repo, tmp_path):
    repo = tmp_path / "ort"
    install(onnx_dir, "onnxruntime", repo=repo, source_repo=source_repo)
    specs = engine_specs(FusionConfig.preset("tiny"))
    for e in ENGINES:
        config = load_config(repo / e / "config.pbtxt")
        assert (config.backend, config.platform, config.default_model_filename) == (
            "onnxruntime",
            "onnxruntime_onnx",
            "model.onnx",
        )
        assert [(t.name, tuple(t.dims)) for t in config.input] == [(t.name, t.dims) for t in specs[e].inputs]
        assert [(t.name, tuple(t.dims)) for t in config.output] == [(t.name, t.dims) for t in specs[e].outputs]
        assert "onnx_file" not in config.parameters and "intra_op_threads" not in config.parameters
        assert not (repo / e / "1" / "model.py").exists(), "a native engine carries no Python code"
    for m in ("preprocess", "vqa", "vtfuse_catalog", "caption"):
        assert load_config(repo / m / "config.pbtxt").backend == "python"
        assert (repo / m / "1" / "model.py").read_bytes() == (source_repo / m / "1" / "model.py").read_bytes()


@pytest.mark.parametrize(
    ("target", "precision", "parameter", "threads"),
    [
        ("embedded", "int8", "intra_op_threads", "1"),
        ("embedded", "fp32", "intra_op_threads", "2"),
        ("onnxruntime", "fp32", "intra_op_thread_count", "2"),
        ("onnxruntime", "int8", "intra_op_thread_count", "1"),
        ("torch", "fp32", "torch_threads", "2"),
    ],
)
def test_rendered_engines_get_the_threads_their_precision_measured_best_with(
    onnx_dir, source_repo, tmp_path, target, precision, parameter, threads
):
    # int8: two instances of one thread each beat two of two threads on 2 cores; fp32 the other way.
    repo = tmp_path / target
    install(onnx_dir, target, repo=repo, source_repo=source_repo, precision=precision)
    for e in ENGINES:
        config = load_config(repo / e / "config.pbtxt")
        assert config.parameters[parameter].string_value == threads, e
        assert _manifest(repo, e)["config_pbtxt_sha256"] == sha256_file(repo / e / "config.pbtxt")
    assert load_config(source_repo / "fusion" / "config.pbtxt").parameters["intra_op_threads"].string_value == "1"


def test_tensorrt_install_needs_stage_3_and_writes_nothing_without_it(onnx_dir, source_repo, tmp_path):
    repo = tmp_path / "trt"
    with pytest.raises(InstallError, match="vtfuse export engine"):
        install(onnx_dir, "tensorrt", repo=repo, source_repo=source_repo)
    assert not repo.exists()


def test_tensorrt_install_copies_the_plans_stage_3_recorded(onnx_dir, source_repo, tmp_path):
    # Stage 3's output as a GPU machine would leave it (plans are opaque bytes to stage 4).
    stage = tmp_path / "onnx"
    shutil.copytree(onnx_dir, stage)
    info = json.loads((stage / "export.json").read_text())
    engines = {}
    for e in ENGINES:
        plan = tmp_path / "cache" / f"{e}.plan"
        plan.parent.mkdir(exist_ok=True)
        plan.write_bytes(f"plan of {e}".encode())
        engines[e] = {
            "plan": str(plan),
            "plan_sha256": sha256_file(plan),
            "onnx_sha256": info["files"][e]["sha256"],
            "profile": {"min": 1, "opt": 32, "max": 64},
            "parity": {"batch_1": {}},
        }
    gpu = {"tensorrt": "10.0.0", "gpu": "NVIDIA H100", "fp16": True, "engines": engines}
    (stage / ENGINES_FILE).write_text(json.dumps(gpu))
    repo = tmp_path / "trt"
    install(stage, "tensorrt", repo=repo, source_repo=source_repo)
    for e in ENGINES:
        m = _manifest(repo, e)
        assert m["artefacts"]["model.plan"] == engines[e]["plan_sha256"]
        assert not (repo / e / "1" / "model.onnx").exists()
        assert m["tensorrt"]["gpu"] == "NVIDIA H100" and m["tensorrt"]["profile"]["max"] == 64
        config = load_config(repo / e / "config.pbtxt")
        assert (config.platform, config.backend, config.default_model_filename) == (
            "tensorrt_plan",
            "tensorrt",
            "model.plan",
        )
        assert all(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in config.instance_group)


def test_a_plan_built_from_another_onnx_is_refused(onnx_dir, source_repo, tmp_path):
    stage = tmp_path / "onnx"
    shutil.copytree(onnx_dir, stage)
    plan = tmp_path / "x.plan"
    plan.write_bytes(b"x")
    entry = {"plan": str(plan), "plan_sha256": "", "onnx_sha256": "0" * 64, "profile": {}}
    (stage / ENGINES_FILE).write_text(json.dumps({"engines": {e: entry for e in ENGINES}}))
    with pytest.raises(InstallError, match="another ONNX file"):
        install(stage, "tensorrt", repo=tmp_path / "trt", source_repo=source_repo)


def test_embedded_install_into_the_source_repository_keeps_its_python_models(onnx_dir, source_repo):
    before = {p: p.read_bytes() for p in source_repo.rglob("*") if p.is_file()}
    install(onnx_dir, "embedded", repo=source_repo, source_repo=source_repo, version=2)
    for path, content in before.items():  # committed files untouched
        assert path.read_bytes() == content
    for e in ENGINES:
        assert (source_repo / e / "2" / "model.onnx").exists()
        assert (source_repo / e / "2" / "model.py").read_bytes() == (source_repo / e / "1" / "model.py").read_bytes()
        assert _manifest(source_repo, e, 2)["target"] == "embedded"
    assert (source_repo / "vqa" / "2" / "checkpoint" / "answers.json").exists()


def test_reinstall_replaces_artefacts(onnx_dir, source_repo, tmp_path):
    repo = tmp_path / "ort"
    install(onnx_dir, "onnxruntime", repo=repo, source_repo=source_repo)
    (repo / "fusion" / "1" / "stale.txt").write_text("left from an earlier build")
    (repo / "fusion" / "1" / "model.onnx").write_bytes(b"corrupt")
    install(onnx_dir, "onnxruntime", repo=repo, source_repo=source_repo)
    assert sha256_file(repo / "fusion" / "1" / "model.onnx") == sha256_file(onnx_dir / "fusion.onnx")
    assert not (repo / "fusion" / "1" / "stale.txt").exists()  # a rendered repository is rebuilt whole


def test_embedded_install_refuses_a_repository_of_another_preset(onnx_dir, source_repo, tmp_path):
    stage = tmp_path / "onnx"
    shutil.copytree(onnx_dir, stage)
    (stage / "checkpoint" / "config.json").write_text(FusionConfig.preset("small").to_json())
    with pytest.raises(InstallError, match="--repo"):
        install(stage, "embedded", repo=source_repo, source_repo=source_repo)


def test_install_refuses_unchecked_exports(onnx_dir, source_repo, tmp_path):
    stage = tmp_path / "onnx"
    shutil.copytree(onnx_dir, stage)
    (stage / "parity.json").unlink()
    with pytest.raises(InstallError, match="vtfuse export check"):
        install(stage, "onnxruntime", repo=tmp_path / "ort", source_repo=source_repo)
    report = json.loads((onnx_dir / "parity.json").read_text())
    (stage / "parity.json").write_text(json.dumps({**report, "ok": False}))
    with pytest.raises(InstallError, match="parity failure"):
        install(stage, "onnxruntime", repo=tmp_path / "ort", source_repo=source_repo)


def test_libtorch_install_puts_traced_engines_behind_ensembles(onnx_dir, source_repo, tmp_path):
    """`--target libtorch`: `<engine>` is an ensemble with the engine's tensors over `<engine>_libtorch`
    (Triton's PyTorch backend: `<name>__<index>`), whose model.pt answers as ONNX Runtime does."""
    import numpy as np
    import torch

    from export.check import ort_session, random_inputs, run_session

    repo = tmp_path / "libtorch"
    result = install(onnx_dir, "libtorch", repo=repo, source_repo=source_repo)
    assert sorted(result["models"]) == sorted((*MODELS, *(f"{e}_libtorch" for e in ENGINES)))
    cfg = FusionConfig.preset("tiny")
    specs = engine_specs(cfg)
    committed = {e: load_config(source_repo / e / "config.pbtxt") for e in ENGINES}
    for e in ENGINES:
        ensemble, engine = load_config(repo / e / "config.pbtxt"), load_config(repo / f"{e}_libtorch" / "config.pbtxt")
        assert ensemble.platform == "ensemble" and not ensemble.instance_group
        assert not ensemble.HasField("dynamic_batching")
        assert [(t.name, tuple(t.dims)) for t in ensemble.input] == [(t.name, t.dims) for t in specs[e].inputs]
        assert [(t.name, tuple(t.dims)) for t in ensemble.output] == [(t.name, t.dims) for t in specs[e].outputs]
        assert ensemble.response_cache.enable == committed[e].response_cache.enable
        (step,) = ensemble.ensemble_scheduling.step
        assert step.model_name == f"{e}_libtorch"
        assert dict(step.input_map) == {f"{t.name}__{i}": t.name for i, t in enumerate(specs[e].inputs)}
        assert dict(step.output_map) == {f"{t.name}__{i}": t.name for i, t in enumerate(specs[e].outputs)}
        assert (engine.backend, engine.platform, engine.default_model_filename) == (
            "pytorch", "pytorch_libtorch", "model.pt"
        )
        assert [t.name for t in engine.input] == [f"{t.name}__{i}" for i, t in enumerate(specs[e].inputs)]
        assert [t.name for t in engine.output] == [f"{t.name}__{i}" for i, t in enumerate(specs[e].outputs)]
        assert engine.max_batch_size == ensemble.max_batch_size == committed[e].max_batch_size
        assert engine.dynamic_batching == committed[e].dynamic_batching and not engine.parameters
        assert all(g.kind == mc.ModelInstanceGroup.KIND_AUTO for g in engine.instance_group)
        assert not list((repo / e / "1").glob("model.*")), "the ensemble carries no engine"
        m = _manifest(repo, f"{e}_libtorch")
        assert set(m["artefacts"]) >= {"model.pt"} and m["libtorch"]["parity"]["ok"] is True
        # The file Triton would load, at a batch size it was not traced at, against ONNX Runtime.
        feeds = random_inputs(specs[e], cfg, 3, np.random.default_rng(1))
        ref = run_session(ort_session(onnx_dir / f"{e}.onnx"), feeds)
        module = torch.jit.load(str(repo / f"{e}_libtorch" / "1" / "model.pt"))
        with torch.no_grad():
            outs = module(*(torch.from_numpy(feeds[t.name]) for t in specs[e].inputs))
        for t, o in zip(specs[e].outputs, outs):
            np.testing.assert_allclose(o.numpy(), ref[t.name], rtol=1e-4, atol=1e-4)
    for m in ("preprocess", "vqa", "vtfuse_catalog"):
        assert (repo / m / "1" / "model.py").exists()
