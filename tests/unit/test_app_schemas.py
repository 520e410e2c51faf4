"""Request schemas, task conversion and limits: what is refused, with which status and message."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serving.app import schemas
from serving.app.http_api import validate_body
from serving.app.settings import AppArgs, Limits, ModelSpec
from serving.app.tasks import (
    EmbedTask,
    MatchTask,
    RetrieveTask,
    VqaTask,
    check_limits,
    decode_b64,
    from_http,
    resolve_model,
)
from serving.errors import InvalidBase64, PayloadTooLarge, SchemaViolation, UnknownModel
from serving.model.checkpoint import REPO_ROOT

IMG = base64.b64encode(b"\x89PNG fake").decode()


def test_vqa_request_defaults_and_round_trip():
    r = schemas.VqaRequest.model_validate({"image": IMG, "questions": ["what color is the circle?"]})
    assert (r.top_k, r.return_attention, r.model) == (1, False, None)
    task = from_http(r, "tiny")
    assert isinstance(task, VqaTask) and task.image == b"\x89PNG fake"
    assert task.questions == ["what color is the circle?"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"image": IMG, "questions": []}, "questions"),
        ({"image": IMG, "questions": ["q"], "colour": 1}, "colour"),
        ({"image": IMG, "questions": "what?"}, "questions"),
        ({"image": IMG, "questions": ["q"], "top_k": "3"}, "top_k"),
        ({"image": IMG, "questions": ["q"], "top_k": 0}, "top_k"),
        ({"image": IMG, "questions": ["q"], "top_k": True}, "top_k"),
        ({"image": 5, "questions": ["q"]}, "image"),
        ({"questions": ["q"]}, "image"),
        ({"image": IMG, "questions": [""]}, "questions.0"),
        ({"image": IMG, "questions": ["q"], "model": ""}, "model"),
        (["not", "an", "object"], "body"),
    ],
)
def test_vqa_schema_violations_are_422_naming_the_field(body, field):
    with pytest.raises(SchemaViolation) as e:
        validate_body("/v1/vqa", body)
    assert e.value.http_status == 422 and e.value.code == "schema_violation"
    assert e.value.message.startswith(field) or field in e.value.message


def test_unknown_field_message_says_to_remove_it():
    with pytest.raises(SchemaViolation, match="colour: unknown field: remove it"):
        validate_body("/v1/vqa", {"image": IMG, "questions": ["q"], "colour": "red"})


@pytest.mark.parametrize(
    "body, message",
    [
        ({"image": IMG, "texts": ["a"], "text": "b", "images": [IMG]}, "not both forms"),
        ({"top_k": 1}, "send image + texts"),
        ({"image": IMG}, "needs both `image` and `texts`"),
        ({"text": "a red circle"}, "needs both `text` and `images`"),
        ({"image": IMG, "texts": []}, "at least 1 item"),
        ({"text": "a", "images": []}, "at least 1 item"),
    ],
)
def test_retrieve_needs_exactly_one_complete_form(body, message):
    with pytest.raises(SchemaViolation, match=re.escape(message)):
        validate_body("/v1/retrieve", body)


def test_retrieve_forms_become_tasks():
    a = from_http(validate_body("/v1/retrieve", {"image": IMG, "texts": ["x", "y"], "top_k": 2}), "tiny")
    b = from_http(validate_body("/v1/retrieve", {"text": "x", "images": [IMG, IMG]}), "tiny")
    assert isinstance(a, RetrieveTask) and a.image_form and a.texts == ["x", "y"] and a.top_k == 2
    assert isinstance(b, RetrieveTask) and not b.image_form and len(b.images or []) == 2


@pytest.mark.parametrize("body", [{}, {"images": []}, {"texts": []}, {"images": None, "texts": None}])
def test_empty_embed_request_is_422(body):
    with pytest.raises(SchemaViolation):
        validate_body("/v1/embed", body)


def test_embed_images_only_and_texts_only():
    t = from_http(validate_body("/v1/embed", {"images": [IMG]}), "tiny")
    assert isinstance(t, EmbedTask) and len(t.images) == 1 and t.texts == []
    t = from_http(validate_body("/v1/embed", {"texts": ["a red circle"]}), "tiny")
    assert isinstance(t, EmbedTask) and t.images == [] and t.texts == ["a red circle"]


def test_base64_strict_with_data_url_and_whitespace():
    assert decode_b64("data:image/png;base64," + IMG, "image") == b"\x89PNG fake"
    assert decode_b64(IMG[:4] + "\n" + IMG[4:], "image") == b"\x89PNG fake"
    with pytest.raises(InvalidBase64) as e:
        decode_b64("not base64!!", "image")
    assert e.value.http_status == 400 and e.value.code == "invalid_base64"


def test_bad_base64_surfaces_as_400_not_422():
    body = validate_body("/v1/match", {"image": "%%%", "texts": ["a"]})
    with pytest.raises(InvalidBase64):
        from_http(body, "tiny")


def test_resolve_model():
    assert resolve_model(None, ["tiny"], "tiny") == "tiny"
    assert resolve_model("tiny", ["tiny", "small"], "tiny") == "tiny"
    with pytest.raises(UnknownModel) as e:
        resolve_model("huge", ["tiny"], "tiny")
    assert e.value.http_status == 422 and e.value.code == "unknown_model" and "tiny" in e.value.message


LIM = Limits(max_questions=4, max_texts=5, max_images=3, max_text_chars=40, max_top_k=10)


@pytest.mark.parametrize(
    "task, error, setting",
    [
        (VqaTask("tiny", b"x", ["q"] * 5), PayloadTooLarge, "max_questions"),
        (MatchTask("tiny", b"x", ["t"] * 6), PayloadTooLarge, "max_texts"),
        (RetrieveTask("tiny", 1, image=b"x", texts=["t"] * 6), PayloadTooLarge, "max_texts"),
        (RetrieveTask("tiny", 1, text="t", images=[b"x"] * 4), PayloadTooLarge, "max_images"),
        (EmbedTask("tiny", [b"x"] * 4, []), PayloadTooLarge, "max_images"),
        (VqaTask("tiny", b"x", ["w " * 30]), SchemaViolation, "max_text_chars"),
        (VqaTask("tiny", b"x", ["q"], top_k=11), SchemaViolation, "max_top_k"),
    ],
)
def test_limits_name_their_setting(task, error, setting):
    with pytest.raises(error) as e:
        check_limits(task, LIM)
    assert setting in e.value.message


@pytest.mark.parametrize(
    "task",
    [
        VqaTask("tiny", b"", ["q"]),
        VqaTask("tiny", b"x", []),
        VqaTask("tiny", b"x", ["   "]),
        MatchTask("tiny", b"x", []),
        RetrieveTask("tiny", 1, text="", images=[b"x"]),
        RetrieveTask("tiny", 1, text="t", images=[b""]),
        EmbedTask("tiny", [], []),
    ],
)
def test_empty_things_are_422(task):
    with pytest.raises(SchemaViolation):
        check_limits(task, LIM)


def test_within_limits_passes():
    check_limits(VqaTask("tiny", b"x", ["q"] * 4, top_k=10), LIM)
    check_limits(EmbedTask("tiny", [b"x"] * 3, ["t"] * 5), LIM)


def test_app_args_defaults_env_and_validation():
    a = AppArgs()
    assert a.default_model == "tiny" and a.models["tiny"].engines() == ("image_encoder", "text_encoder", "fusion")
    b = a.with_env(
        {"VTFUSE_TRITON_URL": "10.0.0.1:8001", "VTFUSE_LIMITS_MAX_QUESTIONS": "8", "VTFUSE_PREPROCESS": "inline"}
    )
    assert (b.triton_url, b.limits.max_questions, b.preprocess) == ("10.0.0.1:8001", 8, "inline")
    assert a.with_env({}) is a
    with pytest.raises(ValidationError, match="default_model"):
        AppArgs(default_model="small")
    with pytest.raises(ValidationError):
        AppArgs.model_validate({"tritn_url": "typo"})


def test_checkpoint_dir_defaults_to_the_installed_fusion_version(tmp_path: Path):
    (tmp_path / "fusion" / "1").mkdir(parents=True)
    (tmp_path / "fusion" / "3").mkdir()
    assert ModelSpec().checkpoint_dir(tmp_path) == tmp_path / "fusion" / "3" / "checkpoint"
    assert ModelSpec(version="1").checkpoint_dir(tmp_path) == tmp_path / "fusion" / "1" / "checkpoint"
    assert ModelSpec(checkpoint="/x").checkpoint_dir(tmp_path) == Path("/x")


def test_serve_config_args_are_valid_app_args():
    config = yaml.safe_load((REPO_ROOT / "deploy" / "serve_config.yaml").read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "serving.app.builder:build_app"
    args = AppArgs.model_validate(app["args"])
    assert args.default_model == "tiny" and args.preprocess in ("deployment", "inline")
    names = {d["name"] for d in app["deployments"]}
    assert names == ({"Ingress"} if args.preprocess == "inline" else {"Ingress", "Preprocess"})
    for d in app["deployments"]:
        assert 0 < d["ray_actor_options"]["num_cpus"] < 1  # fractional: replicas fit beside Triton
    assert config["grpc_options"]["port"] == 9000 and config["http_options"]["port"] == 8080


@pytest.mark.parametrize(("value", "ok"), [("all", True), (8, True), (None, True), (0, False), ("some", False),
                                           ("8", False), (True, False)])
def test_retrieve_shortlist_is_a_number_or_all(value, ok):
    from pydantic import ValidationError

    from serving.app.schemas import RetrieveRequest

    body = {"image": "aGk=", "texts": ["a red circle"], **({} if value is None else {"shortlist": value})}
    if ok:
        assert RetrieveRequest.model_validate(body).shortlist == value
    else:
        with pytest.raises(ValidationError):
            RetrieveRequest.model_validate(body)
