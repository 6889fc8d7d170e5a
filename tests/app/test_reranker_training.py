"""The reranker end to end: settings (off by default, the deprecated alias), the registry, the reranking stage in
the service's retrieval path, the training config, pairs mined by the service's own retriever, and training.

The model is a real cross-encoder: the bundled MiniLM weights with a seeded random head
(tests/retrieval/test_cross_encoder.py), or trained for a few steps on a tiny BEIR folder and SQuAD file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from app.cli.common import DEMO_CORPUS
from app.container import build_services
from ingestion.loaders import load_documents
from tests.app.conftest import make_settings
from tests.retrieval.test_cross_encoder import random_head_reranker

QUESTION = "How many vacation days do employees get?"


def test_the_reranker_is_off_by_default_and_a_missing_one_fails_naming_the_setting(tmp_path):
    from app.container import build_reranker

    assert make_settings(tmp_path).rerank_model is None
    assert build_reranker(make_settings(tmp_path)) is None
    assert build_reranker(make_settings(tmp_path, rerank_model="none")) is None
    with pytest.raises(LookupError, match="RAG_RERANK_MODEL='missing'.*rag train reranker"):
        build_reranker(make_settings(tmp_path, rerank_model="missing", rerankers_dir=tmp_path / "nowhere"))


def test_rag_reranker_is_a_deprecated_alias(tmp_path, monkeypatch):
    monkeypatch.setenv("RAG_RERANKER", "old-name")
    assert make_settings(tmp_path).rerank_model == "old-name"
    monkeypatch.setenv("RAG_RERANK_MODEL", "new-name")
    assert make_settings(tmp_path).rerank_model == "new-name"  # the new name wins


def test_a_published_reranker_loads_by_name_and_version(tmp_path):
    from app.container import build_reranker
    from ingestion.registry import RerankerRegistry

    registry = RerankerRegistry(tmp_path / "rerankers")
    ref = registry.publish("tiny", random_head_reranker(tmp_path / "model"))
    assert ref.label == "tiny@v1" and (ref.path / "metadata.json").is_file()
    reranker = build_reranker(make_settings(tmp_path, rerank_model="tiny", rerankers_dir=tmp_path / "rerankers"))
    assert reranker.name == "tiny@v1" and len(reranker.score(QUESTION, ["a", "b"])) == 2
    assert build_reranker(make_settings(tmp_path, rerank_model=str(ref.path))).name == "v1"  # a folder, as it is


@pytest.fixture(scope="module")
def demo_index(tmp_path_factory, embedder):
    settings = make_settings(tmp_path_factory.mktemp("demo-rerank"))
    services = build_services(settings, load_generator=False, embedder=embedder)
    services.indexer().apply(load_documents([DEMO_CORPUS]))
    yield services
    services.ledger.close()


def test_the_stage_reorders_the_fused_top_n_and_keeps_top_k(demo_index, tmp_path):
    from generation.rag import retrieve_context
    from retrieval.cross_encoder import CrossEncoderReranker

    reranker = CrossEncoderReranker.load(random_head_reranker(tmp_path / "model"))
    live = demo_index.live
    args = (live.retriever, demo_index.ledger, live.generation.generation, QUESTION)
    fused = retrieve_context(*args, 6)
    assert len(fused) == 6 and all(c.rerank_score is None for c in fused)  # off: no stage, fused order
    reranked = retrieve_context(*args, 2, reranker=reranker, rerank_top_n=6)
    scores = reranker.score(QUESTION, [c.text for c in fused])
    best = sorted(range(6), key=lambda i: -scores[i])[:2]
    assert [c.chunk_id for c in reranked] == [fused[i].chunk_id for i in best]
    assert [c.rerank_score for c in reranked] == pytest.approx([scores[i] for i in best], abs=1e-4)
    # top_n below top_k: the stage still reorders top_k candidates and drops none
    assert len(retrieve_context(*args, 4, reranker=reranker, rerank_top_n=1)) == 4


def test_the_rerank_score_feeds_the_gate_and_the_citation(demo_index, tmp_path):
    from dataclasses import replace

    from generation.grounding import Thresholds, has_relevant_context, relevance_signals
    from generation.rag import retrieve_context

    live = demo_index.live
    chunks = retrieve_context(live.retriever, demo_index.ledger, live.generation.generation, QUESTION, 2)
    scored = [replace(c, rerank_score=p) for c, p in zip(chunks, (0.2, 0.1))]
    signals = relevance_signals(QUESTION, scored, scorer=None)
    assert signals.answerability == [0.2, 0.1]  # the stage's scores, not scored again
    open_gate = Thresholds(relevance_min=0.0)
    assert has_relevant_context(signals, open_gate)
    assert not has_relevant_context(signals, replace(open_gate, answerability_min=0.5))


def test_citations_carry_the_rerank_score():
    from app.schemas import QueryResponse
    from generation.rag import Citation

    schema = QueryResponse.model_json_schema()["$defs"]["Citation"]["properties"]
    assert "rerank_score" in schema and "answerability" not in schema
    cited = Citation(ref=1, chunk_id="c", document_id="d", section="", source="s", score=1.0, text="t",
                     rerank_score=0.83)
    assert QueryResponse.model_validate({"answer": "x", "abstained": False, "abstain_reason": None,
                                         "grounded": True, "grounding_score": 1.0, "cited": [1],
                                         "citations": [cited], "provenance": {
                                             "index_collection": "c", "index_generation": 1, "embedding_model": "e",
                                             "generator_model": "g", "adapter": None, "reranker": "tiny@v1",
                                             "prompt_template_version": "v"},
                                         "timings_ms": {"retrieval": 1, "generation": 1, "total": 2}}
                                        ).model_dump()["citations"][0]["rerank_score"] == 0.83
    assert Citation(ref=1, chunk_id="c", document_id="d", section="", source="s", score=1.0,
                    text="t").rerank_score is None  # no reranker: null


def write_config(path: Path, **values) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(values))
    return path


def test_the_config_is_validated_naming_the_file(tmp_path):
    from generation.finetune.reranker import RerankerConfig

    repo = Path(__file__).resolve().parents[2]
    committed = RerankerConfig.from_yaml(repo / "configs" / "train" / "minilm-rerank.yaml")
    assert committed.base_model == "bundled:all-MiniLM-L6-v2" and committed.train_fraction == 0.8
    with pytest.raises(ValueError, match="bad.yaml: unknown setting"):
        RerankerConfig.from_yaml(write_config(tmp_path / "bad.yaml", name="x", squad_file="typo"))
    with pytest.raises(ValueError, match="no training data"):
        RerankerConfig.from_yaml(write_config(tmp_path / "empty.yaml", name="x"))
    with pytest.raises(ValueError, match="train_fraction"):
        RerankerConfig.from_yaml(write_config(tmp_path / "split.yaml", scifact_dir="x", train_fraction=1.5))


def test_the_query_split_is_seeded_and_disjoint():
    from generation.finetune.reranker import split_queries

    ids = [str(i) for i in range(50)]
    train, held = split_queries(ids, 0.8, seed=1)
    assert len(train) == 40 and len(held) == 10 and not set(train) & set(held)
    assert split_queries(ids[::-1], 0.8, seed=1) == (train, held)  # order of the input does not matter


def beir_folder(folder: Path) -> Path:
    """Six SciFact-like documents, three judged train queries."""
    docs = {"d1": ("Aspirin and platelets", "Aspirin irreversibly inhibits platelet cyclooxygenase."),
            "d2": ("Statins", "Statins lower LDL cholesterol by inhibiting HMG-CoA reductase."),
            "d3": ("Platelet counts", "Platelet counts fall during heparin therapy in some patients."),
            "d4": ("Vitamin D", "Vitamin D deficiency is common in northern latitudes in winter."),
            "d5": ("Cholesterol diet", "Dietary cholesterol has a small effect on blood cholesterol."),
            "d6": ("Sunlight", "Skin synthesises vitamin D under ultraviolet B light.")}
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "title": t, "text": x}) + "\n"
                                                 for k, (t, x) in docs.items()))
    queries = {"q1": "Aspirin inhibits platelet cyclooxygenase.", "q2": "Statins inhibit HMG-CoA reductase.",
               "q3": "Vitamin D is made in skin under UVB light."}
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n"
                                                  for k, v in queries.items()))
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\nq3\td6\t1\n")
    return folder


def tiny_config(tmp_path: Path, **overrides):
    from generation.finetune.reranker import RerankerConfig

    values = dict(name="tiny", scifact_dir=str(beir_folder(tmp_path / "beir")),
                  squad_files=[str(squad_file(tmp_path / "train.json"))], squad_articles=3, train_fraction=1.0,
                  scifact_negatives=2, squad_negatives=1, validation_queries=1, batch_size=4, max_length=64,
                  eval_steps=1, retrieve_depth=5, time_budget_minutes=2)
    return RerankerConfig(**{**values, **overrides})


def test_pairs_come_from_the_services_own_retrieval(tmp_path):
    from app.evaluation.indexes import beir_opener, corpus_opener
    from generation.finetune.reranker import build_training_pairs

    settings = make_settings(tmp_path / "data")
    train, validation, info = build_training_pairs(
        tiny_config(tmp_path), root=tmp_path, open_beir=beir_opener(settings, tmp_path / "cache"),
        open_index=corpus_opener(settings, tmp_path / "cache"))
    pairs = train + validation
    by_question: dict[str, list[tuple[str, float]]] = {}
    for question, text, label in pairs:
        by_question.setdefault(question, []).append((text, label))
    aspirin = by_question["Aspirin inhibits platelet cyclooxygenase."]
    assert [label for _, label in aspirin].count(1.0) == 1
    assert any(label == 1.0 and "irreversibly" in text for text, label in aspirin)  # its judged document
    assert len([label for _, label in aspirin if label == 0.0]) == 2  # hard negatives from the retriever
    assert all("irreversibly" not in text for text, label in aspirin if label == 0.0)
    harbor = by_question["When did the harbor of Lumen open?"]
    assert any(label == 1.0 and "1852" in text for text, label in harbor)
    assert all("1852" not in text for text, label in harbor if label == 0.0)
    assert "When did the harbor of Lumen close?" not in by_question  # unanswerable: no positive to pair
    assert info["scifact"]["validation_queries"] == 1 and len(info["sha256"]) == 64
    assert info["pairs"]["train"] == len(train) and info["pairs"]["validation"] == len(validation)


def test_unanswerable_questions_are_negatives_with_their_own_paragraph(tmp_path):
    """SQuAD 2.0's unanswerable questions (squad_unanswerable) pair with the paragraph they were written
    against, labelled 0: the on-topic negatives an answerability model needs; an adapter's validation
    articles (exclude_validation_of) never reach the pairs."""
    from app.evaluation.indexes import corpus_opener
    from generation.finetune.reranker import build_training_pairs

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "metadata.json").write_text(json.dumps(
        {"training_data": {"articles": {"validation": ["Held_out"]}}}))
    settings = make_settings(tmp_path / "data")
    train, validation, info = build_training_pairs(
        tiny_config(tmp_path, scifact_dir="", squad_unanswerable=5, validation_queries=0,
                    exclude_validation_of="adapter/metadata.json"),
        root=tmp_path, open_beir=None, open_index=corpus_opener(settings, tmp_path / "cache"))
    closed = [(text, label) for question, text, label in train if question == "When did the harbor of Lumen close?"]
    assert closed and all(label == 0.0 for _, label in closed)
    assert any("opened in 1852" in text for text, _ in closed)  # its own paragraph, on topic, no answer
    assert not any("museum" in text for _, text, _ in train + validation)
    assert "What does the museum show?" not in {q for q, _, _ in train}
    assert info["squad"]["excluded_articles"] == ["Held_out"] and info["squad"]["answerable"] == 3


def test_training_pairs_are_cached_by_their_data_settings(tmp_path):
    """A rerun that changes only training knobs reuses the pairs; one that changes the data builds anew."""
    from app.evaluation.indexes import corpus_opener
    from generation.finetune.reranker import cached_training_pairs

    settings = make_settings(tmp_path / "data")
    opened = []

    def open_index(*args):
        opened.append(args)
        return corpus_opener(settings, tmp_path / "cache")(*args)

    config = tiny_config(tmp_path, scifact_dir="")
    first = cached_training_pairs(config, root=tmp_path, open_beir=None, open_index=open_index,
                                  cache_root=tmp_path / "cache")
    again = cached_training_pairs(dataclasses.replace(config, learning_rate=1e-4, batch_size=2), root=tmp_path,
                                  open_beir=None, open_index=open_index, cache_root=tmp_path / "cache")
    assert len(opened) == 1 and again[0] == first[0] and again[2] == first[2]
    cached_training_pairs(dataclasses.replace(config, squad_negatives=0), root=tmp_path, open_beir=None,
                          open_index=open_index, cache_root=tmp_path / "cache")
    assert len(opened) == 2


def squad_file(path: Path) -> Path:
    def article(title, paragraphs):
        return {"title": title, "paragraphs": paragraphs}

    data = {"version": "v2.0", "data": [
        article("Harbor", [
            {"context": "The harbor of Lumen opened in 1852. Its lighthouse is painted red and white.",
             "qas": [{"id": "h1", "question": "When did the harbor of Lumen open?", "is_impossible": False,
                      "answers": [{"text": "1852", "answer_start": 31}]},
                     {"id": "h2", "question": "When did the harbor of Lumen close?", "is_impossible": True,
                      "answers": [], "plausible_answers": [{"text": "1852", "answer_start": 31}]}]},
            {"context": "Ferries leave the harbor every hour for the islands of the bay.",
             "qas": [{"id": "h3", "question": "How often do ferries leave the harbor?", "is_impossible": False,
                      "answers": [{"text": "every hour", "answer_start": 26}]}]}]),
        article("Orchard", [
            {"context": "The orchard grows forty kinds of apples. Cider is pressed in October.",
             "qas": [{"id": "o1", "question": "When is cider pressed?", "is_impossible": False,
                      "answers": [{"text": "October", "answer_start": 61}]}]}]),
        article("Held_out", [
            {"context": "The museum shows maps of the old coast.",
             "qas": [{"id": "m1", "question": "What does the museum show?", "is_impossible": False,
                      "answers": [{"text": "maps of the old coast", "answer_start": 17}]}]}]),
    ]}
    path.write_text(json.dumps(data))
    return path


@pytest.mark.slow
def test_training_publishes_a_reranker_the_service_loads(tmp_path):
    from app.container import build_reranker
    from app.evaluation.indexes import beir_opener, corpus_opener
    from ingestion.registry import RerankerRegistry
    from generation.finetune.reranker import train_reranker

    settings = make_settings(tmp_path / "data", rerankers_dir=tmp_path / "rerankers")
    ref = train_reranker(tiny_config(tmp_path), root=tmp_path, registry_root=tmp_path / "rerankers",
                         cache_root=tmp_path / "cache", open_beir=beir_opener(settings, tmp_path / "cache"),
                         open_index=corpus_opener(settings, tmp_path / "cache"), config_text="name: tiny\n")
    metadata = json.loads((ref.path / "metadata.json").read_text())
    assert metadata["base_model"] == "bundled:all-MiniLM-L6-v2" and metadata["kind"] == "cross-encoder"
    assert metadata["max_length"] == 64 and len(metadata["training_data"]["sha256"]) == 64
    assert metadata["metrics"]["steps"] >= 1 and "average_precision" in metadata["metrics"]
    assert metadata["config"]["name"] == "tiny" and (ref.path / "train_config.yaml").is_file()
    assert (ref.path / "training_curve.png").stat().st_size > 0
    assert RerankerRegistry(tmp_path / "rerankers").active("tiny") == "v1"
    reranker = build_reranker(settings.model_copy(update={"rerank_model": "tiny"}))
    scores = reranker.score("When is cider pressed?", ["Cider is pressed in October.", "Ferries leave hourly."])
    assert len(scores) == 2 and all(0 < s < 1 for s in scores)
