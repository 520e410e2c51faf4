"""`vtfuse import-hf` on small random-weight BLIP retrieval and ViLT VQA checkpoints, as a user runs it.

Each checkpoint is imported once per precision and target into a temporary repository
(module-scoped fixtures; an import takes 5-20 s here). What is checked is what a user and
Triton see: the installed folders and config.pbtxt, the manifests and the repository's model
list, exit codes and messages, and, end to end without servers, the API's answers (the
`Pipeline` with its real preprocessing, over a stand-in for Triton that runs each installed
`model.onnx` with ONNX Runtime after checking the feeds against its config.pbtxt) against the
`transformers` modules run on their own processor's tensors.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402

from export.check import ort_session  # noqa: E402
from export.errors import InstallError, ParityError  # noqa: E402
from export.hf import parity  # noqa: E402
from export.hf.cli import EXIT_FAILED, EXIT_OK, register  # noqa: E402
from export.hf.importer import import_hf  # noqa: E402
from export.render_repo import load_config  # noqa: E402
from serving.app.metrics import ApiMetrics  # noqa: E402
from serving.app.models import load_imported_runtime  # noqa: E402
from serving.app.pipeline import Pipeline, RequestContext  # noqa: E402
from serving.app.preprocess import InlinePreprocess, Preprocessor  # noqa: E402
from serving.app.tasks import EmbedTask, MatchTask, RetrieveTask, VqaTask  # noqa: E402
from serving.errors import TaskNotSupported  # noqa: E402
from serving.families.imported import REPOSITORY_MODELS, read_repository_models  # noqa: E402
from serving.model.checkpoint import REPO_ROOT  # noqa: E402
from serving.shapes import world  # noqa: E402
from tests.hf.checkpoints import VQA_LABELS, build_blip, build_vilt  # noqa: E402

# Fixtures import several checkpoints before the first test of a group runs.
pytestmark = pytest.mark.timeout(900)

BLIP, VILT = "blip-t", "vilt-t"
FP32_MAX_ABS = 1e-4
TRITON_DTYPES = {"TYPE_UINT8": np.uint8, "TYPE_INT64": np.int64, "TYPE_FP32": np.float32}
CAPTIONS = [
    "a red circle",
    "a blue square and a green triangle",
    "two yellow triangles",
    "a green circle and a red square",
    "Three BLUE circles",
    "a zebra on a red square",  # an unknown word
    "triangles",
    "a yellow square and a blue circle and a red triangle",
]
QUESTIONS = ["what color is the circle?", "how many squares are there?", "Is there a RED triangle?", "shape?"]


# -- helpers -------------------------------------------------------------------------------


def _image(seed: int, w: int, h: int, fmt: str = "PNG") -> bytes:
    """A shapes-world scene at w × h, encoded as a client would send it."""
    rng = random.Random(seed)
    img = world.render(world.random_scene(rng), side=max(w, h), supersample=2).resize((w, h))
    return world.encode(img, fmt)


def _pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(root: Path) -> dict[str, str]:
    """Every file under root with its hash (to prove a failed import changed nothing)."""
    return {p.relative_to(root).as_posix(): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _import_folders(tmp: Path) -> list[str]:
    """Work folders import-hf left in a temporary folder (other libraries may leave their own files)."""
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("vtfuse-import-"))


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vtfuse")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _softmax1(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.double(), dim=-1)[:, 1].numpy()


class OnnxTriton:
    """Stands in for tritonserver: checks each request against the engine's config.pbtxt as Triton does
    (input names, dtypes, dims with -1 free, max_batch_size, requested outputs), then runs the
    installed `1/model.onnx` with ONNX Runtime."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.sessions: dict[str, Any] = {}
        self.calls: list[tuple[str, int, tuple[str, ...]]] = []

    async def model_outputs(self, model, version=""):
        return tuple(o.name for o in load_config(self.repo / model / "config.pbtxt").output)

    async def _itm(self, model, inputs):
        """What the `itm` BLS model does (serving/triton/python_models/itm_broadcast.py), over the ONNX engines."""
        params = {k: v.string_value for k, v in load_config(self.repo / model / "config.pbtxt").parameters.items()}
        feats = inputs.get("IMAGE_FEATURES")
        if feats is None:
            img = await self.infer(params["image_encoder"], {"PIXELS": inputs["PIXELS"]},
                                   ["IMAGE_FEATURES", "IMAGE_EMBEDDING"], deadline=0)
            feats = img["IMAGE_FEATURES"]
        ids, mask, step = inputs["INPUT_IDS"], inputs["ATTENTION_MASK"], int(params["fusion_max_batch"])
        parts = []
        for i in range(0, len(ids), step):
            rows = {"IMAGE_FEATURES": np.repeat(feats, len(ids[i : i + step]), 0), "INPUT_IDS": ids[i : i + step],
                    "ATTENTION_MASK": mask[i : i + step]}
            parts.append(await self.infer(params["fusion"], rows, ["ITM_LOGITS"], deadline=0))
        return {"ITM_LOGITS": np.concatenate([p["ITM_LOGITS"] for p in parts])}

    async def infer(self, model, inputs, outputs, *, deadline, request_id="", version=""):
        if model.endswith("_itm"):
            self.calls.append((model, len(inputs["INPUT_IDS"]), tuple(outputs)))
            return await self._itm(model, inputs)
        cfg = load_config(self.repo / model / "config.pbtxt")
        n = next(iter(inputs.values())).shape[0]
        assert 0 < n <= cfg.max_batch_size, f"{model}: batch {n} over max_batch_size {cfg.max_batch_size}"
        assert sorted(inputs) == sorted(i.name for i in cfg.input), f"{model}: inputs {sorted(inputs)}"
        for spec in cfg.input:
            a = inputs[spec.name]
            assert a.dtype == TRITON_DTYPES[mc.DataType.Name(spec.data_type)], f"{model}.{spec.name}: {a.dtype}"
            assert len(a.shape) == len(spec.dims) + 1 and all(
                d == -1 or d == s for d, s in zip(spec.dims, a.shape[1:])
            ), f"{model}.{spec.name}: shape {a.shape} against dims {list(spec.dims)}"
            assert a.shape[0] == n
        known = {o.name for o in cfg.output}
        assert set(outputs) <= known, f"{model}: asked for {outputs}, it has {known}"
        if model not in self.sessions:
            self.sessions[model] = ort_session(self.repo / model / "1" / "model.onnx", 1)
        self.calls.append((model, n, tuple(outputs)))
        got = self.sessions[model].run(list(outputs), dict(inputs))
        return dict(zip(outputs, got))

    async def models_ready(self, models, timeout_s=2.0):
        return {m: (self.repo / m / "1" / ("model.py" if m.endswith("_itm") else "model.onnx")).exists()
                for m, _ in models}

    async def close(self):
        return None


def _pipeline(repo: Path) -> tuple[Pipeline, OnnxTriton]:
    records = read_repository_models(repo)
    runtimes = {n: load_imported_runtime(r, r.checkpoint_dir(repo)) for n, r in records.items()}
    metrics = ApiMetrics()
    triton = OnnxTriton(repo)
    pre = InlinePreprocess(Preprocessor(runtimes, 10_000_000, metrics))
    return Pipeline(runtimes, triton, pre, metrics, engine_max_batch=64), triton  # type: ignore[arg-type]


def _run(pipeline: Pipeline, task):
    return asyncio.run(pipeline.run(task, RequestContext("test", time.monotonic() + 120)))


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _no_hub() -> Iterator[None]:
    """Never reach the Hugging Face hub from these tests (the machine has no network anyway)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield



@dataclass
class Checkpoints:
    blip: Path
    vilt: Path


@dataclass
class Imported:
    repo: Path
    results: dict[str, dict]  # import_hf's result per name (the CLI's stdout for the CLI one)
    leftovers: list[str]  # what the imports left in the temporary folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    root = tmp_path_factory.mktemp("checkpoints")
    return Checkpoints(build_blip(root / "blip"), build_vilt(root / "vilt"))


@pytest.fixture(scope="module")
def blip_model(checkpoints: Checkpoints):
    from transformers import AutoProcessor, BlipForImageTextRetrieval

    model = BlipForImageTextRetrieval.from_pretrained(str(checkpoints.blip)).eval()
    return model, AutoProcessor.from_pretrained(str(checkpoints.blip))


@pytest.fixture(scope="module")
def vilt_model(checkpoints: Checkpoints):
    from transformers import AutoProcessor, ViltForQuestionAnswering

    model = ViltForQuestionAnswering.from_pretrained(str(checkpoints.vilt)).eval()
    return model, AutoProcessor.from_pretrained(str(checkpoints.vilt))


@pytest.fixture(scope="module")
def fp32(checkpoints: Checkpoints, tmp_path_factory: pytest.TempPathFactory) -> Imported:
    """BLIP through `import_hf`, ViLT through the `vtfuse import-hf` command, both fp32, into one repository."""
    root = tmp_path_factory.mktemp("fp32")
    repo, scratch = root / "repo", root / "tmp"
    scratch.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", str(scratch))
        blip = import_hf(str(checkpoints.blip), BLIP, repo=repo, precision="fp32", threads=1)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TMPDIR": str(scratch)}
    proc = subprocess.run(
        [sys.executable, "-m", "serving.cli", "import-hf", str(checkpoints.vilt), "--name", VILT, "--repo", str(repo),
         "--precision", "fp32", "--threads", "1"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    vilt = json.loads(proc.stdout)
    return Imported(repo, {BLIP: blip, VILT: vilt}, _import_folders(scratch))


@pytest.fixture(scope="module")
def default_precision(checkpoints: Checkpoints, tmp_path_factory: pytest.TempPathFactory) -> Imported:
    """Both imported without --precision (embedded: int8 where its checks pass); BLIP keeps its work dir."""
    root = tmp_path_factory.mktemp("int8")
    repo = root / "repo"
    blip = import_hf(str(checkpoints.blip), "blip-q", repo=repo, work_dir=root / "work", threads=1)
    vilt = import_hf(str(checkpoints.vilt), "vilt-q", repo=repo, threads=1)
    return Imported(repo, {"blip-q": blip, "vilt-q": vilt}, [])


@pytest.fixture(scope="module")
def replaced(checkpoints: Checkpoints, fp32: Imported, tmp_path_factory: pytest.TempPathFactory) -> Imported:
    """A copy of the fp32 repository where NAME=blip-t is imported again, now the ViLT checkpoint for onnxruntime."""
    repo = tmp_path_factory.mktemp("replaced") / "repo"
    shutil.copytree(fp32.repo, repo)
    res = import_hf(str(checkpoints.vilt), BLIP, repo=repo, precision="fp32", target="onnxruntime", threads=1)
    return Imported(repo, {BLIP: res}, [])


# -- what is installed ---------------------------------------------------------------------

EXPECTED_ENGINES = {
    # role → (inputs {name: (dtype, dims)}, outputs {name: (dtype, dims)}, max_batch_size); checkpoints.py sizes
    "image_encoder": (
        {"PIXELS": ("TYPE_UINT8", [64, 64, 3])},
        {"IMAGE_FEATURES": ("TYPE_FP32", [17, 48]), "IMAGE_EMBEDDING": ("TYPE_FP32", [24])},
        32,
    ),
    "text_encoder": (
        {"INPUT_IDS": ("TYPE_INT64", [-1]), "ATTENTION_MASK": ("TYPE_INT64", [-1])},
        {"TEXT_EMBEDDING": ("TYPE_FP32", [24])},
        64,
    ),
    "fusion": (
        {"IMAGE_FEATURES": ("TYPE_FP32", [17, 48]), "INPUT_IDS": ("TYPE_INT64", [-1]),
         "ATTENTION_MASK": ("TYPE_INT64", [-1])},
        {"ITM_LOGITS": ("TYPE_FP32", [2])},
        64,
    ),
    "single_stream": (
        {"PIXELS": ("TYPE_UINT8", [-1, -1, 3]), "INPUT_IDS": ("TYPE_INT64", [-1]),
         "ATTENTION_MASK": ("TYPE_INT64", [-1])},
        {"VQA_LOGITS": ("TYPE_FP32", [len(VQA_LABELS)])},
        32,
    ),
}  # fmt: skip
ROLES = {BLIP: ("image_encoder", "text_encoder", "fusion"), VILT: ("single_stream",)}


def _tensors(tensors) -> dict[str, tuple[str, list[int]]]:
    return {t.name: (mc.DataType.Name(t.data_type), list(t.dims)) for t in tensors}


def _check_config(repo: Path, name: str, role: str, target: str) -> None:
    mdir = repo / f"{name}_{role}"
    cfg = load_config(mdir / "config.pbtxt")
    inputs, outputs, max_batch = EXPECTED_ENGINES[role]
    assert cfg.name == mdir.name
    assert _tensors(cfg.input) == inputs, mdir.name
    assert _tensors(cfg.output) == outputs, mdir.name
    assert cfg.max_batch_size == max_batch
    assert cfg.HasField("dynamic_batching")
    assert cfg.dynamic_batching.default_queue_policy.max_queue_size >= 64
    assert (mdir / "1" / "model.onnx").is_file()
    if target == "embedded":
        assert cfg.backend == "python" and not cfg.platform
        assert "OnnxEngineModel" in (mdir / "1" / "model.py").read_text()
        assert cfg.parameters["intra_op_threads"].string_value
    else:
        assert cfg.platform == "onnxruntime_onnx" and cfg.backend == "onnxruntime"
        assert cfg.default_model_filename == "model.onnx"
        assert not (mdir / "1" / "model.py").exists()
        assert cfg.parameters["intra_op_thread_count"].string_value


def _check_layout(repo: Path, model: str, precision: str) -> None:
    """Instances and threads as tiny's engines of that precision have them (export/engine_layout.py)."""
    from export.engine_layout import ENGINE_LAYOUT

    cfg = load_config(repo / model / "config.pbtxt")
    want = ENGINE_LAYOUT[precision]
    assert [g.count for g in cfg.instance_group] == [want.instances], model
    assert cfg.parameters["intra_op_threads"].string_value == str(want.threads), model


def test_imported_engines_have_the_instances_and_threads_of_tinys(fp32: Imported):
    from export.engine_layout import ENGINE_LAYOUT
    from export.render_repo import COMMITTED_REPO

    tiny = load_config(COMMITTED_REPO / "image_encoder" / "config.pbtxt")  # committed: the int8 row
    assert [g.count for g in tiny.instance_group] == [ENGINE_LAYOUT["int8"].instances]
    assert tiny.parameters["intra_op_threads"].string_value == str(ENGINE_LAYOUT["int8"].threads)
    for name, roles in ROLES.items():
        for role in roles:
            _check_layout(fp32.repo, f"{name}_{role}", "fp32")


@pytest.mark.parametrize("name", [BLIP, VILT])
def test_engines_are_triton_models_with_their_contract(fp32: Imported, name: str):
    for role in ROLES[name]:
        _check_config(fp32.repo, name, role, "embedded")
    assert sorted(p.name for p in fp32.repo.iterdir()) == sorted(
        [f"{n}_{r}" for n, roles in ROLES.items() for r in roles] + [f"{BLIP}_itm", REPOSITORY_MODELS]
    )


def test_blip_retrieval_brings_its_itm_model_one_image_against_n_texts(fp32: Imported):
    mdir = fp32.repo / f"{BLIP}_itm"
    config = load_config(mdir / "config.pbtxt")
    assert config.backend == "python" and config.max_batch_size == 0
    assert {i.name: (list(i.dims), i.optional) for i in config.input} == {
        "PIXELS": ([1, 64, 64, 3], True), "IMAGE_FEATURES": ([1, 17, 48], True),
        "INPUT_IDS": ([-1, -1], False), "ATTENTION_MASK": ([-1, -1], False),
    }
    assert [(o.name, list(o.dims)) for o in config.output] == [("ITM_LOGITS", [-1, 2])]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params == {"image_encoder": f"{BLIP}_image_encoder", "fusion": f"{BLIP}_fusion", "fusion_max_batch": "64"}
    assert "ItmBroadcastModel" in (mdir / "1" / "model.py").read_text()
    assert json.loads((mdir / "1" / "manifest.json").read_text())["role"] == "itm"
    assert read_repository_models(fp32.repo)[BLIP].engines["itm"] == f"{BLIP}_itm"


def test_the_command_prints_what_it_installed_as_json(fp32: Imported):
    out = fp32.results[VILT]
    assert out["name"] == VILT and out["family"] == "vilt_vqa" and out["tasks"] == ["vqa"]
    assert out["precision"] == "fp32" and out["int8"] is None
    assert out["engines"] == {"single_stream": f"{VILT}_single_stream"}
    assert out["repo"] == str(fp32.repo)
    assert out["parity"]["single_stream"]["VQA_LOGITS"]["max_abs"] <= FP32_MAX_ABS


def test_imports_leave_no_temporary_files(fp32: Imported):
    assert fp32.leftovers == []


@pytest.mark.parametrize("name", [BLIP, VILT])
def test_manifests_record_precision_family_source_tasks_and_parity(fp32: Imported, checkpoints: Checkpoints, name):
    source = checkpoints.blip if name == BLIP else checkpoints.vilt
    family, tasks = ("blip_retrieval", ["match", "retrieve", "embed"]) if name == BLIP else ("vilt_vqa", ["vqa"])
    for role in ROLES[name]:
        vdir = fp32.repo / f"{name}_{role}" / "1"
        m = json.loads((vdir / "manifest.json").read_text())
        assert (m["model"], m["served_as"], m["role"], m["target"]) == (f"{name}_{role}", name, role, "embedded")
        assert (m["precision"], m["family"], m["source"], m["tasks"]) == ("fp32", family, str(source), tasks)
        assert m["source_weights_sha256"] == {"model.safetensors": _sha256(source / "model.safetensors")}
        assert m["config_pbtxt_sha256"] == _sha256(vdir.parent / "config.pbtxt")
        assert m["artefacts"]["model.onnx"] == _sha256(vdir / "model.onnx")
        assert m["parity"]["tolerance"] == parity.FP32_TOLERANCE
        figures = m["parity"]["fp32"]
        assert set(figures) == set(EXPECTED_ENGINES[role][1]), role
        for output, f in figures.items():
            assert 0 <= f["max_abs"] <= FP32_MAX_ABS, f"{name}_{role}.{output}: {f}"
        assert "int8" not in m["parity"]
        record = json.loads((vdir / "checkpoint" / "import.json").read_text())
        assert record == json.loads((fp32.repo / REPOSITORY_MODELS).read_text())["models"][name]
        installed, original = Tokenizer.from_file(str(vdir / "checkpoint" / "tokenizer.json")), Tokenizer.from_file(
            str(source / "tokenizer.json")
        )
        for text in (*CAPTIONS, *QUESTIONS):
            assert installed.encode(text).ids == original.encode(text).ids
        assert (vdir / "checkpoint" / "config.json").read_text() == (source / "config.json").read_text()


def test_the_repository_lists_every_imported_model_with_its_tasks(fp32: Imported):
    models = json.loads((fp32.repo / REPOSITORY_MODELS).read_text())["models"]
    assert sorted(models) == [BLIP, VILT]
    assert models[BLIP]["tasks"] == ["match", "retrieve", "embed"] and models[VILT]["tasks"] == ["vqa"]
    assert models[BLIP]["engines"] == {r: f"{BLIP}_{r}" for r in (*ROLES[BLIP], "itm")}
    assert models[VILT]["labels"] == list(VQA_LABELS)
    assert models[BLIP]["max_tokens"] == 48 and models[VILT]["max_tokens"] == 40
    assert models[BLIP]["embed_dim"] == 24
    records = read_repository_models(fp32.repo)
    assert records[BLIP].image.mode == "fixed" and records[VILT].image.mode == "vilt"


def test_default_precision_is_int8_where_its_checks_pass(default_precision: Imported):
    import onnx

    for name, figure in (("blip-q", "itm_top1_agreement"), ("vilt-q", "vqa_answer_agreement")):
        res = default_precision.results[name]
        int8 = res["int8"]
        assert int8 is not None and figure in int8["figures"], name
        assert int8["ok"] == (not int8["failures"])
        assert res["precision"] == ("int8" if int8["ok"] else "fp32"), name
        roles = ("image_encoder", "text_encoder", "fusion") if name == "blip-q" else ("single_stream",)
        for role in roles:
            vdir = default_precision.repo / f"{name}_{role}" / "1"
            m = json.loads((vdir / "manifest.json").read_text())
            assert m["precision"] == res["precision"]
            assert m["parity"]["int8"]["figures"] == int8["figures"]
            ops = {n.op_type for n in onnx.load(str(vdir / "model.onnx")).graph.node}
            quantized = bool(ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"})
            assert quantized == (res["precision"] == "int8"), f"{name}_{role}: ops {sorted(ops)}"
            _check_layout(default_precision.repo, f"{name}_{role}", res["precision"])
    assert default_precision.results["vilt-q"]["precision"] == "int8"  # answers agree on every parity case


def test_explicit_int8_that_misses_its_checks_fails_and_installs_nothing(
    default_precision: Imported, checkpoints: Checkpoints, tmp_path: Path
):
    # Without --precision the import fell back to fp32; asked for int8 explicitly, it refuses.
    int8 = default_precision.results["blip-q"]["int8"]
    if int8["ok"]:
        pytest.skip("int8 met its checks on this checkpoint: nothing to refuse")
    assert default_precision.results["blip-q"]["precision"] == "fp32"
    repo = tmp_path / "repo"
    with pytest.raises(ParityError, match="import with --precision fp32") as e:
        import_hf(str(checkpoints.blip), "blip-q", repo=repo, precision="int8", threads=1)
    assert e.value.figures["failures"] == int8["failures"]
    assert not repo.exists() or not any(repo.iterdir())


def test_work_dir_keeps_the_onnx_files_and_parity_report(default_precision: Imported):
    work = default_precision.repo.parent / "work"
    report = json.loads((work / "parity.json").read_text())
    assert report["ok"] is True and report["tolerance"] == parity.FP32_TOLERANCE
    assert {"image_encoder.onnx", "text_encoder.onnx", "fusion.onnx", "tokenizer.json"} <= {
        p.name for p in work.iterdir()
    }
    assert (work / "int8" / "fusion.onnx").is_file()


def test_importing_a_name_again_replaces_it(replaced: Imported):
    repo = replaced.repo
    assert sorted(p.name for p in repo.iterdir()) == [
        f"{BLIP}_single_stream", f"{VILT}_single_stream", REPOSITORY_MODELS
    ]  # fmt: skip
    models = json.loads((repo / REPOSITORY_MODELS).read_text())["models"]
    assert sorted(models) == [BLIP, VILT]  # the other model is still listed
    assert models[BLIP]["family"] == "vilt_vqa"
    assert models[BLIP]["engines"] == {"single_stream": f"{BLIP}_single_stream"}
    _check_config(repo, BLIP, "single_stream", "onnxruntime")
    _check_config(repo, VILT, "single_stream", "embedded")  # untouched
    m = json.loads((repo / f"{BLIP}_single_stream" / "1" / "manifest.json").read_text())
    assert m["target"] == "onnxruntime" and m["precision"] == "fp32"


def test_importing_the_same_checkpoint_again_under_its_name_updates_it_in_place(
    fp32: Imported, checkpoints: Checkpoints, tmp_path: Path
):
    repo = tmp_path / "repo"
    shutil.copytree(fp32.repo, repo)
    folders = sorted(p.name for p in repo.iterdir())
    onnx_before = _sha256(repo / f"{VILT}_single_stream" / "1" / "model.onnx")
    res = import_hf(str(checkpoints.vilt), VILT, repo=repo, threads=1)  # now the default precision: int8
    assert res["precision"] == "int8"
    assert sorted(p.name for p in repo.iterdir()) == folders
    assert read_repository_models(repo)[VILT].precision == "int8"
    assert read_repository_models(repo)[BLIP] == read_repository_models(fp32.repo)[BLIP]
    vdir = repo / f"{VILT}_single_stream" / "1"
    assert _sha256(vdir / "model.onnx") != onnx_before
    assert json.loads((vdir / "manifest.json").read_text())["precision"] == "int8"
    assert json.loads((vdir / "checkpoint" / "import.json").read_text())["precision"] == "int8"


# -- refusals: nothing installed -----------------------------------------------------------


def test_an_unsupported_architecture_exits_1_listing_the_supported_ones(tmp_path: Path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16)).save_pretrained(tmp_path / "bert")  # fmt: skip
    repo = tmp_path / "repo"
    proc = subprocess.run(
        [sys.executable, "-m", "serving.cli", "import-hf", str(tmp_path / "bert"), "--name", "bert", "--repo",
         str(repo)],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == EXIT_FAILED
    assert proc.stdout == ""
    assert "FAILED import-hf" in proc.stderr and "BertModel" in proc.stderr
    assert "BlipForImageTextRetrieval" in proc.stderr and "ViltForQuestionAnswering" in proc.stderr
    assert not repo.exists() or not any(repo.iterdir())


@pytest.mark.parametrize("name, why", [("tiny", "reserved"), ("Blip", "lower-case"), ("a b", "lower-case")])
def test_a_name_that_cannot_be_served_is_refused(tmp_path: Path, checkpoints: Checkpoints, capsys, name, why):
    repo = tmp_path / "repo"
    with pytest.raises(InstallError, match=why):
        import_hf(str(checkpoints.vilt), name, repo=repo)
    assert _cli(["import-hf", str(checkpoints.vilt), "--name", name, "--repo", str(repo)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "FAILED import-hf" in err and repr(name) in err
    assert not repo.exists()


def test_a_folder_that_is_not_a_checkpoint_is_refused(tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    assert _cli(["import-hf", str(tmp_path / "empty"), "--name", "x", "--repo", str(tmp_path / "repo")]) == 1
    assert "no config.json" in capsys.readouterr().err
    assert _cli(["import-hf", str(tmp_path / "missing"), "--name", "x", "--repo", str(tmp_path / "repo")]) == 1
    assert "is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_the_parity_gate_refuses_engines_that_differ_and_installs_nothing(
    fp32: Imported, checkpoints: Checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # A gate of 0: float32 rounding alone fails it, as a broken export would fail the real one.
    real = parity.fp32_report
    monkeypatch.setattr(parity, "fp32_report", lambda cases, outputs, tolerance=0.0: real(cases, outputs, 0.0))
    repo = tmp_path / "repo"
    shutil.copytree(fp32.repo, repo)
    before = _tree(repo)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(ParityError) as e:
        import_hf(str(checkpoints.vilt), VILT, repo=repo, precision="fp32", threads=1)  # over the installed one
    assert "differ from transformers" in str(e.value) and "single_stream.VQA_LOGITS" in str(e.value)
    assert e.value.engine == "single_stream" and e.value.output == "VQA_LOGITS"
    assert _tree(repo) == before  # the model already installed under that name is intact
    assert _import_folders(scratch) == []


def test_a_hub_id_resolves_through_the_hugging_face_cache_offline(checkpoints: Checkpoints, tmp_path: Path):
    """`import-hf org/name` on a machine without internet: huggingface_hub finds the cached snapshot."""
    snapshot = tmp_path / "hf" / "hub" / "models--vtfuse-tests--vilt-tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(checkpoints.vilt, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    repo = tmp_path / "repo"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "serving.cli", "import-hf", "vtfuse-tests/vilt-tiny", "--name", "hub-vilt",
         "--repo", str(repo), "--precision", "fp32"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == EXIT_OK, proc.stderr[-2000:]
    record = read_repository_models(repo)["hub-vilt"]
    assert record.source == "vtfuse-tests/vilt-tiny" and record.tasks == ("vqa",)
    missing = subprocess.run(
        [sys.executable, "-m", "serving.cli", "import-hf", "vtfuse-tests/not-cached", "--name", "x", "--repo",
         str(tmp_path / "repo2")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert missing.returncode == EXIT_FAILED
    assert "could not fetch vtfuse-tests/not-cached" in missing.stderr and "hf download" in missing.stderr


# -- the tensorrt target ----------------------------------------------------------------------


def _tensorrt_here() -> bool:
    from export.engine import availability
    from export.errors import EngineUnavailable

    try:
        availability()
    except EngineUnavailable:
        return False
    return True


def test_tensorrt_target_skips_with_its_reason_where_tensorrt_is_missing(
    checkpoints: Checkpoints, tmp_path: Path, capsys
):
    if _tensorrt_here():  # a GPU machine with TensorRT builds and judges the plans instead
        pytest.skip("TensorRT and a GPU are here: the import builds plans (covered by the GPU run)")
    repo = tmp_path / "repo"
    code = _cli(["import-hf", str(checkpoints.vilt), "--name", VILT, "--repo", str(repo), "--target", "tensorrt"])
    assert code == 3
    err = capsys.readouterr().err
    assert "SKIP import-hf" in err and ("tensorrt" in err.lower() or "gpu" in err.lower())
    assert not repo.exists() or not any(repo.iterdir())  # nothing installed


def test_tensorrt_target_refuses_int8(checkpoints: Checkpoints, tmp_path: Path):
    with pytest.raises(InstallError, match="FP16 plans"):
        import_hf(str(checkpoints.blip), BLIP, repo=tmp_path / "repo", precision="int8", target="tensorrt")


# -- the libtorch target ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def libtorch(checkpoints: Checkpoints, tmp_path_factory: pytest.TempPathFactory) -> Imported:
    """BLIP through `import_hf`, ViLT through the command, both `--target libtorch`, into one repository."""
    root = tmp_path_factory.mktemp("libtorch")
    repo = root / "repo"
    blip = import_hf(str(checkpoints.blip), BLIP, repo=repo, target="libtorch", threads=1)
    code = _cli(["import-hf", str(checkpoints.vilt), "--name", VILT, "--repo", str(repo), "--target", "libtorch",
                 "--threads", "1"])
    assert code == EXIT_OK
    return Imported(repo, {BLIP: blip}, [])


def _variable_feed(graph: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs at shapes no parity case has: batch 3, 11 tokens, ViLT images 96 x 64 (the trace saw 2, 8, 64 x 80)."""
    feed = {}
    for t in graph.inputs:
        if t.name == "PIXELS":
            dims = [96, 64, 3] if -1 in t.dims else list(t.dims)
            feed[t.name] = rng.integers(0, 256, size=(3, *dims), dtype=np.uint8)
        elif t.name == "INPUT_IDS":
            feed[t.name] = rng.integers(5, 35, size=(3, 11), dtype=np.int64)  # the test vocabulary has 39
        elif t.name == "ATTENTION_MASK":
            mask = np.ones((3, 11), dtype=np.int64)
            mask[1, 7:] = 0  # a padded text in the batch
            feed[t.name] = mask
        else:
            feed[t.name] = rng.standard_normal((3, *t.dims)).astype(np.float32)
    return feed


@pytest.mark.parametrize("name", [BLIP, VILT])
def test_libtorch_engines_are_torchscript_behind_ensembles_with_the_engines_names(
    libtorch: Imported, checkpoints: Checkpoints, name: str
):
    """What Triton's PyTorch backend loads, and what the API calls: the engine's own name and tensors."""
    from export.hf.graphs import family_module
    from export.hf.source import image_processing, resolve_source

    record = read_repository_models(libtorch.repo)[name]
    src = resolve_source(str(checkpoints.blip if name == BLIP else checkpoints.vilt))
    graphs = {g.role: g for g in family_module(src.family.name).graphs(
        family_module(src.family.name).load_model(str(src.folder)), src.config, image_processing(src))}
    rng = np.random.default_rng(3)
    for role, triton_name in record.engines.items():
        if role not in graphs:
            continue  # a model the family brings beside its engines (`itm`): a Python BLS model on every target
        ensemble = load_config(libtorch.repo / triton_name / "config.pbtxt")
        behind = load_config(libtorch.repo / f"{triton_name}_libtorch" / "config.pbtxt")
        g = graphs[role]
        assert ensemble.platform == "ensemble" and ensemble.max_batch_size == g.max_batch_size
        assert [t.name for t in ensemble.input] == [t.name for t in g.inputs]
        assert [t.name for t in ensemble.output] == [t.name for t in g.outputs]
        (step,) = ensemble.ensemble_scheduling.step
        assert step.model_name == behind.name == f"{triton_name}_libtorch"
        assert dict(step.input_map) == {f"{t.name}__{i}": t.name for i, t in enumerate(g.inputs)}
        assert dict(step.output_map) == {f"{t.name}__{i}": t.name for i, t in enumerate(g.outputs)}
        assert (behind.backend, behind.platform, behind.default_model_filename) == (
            "pytorch", "pytorch_libtorch", "model.pt")
        assert [list(t.dims) for t in behind.input] == [list(t.dims) for t in g.inputs]
        assert behind.max_batch_size == g.max_batch_size and behind.HasField("dynamic_batching")
        assert behind.instance_group[0].kind == mc.ModelInstanceGroup.KIND_AUTO and not behind.parameters
        manifest = json.loads((libtorch.repo / triton_name / "1" / "manifest.json").read_text())
        assert manifest["target"] == "libtorch" and manifest["parity"]["libtorch"]["ok"]
        model_pt = libtorch.repo / f"{triton_name}_libtorch" / "1" / "model.pt"
        assert manifest["libtorch_model"] == {"name": behind.name, "model.pt": hashlib.sha256(
            model_pt.read_bytes()).hexdigest()}
        # The installed file at shapes the trace and the parity cases never saw, against the module itself.
        feed = _variable_feed(g, rng)
        module = torch.jit.load(str(model_pt), map_location="cpu").eval()
        with torch.no_grad():
            got = module(*(torch.from_numpy(feed[t.name]) for t in g.inputs))
            want = g.module.eval()(*(torch.from_numpy(feed[t.name]) for t in g.inputs))
        got, want = (x if isinstance(x, tuple) else (x,) for x in (got, want))
        for t, a, b in zip(g.outputs, got, want):
            assert a.shape == b.shape and a.shape[0] == 3, (role, t.name, a.shape)
            scale = max(1.0, float(b.abs().max()))
            assert float((a - b).abs().max()) / scale <= FP32_MAX_ABS, (role, t.name)
    # The tokenizer and import record stay where the API reads them: the first engine's checkpoint folder.
    assert (libtorch.repo / next(iter(record.engines.values())) / "1" / "checkpoint" / "tokenizer.json").exists()


def test_the_libtorch_gate_fails_a_trace_that_froze_a_variable_axis(tmp_path: Path):
    """A module whose trace bakes in the example's token length: the parity cases at other lengths catch it."""
    from torch import nn

    from export.hf import libtorch as hf_libtorch
    from export.hf.graphs import EngineGraph, ParityCase, Tensor

    class MeanOverTokens(nn.Module):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return ids.float().sum(1, keepdim=True) / int(ids.shape[1])  # int(): a constant in the trace

    graph = EngineGraph("text_encoder", MeanOverTokens(), (torch.ones(2, 8, dtype=torch.int64),),
                        (Tensor("INPUT_IDS", "INT64", (-1,)),), (Tensor("MEAN", "FP32", (1,)),))
    cases = []
    for n in (8, 5):
        ids = np.arange(3 * n, dtype=np.int64).reshape(3, n)
        cases.append(ParityCase("text_encoder", {"INPUT_IDS": ids}, {"MEAN": ids.mean(1, keepdims=True)}))
    _, report = hf_libtorch.build([graph], cases, tmp_path)
    assert not report["ok"] and report["failures"][0].startswith("text_encoder.MEAN")


def test_libtorch_target_refuses_int8(checkpoints: Checkpoints, tmp_path: Path):
    with pytest.raises(InstallError, match="traces the checkpoint's own FP32 modules"):
        import_hf(str(checkpoints.vilt), VILT, repo=tmp_path / "repo", precision="int8", target="libtorch")


def test_importing_a_libtorch_name_again_removes_its_torchscript_models(
    libtorch: Imported, checkpoints: Checkpoints, tmp_path: Path
):
    repo = tmp_path / "repo"
    shutil.copytree(libtorch.repo, repo)
    import_hf(str(checkpoints.vilt), BLIP, repo=repo, precision="fp32", threads=1)  # BLIP's name, now ViLT, embedded
    left = sorted(p.name for p in repo.iterdir() if p.name.startswith(f"{BLIP}_"))
    assert left == [f"{BLIP}_single_stream"]


def test_tensorrt_config_and_profiles_cover_every_variable_axis():
    from torch import nn

    from export.hf.graphs import EngineGraph, Tensor
    from export.hf.importer import engine_config
    from export.hf.tensorrt import input_shapes
    from serving.families.imported import ImageProcessing

    vilt = EngineGraph(
        "single_stream", nn.Identity(), (),
        (Tensor("PIXELS", "UINT8", (-1, -1, 3)), Tensor("INPUT_IDS", "INT64", (-1,)),
         Tensor("ATTENTION_MASK", "INT64", (-1,))),
        (Tensor("VQA_LOGITS", "FP32", (12,)),), max_batch_size=32,
    )  # fmt: skip
    image = ImageProcessing(mode="vilt", shortest_edge=384, size_divisor=32)
    shapes = input_shapes(vilt, image, max_tokens=40)
    assert shapes["PIXELS"] == ((1, 32, 32, 3), (16, 384, 384, 3), (32, 608, 608, 3))  # 639 rounded down to 32s
    assert shapes["INPUT_IDS"] == ((1, 1), (16, 32), (32, 40))
    cfg = engine_config("v_single_stream", vilt, "tensorrt")
    assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "model.plan"
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU and not cfg.parameters
    assert list(cfg.input[0].dims) == [-1, -1, 3]


# -- end to end: the API's answers from the installed engines against transformers ----------


def test_match_gives_transformers_itm_probability_for_each_text(fp32: Imported, blip_model):
    model, processor = blip_model
    pipeline, triton = _pipeline(fp32.repo)
    for i, (w, h, fmt) in enumerate([(64, 64, "PNG"), (120, 90, "JPEG"), (50, 140, "PNG")]):
        data = _image(100 + i, w, h, fmt)
        res = _run(pipeline, MatchTask(model=BLIP, image=data, texts=CAPTIONS))
        enc = processor(images=[_pil(data)] * len(CAPTIONS), text=CAPTIONS, padding=True, return_tensors="pt")
        with torch.no_grad():
            itm = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                        pixel_values=enc["pixel_values"], use_itm_head=True).itm_score  # fmt: skip
        ref = _softmax1(itm)
        got = np.array(res.scores)
        assert np.abs(got - ref).max() <= 1e-4, f"image {i}: {got} vs {ref}"
        assert ref.max() - ref.min() > 0.05  # the texts differ: the comparison means something
    engines = [c[0] for c in triton.calls]
    assert f"{BLIP}_text_encoder" not in engines  # BLIP's fusion re-embeds the token ids
    assert engines.count(f"{BLIP}_image_encoder") == 3 and engines.count(f"{BLIP}_fusion") == 3
    assert engines.count(f"{BLIP}_itm") == 3  # the image once against the texts, inside Triton


def _blip_reference(model, processor, images: list[bytes], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(cosine similarity, ITM probability), (images, texts), from BlipForImageTextRetrieval.forward."""
    pv = processor(images=[_pil(d) for d in images], return_tensors="pt")["pixel_values"]
    enc = processor.tokenizer(texts, padding=True, return_tensors="pt")
    enc = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    sims = np.zeros((len(images), len(texts)))
    itm = np.zeros((len(images), len(texts)))
    with torch.no_grad():
        for i in range(len(images)):
            sims[i] = model(**enc, pixel_values=pv[i : i + 1], use_itm_head=False).itm_score.double().numpy()[0]
            itm[i] = _softmax1(model(**enc, pixel_values=pv[i : i + 1].repeat(len(texts), 1, 1, 1)).itm_score)
    return sims, itm


def _expected_ranking(sims: np.ndarray, itm: np.ndarray, top_k: int) -> list[int]:
    shortlist = np.argsort(-sims, kind="stable")[: max(16, 4 * top_k)]
    return [int(shortlist[j]) for j in np.argsort(-itm[shortlist], kind="stable")[:top_k]]


def test_retrieve_texts_shortlists_by_itc_and_reranks_by_itm_as_transformers_scores(fp32: Imported, blip_model):
    model, processor = blip_model
    texts = [f"{c} {extra}".strip() for c in CAPTIONS for extra in ("", "and a circle", "?")][:20]  # 20 > shortlist
    image = _image(7, 96, 96)
    res = _run(_pipeline(fp32.repo)[0], RetrieveTask(model=BLIP, image=image, texts=texts, top_k=3))
    sims, itm = _blip_reference(model, processor, [image], texts)
    assert [r.index for r in res.results] == _expected_ranking(sims[0], itm[0], 3)
    for r in res.results:
        assert r.text == texts[r.index]
        assert abs(r.score - itm[0, r.index]) <= 1e-4


def test_retrieve_images_for_a_text(fp32: Imported, blip_model):
    model, processor = blip_model
    images = [_image(200 + i, 64 + 3 * i, 64, "JPEG" if i % 3 else "PNG") for i in range(18)]
    res = _run(_pipeline(fp32.repo)[0], RetrieveTask(model=BLIP, text="a red circle", images=images, top_k=2))
    sims, itm = _blip_reference(model, processor, images, ["a red circle"])
    assert [r.index for r in res.results] == _expected_ranking(sims[:, 0], itm[:, 0], 2)
    for r in res.results:
        assert abs(r.score - itm[r.index, 0]) <= 1e-4 and r.text is None


def test_embed_cosine_similarities_equal_transformers_itc_scores(fp32: Imported, blip_model):
    model, processor = blip_model
    images = [_image(300, 64, 64), _image(301, 100, 60, "JPEG")]
    res = _run(_pipeline(fp32.repo)[0], EmbedTask(model=BLIP, images=images, texts=CAPTIONS[:4]))
    img, txt = np.array(res.image_embeddings), np.array(res.text_embeddings)
    assert img.shape == (2, 24) and txt.shape == (4, 24)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    sims, _ = _blip_reference(model, processor, images, CAPTIONS[:4])
    np.testing.assert_allclose(img @ txt.T, sims, atol=1e-4)


def test_vqa_answers_are_transformers_answers(fp32: Imported, vilt_model):
    model, processor = vilt_model
    pipeline, triton = _pipeline(fp32.repo)
    labels = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    for i, (w, h, fmt) in enumerate([(64, 64, "PNG"), (100, 37, "PNG"), (90, 160, "JPEG"), (300, 200, "JPEG")]):
        data = _image(400 + i, w, h, fmt)
        res = _run(pipeline, VqaTask(model=VILT, image=data, questions=QUESTIONS, top_k=3))
        assert [a.question for a in res.answers] == QUESTIONS
        for q, answer in zip(QUESTIONS, res.answers):
            with torch.no_grad():
                logits = model(**processor(images=_pil(data), text=q, return_tensors="pt")).logits[0].double()
            probs = torch.sigmoid(logits).numpy()
            order = np.argsort(-probs, kind="stable")[:3]
            assert answer.answer == labels[order[0]], f"image {i} {q!r}"
            assert [a.answer for a in answer.top_k] == [labels[j] for j in order]
            for a, j in zip(answer.top_k, order):
                assert abs(a.score - probs[j]) <= 1e-4
    assert {c[0] for c in triton.calls} == {f"{VILT}_single_stream"}
    assert len(triton.calls) == 4  # one engine call per request: every question a row of it


def test_a_task_the_model_lacks_is_refused_before_any_engine_runs(fp32: Imported):
    pipeline, triton = _pipeline(fp32.repo)
    with pytest.raises(TaskNotSupported, match="its tasks are match, retrieve, embed"):
        _run(pipeline, VqaTask(model=BLIP, image=_image(1, 64, 64), questions=["what color is the circle?"]))
    with pytest.raises(TaskNotSupported, match="its tasks are vqa"):
        _run(pipeline, MatchTask(model=VILT, image=_image(1, 64, 64), texts=["a red circle"]))
    assert triton.calls == []


def test_default_precision_answers_as_transformers_does(default_precision: Imported, blip_model, vilt_model):
    """The default imports (int8 where its checks passed) against transformers' fp32, on what users see."""
    model, processor = blip_model
    pipeline, _ = _pipeline(default_precision.repo)
    assert default_precision.results["vilt-q"]["precision"] == "int8"
    for i, (w, h) in enumerate([(80, 60), (64, 64), (96, 120)]):
        data = _image(5 + i, w, h)
        match = _run(pipeline, MatchTask(model="blip-q", image=data, texts=CAPTIONS))
        _, itm = _blip_reference(model, processor, [data], CAPTIONS)
        got, ref = np.array(match.scores), itm[0]
        assert int(np.argmax(got)) == int(np.argmax(ref)), f"image {i}: best caption {got} vs {ref}"
        # Ranking order: every pair transformers separates by more than int8 may move a probability (0.05) keeps it.
        for a in range(len(CAPTIONS)):
            for b in range(len(CAPTIONS)):
                if ref[a] - ref[b] > 0.1:
                    assert got[a] > got[b], f"image {i}: captions {a} and {b} swapped ({got[a]:.3f} vs {got[b]:.3f})"
        assert np.abs(got - ref).max() <= 0.05
        texts = [f"{c} {extra}".strip() for c in CAPTIONS for extra in ("", "and a circle", "?")][:20]
        res = _run(pipeline, RetrieveTask(model="blip-q", image=data, texts=texts, top_k=1))
        sims, itm20 = _blip_reference(model, processor, [data], texts)
        assert [r.index for r in res.results] == _expected_ranking(sims[0], itm20[0], 1)
    vmodel, vprocessor = vilt_model
    for i, (w, h) in enumerate([(80, 60), (120, 90)]):
        data = _image(40 + i, w, h)
        vqa = _run(pipeline, VqaTask(model="vilt-q", image=data, questions=QUESTIONS))
        enc = vprocessor(images=[_pil(data)] * len(QUESTIONS), text=QUESTIONS, return_tensors="pt", padding=True)
        with torch.no_grad():
            labels = vmodel(**enc).logits.argmax(-1).tolist()
        assert [a.answer for a in vqa.answers] == [vmodel.config.id2label[j] for j in labels], f"image {i}"


def test_requests_larger_than_an_engines_max_batch_size_are_split(fp32: Imported, blip_model):
    # The API takes up to 64 images (limits.max_images) and rows go out in requests of at most
    # engine_max_batch (64), but the imported image encoder's config.pbtxt says max_batch_size 32.
    model, processor = blip_model
    images = [_image(500 + i, 64, 64) for i in range(40)]
    pipeline, triton = _pipeline(fp32.repo)
    res = _run(pipeline, EmbedTask(model=BLIP, images=images))
    assert [n for m, n, _ in triton.calls if m == f"{BLIP}_image_encoder"] == [32, 8]
    pv = processor(images=[_pil(d) for d in images[-2:]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=pv).last_hidden_state
        ref = torch.nn.functional.normalize(model.vision_proj(hidden[:, 0, :]), dim=-1).numpy()
    np.testing.assert_allclose(np.array(res.image_embeddings[-2:]), ref, atol=1e-4)
