"""The reranker (retrieval/cross_encoder.py): a real cross-encoder built from the bundled MiniLM weights with a
seeded random head (no training), saved and loaded as a trained one is; scores, order and the top-k cut."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

QUESTION = "How many vacation days do employees get?"
TEXTS = ["Employees get 28 vacation days a year.", "The meal allowance is 55 euros.",
         "Passwords need 14 characters.", "Vacation requests go to your manager.", "The office opens at 8."]


def random_head_reranker(folder: Path, max_length: int = 64) -> Path:
    """A sentence-transformers CrossEncoder folder: bundled MiniLM encoder + a seeded random one-logit head."""
    import torch
    from sentence_transformers import CrossEncoder

    from ingestion.embedder import resolve_embedding_model

    torch.manual_seed(0)
    model = CrossEncoder(resolve_embedding_model("bundled:all-MiniLM-L6-v2"), num_labels=1, max_length=max_length)
    with torch.no_grad():
        model.model.classifier.weight.normal_(0, 0.5)  # spread the scores: an untrained head is near-constant
    model.save_pretrained(str(folder))
    (folder / "metadata.json").write_text(json.dumps({"name": "tiny", "kind": "cross-encoder",
                                                      "base_model": "bundled:all-MiniLM-L6-v2",
                                                      "max_length": max_length}))
    return folder


@pytest.fixture(scope="module")
def reranker_folder(tmp_path_factory) -> Path:
    return random_head_reranker(tmp_path_factory.mktemp("reranker"))


@pytest.fixture(scope="module")
def reranker(reranker_folder):
    from retrieval.cross_encoder import CrossEncoderReranker

    return CrossEncoderReranker.load(reranker_folder, name="tiny")


def test_scores_are_the_models_probabilities_in_order_and_batch_independent(reranker, reranker_folder):
    from sentence_transformers import CrossEncoder

    reference = CrossEncoder(str(reranker_folder), max_length=64)
    expected = reference.predict([(QUESTION, t) for t in TEXTS]).tolist()
    scores = reranker.score(QUESTION, TEXTS)
    assert scores == pytest.approx(expected, abs=1e-5)
    assert all(0.0 < s < 1.0 for s in scores) and len(set(scores)) == len(TEXTS)
    assert reranker.score(QUESTION, TEXTS[2:3]) == pytest.approx(scores[2:3], abs=1e-5)
    assert reranker.score(QUESTION, []) == []


def test_rerank_orders_by_score_and_keeps_top_k(reranker):
    scores = reranker.score(QUESTION, TEXTS)
    ranked = reranker.rerank(QUESTION, TEXTS, top_k=3)
    assert [i for i, _ in ranked] == sorted(range(len(TEXTS)), key=lambda i: -scores[i])[:3]
    assert [s for _, s in ranked] == pytest.approx(sorted(scores, reverse=True)[:3], abs=1e-6)
    assert len(reranker.rerank(QUESTION, TEXTS, top_k=50)) == len(TEXTS)  # fewer candidates than top_k


def test_a_folder_without_metadata_is_refused(tmp_path):
    from retrieval.cross_encoder import CrossEncoderReranker

    with pytest.raises(FileNotFoundError, match="rag train reranker"):
        CrossEncoderReranker.load(tmp_path)
