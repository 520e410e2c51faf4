"""Imported models learnt from Triton's `vtfuse_catalog` answer: the answer's content and how a replica uses it."""

from __future__ import annotations

import json
import shutil

from serving.app.catalog import ImportedCatalog
from serving.app.models import runtime_from_record
from serving.families.imported import (
    ImageProcessing,
    ImportRecord,
    catalog,
    from_catalog,
    write_repository_models,
)
from serving.paths import DEFAULT_CHECKPOINT
from serving.triton.client import TritonClientSettings


def _record(name: str) -> ImportRecord:
    return ImportRecord(
        name=name, family="vilt_vqa", architecture="ViltForQuestionAnswering", tasks=("vqa",),
        engines={"single_stream": f"{name}_single_stream"}, precision="fp32", source="/hf/vilt",
        image=ImageProcessing(mode="vilt", shortest_edge=64, size_divisor=16), max_tokens=40, labels=("yes", "no"),
        parity={"tolerance": 1e-4},
    )  # fmt: skip


def _repo_with(tmp_path, *names):
    repo = tmp_path / "repo"
    records = {}
    for n in names:
        r = _record(n)
        ckpt = r.checkpoint_dir(repo)
        ckpt.mkdir(parents=True)
        shutil.copyfile(DEFAULT_CHECKPOINT / "tokenizer.json", ckpt / "tokenizer.json")
        (ckpt / "import.json").write_text(json.dumps(r.to_json()))
        records[n] = r
    write_repository_models(repo, records)
    return repo, records


def test_catalog_carries_each_record_and_its_tokenizer(tmp_path):
    repo, records = _repo_with(tmp_path, "vqa-a", "vqa-b")
    body = json.loads(json.dumps(catalog(repo)))  # what crosses the wire
    assert sorted(body["models"]) == ["vqa-a", "vqa-b"]
    record, tok = from_catalog(body["models"]["vqa-a"])
    assert record == records["vqa-a"]
    assert tok.encode("what color is the circle").ids[0] == tok.token_to_id("[CLS]")
    assert catalog(tmp_path / "nothing-imported") == {"models": {}}


def test_a_replica_learns_missing_models_once_per_interval(tmp_path):
    repo, _ = _repo_with(tmp_path, "vqa-a")
    calls = []

    def fetch(_settings):
        calls.append(1)
        return catalog(repo)

    cat = ImportedCatalog(TritonClientSettings(), runtime_from_record, min_interval_s=60, fetch=fetch)
    runtimes: dict = {"tiny": object()}
    assert cat.refresh(runtimes) == ["vqa-a"]
    assert runtimes["vqa-a"].tasks == ("vqa",) and runtimes["vqa-a"].engine("single_stream") == "vqa-a_single_stream"
    assert cat.refresh(runtimes) == [] and len(calls) == 1  # rate-limited: unknown names cannot flood Triton


def test_a_failing_catalog_leaves_the_known_models(tmp_path):
    def fetch(_settings):
        raise ConnectionError("Triton is not up yet")

    cat = ImportedCatalog(TritonClientSettings(), runtime_from_record, min_interval_s=0, fetch=fetch)
    runtimes: dict = {"tiny": object()}
    assert cat.refresh(runtimes) == [] and list(runtimes) == ["tiny"]
