"""Routing decisions: engines per request kind, feature reuse, retrieval shortlist and re-rank."""

from __future__ import annotations

import numpy as np
import pytest

from serving.app import router
from serving.app.router import EngineCall


def rows(plan, engine):
    return [c.rows for c in router.engine_calls(plan, engine)]


def test_embed_routes_by_what_the_request_carries():
    assert router.plan_embed(3, 0) == ((EngineCall("image_encoder", 3, ("IMAGE_EMBEDDING",)),),)
    assert router.plan_embed(0, 2) == ((EngineCall("text_encoder", 2, ("TEXT_EMBEDDING",)),),)
    (stage,) = router.plan_embed(1, 1)
    assert {c.engine for c in stage} == {"image_encoder", "text_encoder"}
    assert not router.engine_calls(router.plan_embed(2, 2), "fusion")
    with pytest.raises(ValueError):
        router.plan_embed(0, 0)


def test_vqa_with_eight_questions_encodes_the_image_once():
    plan = router.plan_vqa(8)
    assert rows(plan, "image_encoder") == [1]
    assert rows(plan, "text_encoder") == [8]
    assert rows(plan, "fusion") == [8]
    assert plan[0][0].outputs == ("IMAGE_FEATURES",)  # the embedding is not needed: not requested
    assert router.engine_calls(plan, "fusion")[0].outputs == ("VQA_LOGITS",)
    assert "CROSS_ATTENTION" in router.engine_calls(router.plan_vqa(2, return_attention=True), "fusion")[0].outputs


def test_match_runs_fusion_per_text_on_one_image():
    plan = router.plan_match(5)
    assert (rows(plan, "image_encoder"), rows(plan, "text_encoder"), rows(plan, "fusion")) == ([1], [5], [5])
    assert router.engine_calls(plan, "fusion")[0].outputs == ("ITM_LOGIT",)


@pytest.mark.parametrize("n, k, expected", [(40, 1, 16), (40, 5, 20), (40, 12, 40), (10, 1, 10), (100, 30, 100)])
def test_shortlist_size_is_max_16_4k_capped_by_candidates(n, k, expected):
    assert router.shortlist_size(n, k) == expected


def test_retrieve_40_captions_top1_reranks_16_with_itm():
    plan = router.plan_retrieve_texts(40, 1)
    assert rows(plan, "image_encoder") == [1]
    assert rows(plan, "fusion") == [16]
    # embeddings for all 40, features only for the 16 shortlisted
    assert [(c.rows, c.outputs) for c in router.engine_calls(plan, "text_encoder")] == [
        (40, ("TEXT_EMBEDDING",)),
        (16, ("TEXT_FEATURES",)),
    ]


def test_retrieve_small_candidate_sets_fetch_features_with_embeddings():
    plan = router.plan_retrieve_texts(8, 1)
    assert len(plan) == 2 and rows(plan, "text_encoder") == [8] and rows(plan, "fusion") == [8]
    plan = router.plan_retrieve_images(8, 1)
    assert rows(plan, "image_encoder") == [8] and rows(plan, "fusion") == [8]


def test_retrieve_images_encodes_each_image_once_and_reuses_the_shortlist_s_features():
    plan = router.plan_retrieve_images(30, 2)
    assert [(c.rows, c.outputs) for c in router.engine_calls(plan, "image_encoder")] == [
        (30, ("IMAGE_FEATURES", "IMAGE_EMBEDDING")),
    ]
    assert rows(plan, "text_encoder") == [1] and rows(plan, "fusion") == [16]


def test_shortlist_picks_most_similar_best_first():
    rng = np.random.default_rng(0)
    cands = rng.normal(size=(10, 8))
    query = cands[7] * 3 + 0.01 * rng.normal(size=8)  # scale must not matter (cosine)
    top = router.shortlist(query, cands, 4)
    assert top[0] == 7 and len(top) == 4 and len(set(top.tolist())) == 4
    sims = (cands / np.linalg.norm(cands, axis=1, keepdims=True)) @ (query / np.linalg.norm(query))
    assert list(top) == list(np.argsort(-sims)[:4])


def test_rerank_orders_by_itm_and_keeps_request_indices():
    cand = np.array([5, 2, 9])
    ranked = router.rerank(cand, np.array([[0.1], [2.0], [-1.0]]), top_k=2)
    assert [i for i, _ in ranked] == [2, 5]
    assert ranked[0][1] == pytest.approx(1 / (1 + np.exp(-2.0)))


def test_sigmoid_softmax_and_top_answers():
    assert router.sigmoid(np.array([0.0, 1000.0, -1000.0])).tolist() == pytest.approx([0.5, 1.0, 0.0])
    p = router.softmax(np.array([[1.0, 3.0, 2.0]]))
    assert p.sum() == pytest.approx(1.0)
    top = router.top_answers(p[0], ["a", "b", "c"], 2)
    assert top == [("b", pytest.approx(p[0, 1])), ("c", pytest.approx(p[0, 2]))]
    assert len(router.top_answers(p[0], ["a", "b", "c"], 10)) == 3


def test_attention_grid_is_first_layer_cls_row_summing_to_one():
    att = np.zeros((2, 4, 4))  # (layers, tokens, patches)
    att[0, 0, 1] = 2.0  # first layer, [CLS] → patch 1
    att[0, 1, 3] = 1.0  # other tokens and layers are not the map
    att[1, 0, 2] = 1.0
    grid = router.attention_grid(att, 2)
    assert grid.shape == (2, 2) and grid.sum() == pytest.approx(1.0) and grid[0, 1] == pytest.approx(1.0)


def test_token_list_is_the_unpadded_tokens():
    class Tok:
        def id_to_token(self, i: int) -> str | None:
            return {1: "[CLS]", 2: "[SEP]", 7: "red"}.get(i)

    ids, mask = np.array([1, 7, 9, 2, 0, 0]), np.array([1, 1, 1, 1, 0, 0])
    assert router.token_list(Tok(), ids, mask) == ["[CLS]", "red", "[UNK]", "[SEP]"]  # type: ignore[arg-type]


def test_chunks_respect_engine_max_batch():
    assert router.chunks(130, 64) == [slice(0, 64), slice(64, 128), slice(128, 130)]
    assert router.chunks(3, 64) == [slice(0, 3)]


def test_shortlist_size_follows_the_request():
    assert router.shortlist_size(64, 1) == 16 and router.shortlist_size(64, 5) == 20  # max(16, 4·top_k)
    assert router.shortlist_size(64, 1, "all") == 64  # exact: ITM on every candidate
    assert router.shortlist_size(64, 5, 8) == 8 and router.shortlist_size(64, 10, 8) == 10  # never below top_k
    assert router.shortlist_size(12, 1, 32) == 12
    plan = router.plan_retrieve_texts(64, 1, text_features=False, shortlist="all")
    assert rows(plan, "fusion") == [64]
