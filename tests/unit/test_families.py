"""Model families: which checkpoints import, how their ITM and VQA outputs read, names, and tasks per model."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from serving.app import router
from serving.app.models import ModelFilesMissing, describe, load_imported_runtime, load_runtimes
from serving.app.pipeline import check_task
from serving.app.tasks import EmbedTask, MatchTask, RetrieveTask, VqaTask
from serving.errors import TaskNotSupported
from serving.families import (
    BLIP_CAPTION,
    BLIP_RETRIEVAL,
    BLIP_VQA,
    NATIVE,
    VILT_VQA,
    UnsupportedArchitecture,
    family_for_architectures,
    supported_architectures,
)
from serving.families.imported import (
    IMPORT_RECORD,
    REPOSITORY_MODELS,
    TOKENIZER_FILE,
    ImageProcessing,
    ImportRecord,
    check_model_name,
    read_repository_models,
    write_repository_models,
)
from tests.unit.app_fakes import make_args, make_checkpoint

# -- which checkpoints import --------------------------------------------------------------


def test_supported_architectures_are_blip_vilt_and_generative_blip():
    assert supported_architectures() == [
        "BlipForConditionalGeneration", "BlipForImageTextRetrieval", "BlipForQuestionAnswering",
        "ViltForQuestionAnswering",
    ]
    assert family_for_architectures(["BlipForConditionalGeneration"]) is BLIP_CAPTION
    assert family_for_architectures(["BlipForQuestionAnswering"]) is BLIP_VQA
    assert family_for_architectures(["BlipForImageTextRetrieval"]) is BLIP_RETRIEVAL
    assert family_for_architectures(["ViltForQuestionAnswering"]) is VILT_VQA
    assert family_for_architectures(["SomethingElse", "ViltForQuestionAnswering"]) is VILT_VQA


@pytest.mark.parametrize("architectures", [["BertModel"], ["Blip2ForConditionalGeneration"], [], None])
def test_an_unsupported_architecture_is_refused_listing_what_is_supported(architectures):
    with pytest.raises(UnsupportedArchitecture) as e:
        family_for_architectures(architectures)
    msg = str(e.value)
    assert "BlipForImageTextRetrieval" in msg and "ViltForQuestionAnswering" in msg
    assert "(match, retrieve, embed)" in msg and "(vqa)" in msg  # with what each one does
    assert "BlipForConditionalGeneration (caption)" in msg and "BlipForQuestionAnswering (vqa)" in msg
    if architectures:
        assert architectures[0] in msg
    else:
        assert "none in config.json" in msg
    assert isinstance(e.value, ValueError)


def test_family_tasks_and_engines():
    assert BLIP_RETRIEVAL.tasks == ("match", "retrieve", "embed")
    assert BLIP_RETRIEVAL.roles == ("image_encoder", "text_encoder", "fusion")
    assert VILT_VQA.tasks == ("vqa",) and VILT_VQA.roles == ("single_stream",)
    assert set(NATIVE.tasks) == {"vqa", "match", "retrieve", "embed", "caption"}
    assert BLIP_CAPTION.tasks == ("caption",) and BLIP_CAPTION.roles == ("image_encoder", "generate")
    assert BLIP_VQA.tasks == ("vqa",)
    assert BLIP_VQA.roles == ("image_encoder", "question_encoder", "generate")


def test_generative_families_bring_their_own_task_code():
    """A family's task code is found through the registry, not by testing its name in the pipeline."""
    from serving.app.generation import caption, vqa
    from serving.app.pipeline import task_code

    assert task_code(BLIP_CAPTION.runs_own("caption")) is caption
    assert task_code(BLIP_VQA.runs_own("vqa")) is vqa
    assert task_code(NATIVE.runs_own("caption")) is caption
    assert NATIVE.runs_own("vqa") is None and BLIP_RETRIEVAL.runs_own("match") is None  # the built-in tasks


# -- ITM and VQA outputs -------------------------------------------------------------------


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1 / (1 + np.exp(-x[pos]))
    out[~pos] = np.exp(x[~pos]) / (1 + np.exp(x[~pos]))
    return out


def test_itm_logits_read_as_softmax_index_1():
    logits = np.array([[0.0, 0.0], [2.0, -1.0], [-3.0, 4.0], [1e4, -1e4], [-800.0, 900.0]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or invalid-value warnings
        p = BLIP_RETRIEVAL.itm_probability({"ITM_LOGITS": logits})
    assert p.shape == (5,)
    np.testing.assert_allclose(p, _softmax(logits)[:, 1], rtol=1e-12, atol=1e-15)
    assert p[0] == 0.5 and p[3] == 0.0 and p[4] == 1.0
    assert np.all(np.isfinite(p))


def test_itm_logit_reads_as_sigmoid_without_overflow():
    x = np.array([[0.0], [1.0], [-1.0], [20.0], [-20.0], [500.0], [-500.0], [1e30], [-1e30]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = NATIVE.itm_probability({"ITM_LOGIT": x})
    assert p.shape == (9,)
    np.testing.assert_allclose(p, _sigmoid(x.reshape(-1)), rtol=1e-9, atol=1e-15)
    assert p[0] == 0.5 and p[-2] == 1.0 and p[-1] == 0.0
    # the one-logit and two-way readings agree: sigmoid(x) = softmax([0, x])[1]
    two_way = np.concatenate([np.zeros_like(x), x], axis=1)
    np.testing.assert_allclose(BLIP_RETRIEVAL.itm_probability({"ITM_LOGITS": two_way}), p, atol=1e-12)


def test_native_itm_probability_matches_the_routers_sigmoid():
    x = np.linspace(-30, 30, 61)
    np.testing.assert_allclose(NATIVE.itm_probability({"ITM_LOGIT": x}), router.sigmoid(x), atol=1e-12)


def test_vqa_scores_softmax_for_native_and_per_answer_sigmoid_for_vilt():
    logits = np.array([[3.0, 1.0, -2.0, 0.5], [-1e4, 1e4, 0.0, 2.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        soft = NATIVE.vqa_probabilities(logits)
        sig = VILT_VQA.vqa_probabilities(logits)
    np.testing.assert_allclose(soft, _softmax(logits), atol=1e-12)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0)
    np.testing.assert_allclose(sig, _sigmoid(logits), atol=1e-12)
    assert sig[0].sum() > 1.0  # independent per-answer scores (binary cross-entropy), as ViLT was trained
    assert np.argmax(soft[0]) == np.argmax(sig[0]) == 0


def test_ranking_orders_by_probability_and_keeps_shortlist_order_on_ties():
    cand = np.array([7, 3, 9, 1])
    probs = BLIP_RETRIEVAL.itm_probability({"ITM_LOGITS": np.array([[0.0, 1.0], [0.0, 3.0], [0.0, 1.0], [0.0, -2.0]])})
    ranked = router.rank(cand, probs, top_k=3)
    assert [i for i, _ in ranked] == [3, 7, 9]
    assert ranked[0][1] == pytest.approx(_softmax([0.0, 3.0])[1])


def test_plans_for_a_fusion_that_takes_token_ids_never_ask_for_text_features():
    for plan in (
        router.plan_retrieve_texts(40, 1, text_features=False),
        router.plan_retrieve_texts(8, 1, text_features=False),
        router.plan_retrieve_images(40, 1, text_features=False),
        router.plan_retrieve_images(8, 1, text_features=False),
    ):
        outputs = {o for stage in plan for c in stage for o in c.outputs}
        assert router.TEXT_FEATURES not in outputs
        assert [c.rows for c in router.engine_calls(plan, "text_encoder")] in ([40], [8], [1])
    # BLIP's fusion re-ranks the shortlist only, as the native one does
    assert [c.rows for c in router.engine_calls(router.plan_retrieve_texts(40, 1, False), "fusion")] == [16]


# -- model names ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Tiny", "tiny", "a b", "", "small", "vqa", "fusion", "-x", "x" * 41, "blip/base"])
def test_model_names_that_cannot_be_served_are_refused(name):
    with pytest.raises(ValueError) as e:
        check_model_name(name)
    assert repr(name) in str(e.value)


def test_reserved_names_say_so():
    with pytest.raises(ValueError, match="reserved"):
        check_model_name("tiny")


@pytest.mark.parametrize("name", ["blip-base_2", "vilt", "b", "0x", "x" * 40])
def test_model_names_that_can_be_served_are_kept(name):
    assert check_model_name(name) == name


# -- tasks per model -----------------------------------------------------------------------


def _tokenizer() -> Tokenizer:
    tok = Tokenizer(WordLevel({"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "a": 3, "red": 4, "circle": 5}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return tok


def _record(name: str, family: str) -> ImportRecord:
    fam = {"blip_retrieval": BLIP_RETRIEVAL, "vilt_vqa": VILT_VQA}[family]
    image = (
        ImageProcessing(mode="fixed", height=64, width=64, mean=(0.5,) * 3, std=(0.5,) * 3)
        if family == "blip_retrieval"
        else ImageProcessing(mode="vilt", shortest_edge=64, size_divisor=16)
    )
    return ImportRecord(
        name=name,
        family=family,
        architecture=fam.architecture or "",
        tasks=fam.tasks,
        engines={role: f"{name}_{role}" for role in fam.roles},
        precision="fp32",
        source=f"/checkpoints/{name}",
        image=image,
        max_tokens=40,
        embed_dim=24 if family == "blip_retrieval" else 0,
        labels=("yes", "no") if family == "vilt_vqa" else (),
        parity={"tolerance": 1e-4, "ok": True, "fp32": {}},
        created="2025-01-01T00:00:00Z",
        max_batch={role: 32 if role in ("image_encoder", "single_stream") else 64 for role in fam.roles},
    )


def _install(repo: Path, *records: ImportRecord) -> None:
    """What import-hf leaves for the server to read: each model's checkpoint folder and the repository list."""
    for r in records:
        folder = r.checkpoint_dir(repo)
        folder.mkdir(parents=True)
        (folder / IMPORT_RECORD).write_text(json.dumps(r.to_json()))
        _tokenizer().save(str(folder / TOKENIZER_FILE))
    write_repository_models(repo, {r.name: r for r in records})


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    _install(repo, _record("blip-base", "blip_retrieval"), _record("vilt-vqa", "vilt_vqa"))
    return repo


@pytest.fixture
def runtimes(repo: Path):
    records = read_repository_models(repo)
    return {name: load_imported_runtime(r, r.checkpoint_dir(repo)) for name, r in records.items()}


def test_import_records_round_trip_through_the_repository_list(repo):
    records = read_repository_models(repo)
    assert sorted(records) == ["blip-base", "vilt-vqa"]
    assert records["blip-base"] == _record("blip-base", "blip_retrieval")
    assert records["vilt-vqa"] == _record("vilt-vqa", "vilt_vqa")
    assert json.loads((repo / REPOSITORY_MODELS).read_text())["models"]["vilt-vqa"]["tasks"] == ["vqa"]
    assert read_repository_models(repo / "elsewhere") == {}


def test_vqa_on_a_blip_retrieval_model_is_a_422_naming_its_tasks(runtimes):
    task = VqaTask(model="blip-base", image=b"png", questions=["what color is the circle?"])
    with pytest.raises(TaskNotSupported) as e:
        check_task(task, runtimes["blip-base"])
    assert e.value.http_status == 422 and e.value.code == "task_not_supported"
    assert e.value.grpc_status == "INVALID_ARGUMENT"
    assert "'blip-base'" in e.value.message and "vqa" in e.value.message
    assert "match, retrieve, embed" in e.value.message


@pytest.mark.parametrize(
    "task",
    [
        MatchTask(model="vilt-vqa", image=b"png", texts=["a red circle"]),
        RetrieveTask(model="vilt-vqa", image=b"png", texts=["a red circle"]),
        EmbedTask(model="vilt-vqa", texts=["a red circle"]),
    ],
)
def test_match_retrieve_embed_on_a_vilt_vqa_model_are_422s(runtimes, task):
    with pytest.raises(TaskNotSupported, match=r"its tasks are vqa\b"):
        check_task(task, runtimes["vilt-vqa"])


def test_each_model_takes_its_own_tasks(runtimes):
    check_task(VqaTask(model="vilt-vqa", image=b"png", questions=["is there a red circle?"]), runtimes["vilt-vqa"])
    for task in (
        MatchTask(model="blip-base", image=b"png", texts=["a"]),
        RetrieveTask(model="blip-base", text="a", images=[b"png"]),
        EmbedTask(model="blip-base", images=[b"png"]),
    ):
        check_task(task, runtimes["blip-base"])


def test_imported_runtimes_route_to_their_own_engines(runtimes):
    blip, vilt = runtimes["blip-base"], runtimes["vilt-vqa"]
    assert blip.engines() == ("blip-base_image_encoder", "blip-base_text_encoder", "blip-base_fusion")
    assert vilt.engines() == ("vilt-vqa_single_stream",)
    assert blip.version == "" and blip.max_tokens == 40 and vilt.answers == ("yes", "no")
    assert (blip.max_batch("image_encoder"), blip.max_batch("fusion"), vilt.max_batch("single_stream")) == (32, 64, 32)
    ids, mask = blip.tokenize(["a red circle", "a"])
    assert ids.shape == (2, 16) and mask.sum(axis=1).tolist() == [3, 1]


def test_describe_lists_family_tasks_engines_precision_and_parity(runtimes):
    d = describe(runtimes["vilt-vqa"])
    assert d["family"] == "vilt_vqa" and d["architecture"] == "ViltForQuestionAnswering"
    assert d["tasks"] == ["vqa"] and d["engines"] == {"single_stream": "vilt-vqa_single_stream"}
    assert d["precision"] == "fp32" and d["parity"]["ok"] is True


def test_served_models_are_the_settings_ones_and_every_imported_one(tmp_path, repo):
    args = make_args(make_checkpoint(tmp_path / "tiny"), repository=str(repo))
    got = load_runtimes(args)
    assert sorted(got) == ["blip-base", "tiny", "vilt-vqa"]
    assert got["tiny"].family is NATIVE and got["tiny"].record is None
    assert got["tiny"].max_batch("image_encoder") is None  # native: the app's engine_max_batch alone
    assert got["blip-base"].family is BLIP_RETRIEVAL
    check_task(VqaTask(model="tiny", image=b"png", questions=["a"]), got["tiny"])


def test_an_imported_model_with_its_files_gone_says_how_to_fix_it(repo):
    record = read_repository_models(repo)["vilt-vqa"]
    (record.checkpoint_dir(repo) / TOKENIZER_FILE).unlink()
    with pytest.raises(ModelFilesMissing, match="import-hf SOURCE --name vilt-vqa"):
        load_imported_runtime(record, record.checkpoint_dir(repo))
