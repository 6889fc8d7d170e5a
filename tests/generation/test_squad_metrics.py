"""SQuAD EM / F1 (official v1.1 normalization) and abstention scoring, against hand-computed cases."""

from __future__ import annotations

import json

import pytest

from generation.finetune.data import QA, gold_chunk
from generation.finetune.evaluate import (exact_match_score, f1_score, normalize_answer,
                                          score_prediction, summarize)


@pytest.mark.parametrize(("text", "normalized"), [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  a  cat,   AN apple and THE dog ", "cat apple and dog"),
    ("U.S.A.", "usa"),
    ("theatre", "theatre"),  # "the" only as a whole word
    ("1,000 km", "1000 km"),
])
def test_normalize_answer(text, normalized) -> None:
    assert normalize_answer(text) == normalized


def test_f1_and_em_by_hand() -> None:
    # pred tokens [big, cat, sat], gold [cat, sat, down]: 2 shared; P = R = 2/3, F1 = 2/3
    assert f1_score("the big cat sat", "a cat sat down") == pytest.approx(2 / 3)
    # pred [cat], gold [cat, sat]: P = 1, R = 1/2, F1 = 2/3
    assert f1_score("Cat.", "cat sat") == pytest.approx(2 / 3)
    # a repeated token matches once per occurrence in the gold: pred [cat, cat], gold [cat]: P = 1/2, R = 1
    assert f1_score("cat cat", "cat") == pytest.approx(2 / 3)
    assert f1_score("dog", "cat") == 0.0
    assert exact_match_score("The Cat!", "cat") == 1.0
    assert exact_match_score("cats", "cat") == 0.0


def test_predictions_are_scored_without_citations_and_abstentions_count() -> None:
    qa = QA("1", "Where?", ("Paris", "the city of Paris"))
    record = score_prediction("Paris [2]", qa, False)
    assert record["em"] == 1.0 and record["f1"] == 1.0 and not record["abstained"]
    partial = score_prediction("in Paris, France [1]", qa, False)
    assert partial["em"] == 0.0 and partial["f1"] == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    abstained = score_prediction("I don't know.", qa, True)
    assert abstained["abstained"] and abstained["f1"] == 0.0
    impossible = QA("2", "Why?", (), impossible=True)
    records = [record, partial, abstained, score_prediction("I do not know", impossible, True),
               score_prediction("Because [1]", impossible, False)]
    summary = summarize(records)
    assert summary["n"] == 3 and summary["n_unanswerable"] == 2
    assert summary["em"] == pytest.approx(100 / 3, abs=0.01)
    assert summary["abstain_answerable"] == pytest.approx(100 / 3, abs=0.01)
    assert summary["abstain_unanswerable"] == 50.0
    assert summary["em_all"] == pytest.approx(100 * 2 / 5)


def test_out_of_corpus_answers_that_match_the_gold_answer_are_counted_apart() -> None:
    """An out-of-corpus question answered with its gold answer means another indexed article held it: the
    summary counts it (``out_of_corpus_answered_right``), beside the abstentions, and never in ``em`` / ``f1``."""
    qa = QA("1", "Who founded the dynasty?", ("Kublai Khan",))
    right = {**score_prediction("Kublai Khan [1]", qa, False), "in_corpus": False}
    wrong = {**score_prediction("Genghis Khan [1]", qa, False), "in_corpus": False}
    silent = {**score_prediction("I don't know.", qa, True), "in_corpus": False}
    summary = summarize([right, wrong, silent, {**score_prediction("Kublai Khan", qa, False), "in_corpus": True}])
    assert summary["n_out_of_corpus"] == 3 and summary["n"] == 1 and summary["em"] == 100.0
    assert summary["abstain_out_of_corpus"] == pytest.approx(100 / 3, abs=0.01)
    assert summary["out_of_corpus_answered_right"] == pytest.approx(100 / 3, abs=0.01)


IDS = [f"q{i:02d}" for i in range(12)]
# random.Random(seed).sample(sorted(IDS), 4), computed once in a separate shell
SAMPLE = {0: ["q00", "q04", "q06", "q11"], 1: ["q01", "q02", "q04", "q09"]}


def squad_file(path, ids):
    """A SQuAD v1.1 file with one article, one question per paragraph, in the order of ``ids``."""
    path.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [
        {"context": f"Context {qid}.", "qas": [{"id": qid, "question": f"Question {qid}?",
                                                "answers": [{"text": "Context", "answer_start": 0}]}]}
        for qid in ids]}]}))
    return path


def test_limit_sample_is_fixed_per_seed_by_question_id(tmp_path) -> None:
    """--limit picks known ids for a seed, on every call and whatever the file order; another seed differs."""
    from generation.finetune.evaluate import load_eval_items

    data = squad_file(tmp_path / "squad.json", IDS)
    ids = lambda path, seed: [i.qa.qid for i in load_eval_items(path, 4, seed)[1]]  # noqa: E731
    assert ids(data, 0) == ids(data, 0) == SAMPLE[0]
    assert ids(data, 1) == SAMPLE[1]
    shuffled = squad_file(tmp_path / "reversed.json", IDS[::-1])
    assert ids(shuffled, 0) == SAMPLE[0][::-1]  # the same questions, in file order


def test_limit_sample_is_the_same_for_the_base_model_and_an_adapter(tmp_path, monkeypatch) -> None:
    """`rag eval generation --limit` evaluates the same questions whichever generator (adapter) it builds."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    import app.container
    import app.evaluation.indexes
    from app.cli import cli
    from generation.finetune import evaluate as ev

    built, evaluated = [], []

    def build_generator(settings, strict):
        built.append(settings.adapter)
        return SimpleNamespace(adapter_name=settings.adapter, abstain_margin=0.0,
                               grounding=SimpleNamespace(as_dict=dict))

    def evaluate_items(generator, items, contexts, **kwargs):
        evaluated.append((generator.adapter_name, [i.qa.qid for i in items]))
        return {}, []

    index = SimpleNamespace(services=SimpleNamespace(embedder=None, bm25=SimpleNamespace(idf=None)), close=lambda: None)
    monkeypatch.setattr(app.container, "build_generator", build_generator)
    monkeypatch.setattr(app.container, "build_reranker", lambda settings: None)
    monkeypatch.setattr(app.evaluation.indexes, "squad_corpus_index", lambda *args: index)
    monkeypatch.setattr(ev, "evaluate_items", evaluate_items)
    monkeypatch.setenv("RAG_DATA_DIR", str(tmp_path / "data"))
    data = squad_file(tmp_path / "squad.json", IDS)
    for adapter in ("none", "other-adapter"):
        result = CliRunner().invoke(cli, ["eval", "generation", "--data", str(data), "--limit", "4",
                                          "--adapter", adapter])
        assert result.exit_code == 0, result.output
    assert built == [None, "other-adapter"]
    assert evaluated == [(None, SAMPLE[0]), ("other-adapter", SAMPLE[0])]


def test_rescore_and_search_choose_thresholds_from_one_open_run():
    """Four questions recorded with the gate open and abstention off; rescoring applies any thresholds."""
    from dataclasses import asdict

    from dataclasses import replace

    from generation.finetune.calibrate import GRID, NEVER_ABSTAIN, gate_configurations, search
    from generation.finetune.evaluate import Item, decision_record, rescore
    from generation.grounding import Thresholds, measure, relevance_signals, verdict
    from generation.prompt import ContextChunk

    vacation = ContextChunk("Full-time employees get 28 vacation days per calendar year.", dense_score=0.7)
    meals = ContextChunk("The daily meal allowance while travelling is 55 euros.", dense_score=0.2)
    cases = [  # (qa, chunks, generated, first-token preference, in corpus)
        (QA("a", "How many vacation days do employees get?", ("28 vacation days", "28")), [vacation],
         "28 vacation days [1]", -3.0, True),
        (QA("b", "How many vacation days does a contractor get?", (), impossible=True), [vacation],
         "28 [1]", 1.5, True),
        (QA("c", "What is the capital of France?", ("Paris",)), [meals], "55 euros [1]", -2.0, False),
        (QA("d", "How much is the meal allowance?", ("55 euros",)), [meals], "55 euros [1]", 0.5, True),
    ]
    records, items = [], []
    for qa, chunks, generated, preference, inside in cases:
        signals = measure(qa.question, chunks, generated, abstain_preference=preference,
                          signals=relevance_signals(qa.question, chunks))
        decision = verdict(signals, Thresholds(), "flag")
        records.append({"id": qa.qid, "in_corpus": inside, "chunks": len(chunks), "context": [c.text for c in chunks],
                        "signals": asdict(signals), **decision_record(decision, qa, [c.text for c in chunks], 1)})
        items.append(Item(None, None, qa))  # type: ignore[arg-type]
    open_run = rescore(records, items, Thresholds(), NEVER_ABSTAIN)
    assert [r["abstained"] for r in open_run] == [False, False, False, False]
    gated = rescore(records, items, Thresholds(relevance_min=0.5), NEVER_ABSTAIN)
    assert [r["reason"] for r in gated] == [None, None, "no_relevant_context", None]
    margin = rescore(records, items, Thresholds(), 1.0)
    assert [r["reason"] for r in margin] == [None, "model_abstained", None, None]
    best = search(records, items, max_abstain_answerable=0.0, grid={**GRID, "confidence_min": [None]})
    summary = best["summary"]
    # answerable questions all answered; the unanswerable and the out-of-corpus ones abstain
    assert summary["abstain_answerable"] == 0.0 and summary["f1"] == 100.0
    assert summary["abstain_unanswerable"] == 100.0 and summary["abstain_out_of_corpus"] == 100.0
    assert 0.5 <= best["abstain_margin"] < 1.5  # between the answerable (0.5) and unanswerable (1.5) preferences
    assert summary["citation_precision"] == 100.0 and summary["citation_valid"] == 100.0
    # the search covers both gate rules: each chosen point is one of the grid's gate configurations
    assert any(replace(g, answerability_min=best["thresholds"].answerability_min,
                       support_min=best["thresholds"].support_min, evidence_min=best["thresholds"].evidence_min,
                       confidence_min=best["thresholds"].confidence_min) == best["thresholds"]
               for g in gate_configurations())
    assert {g.gate_weight is None for g in gate_configurations()} == {True, False}


def test_evaluate_items_scores_what_the_serving_path_returns(tiny_model_dir):
    """Two questions through grounded_generation with a tiny random model: records and summary carry
    every grounding measure, and a question whose article is not indexed counts as out of corpus."""
    from generation.finetune.data import Article, Paragraph
    from generation.finetune.evaluate import evaluate_items, items_of
    from generation.grounding import Thresholds
    from generation.loading import load_generator

    generator = load_generator(str(tiny_model_dir), context_window=512)
    article = Article("Harbor", [Paragraph("The harbor opened in 1852.", [QA("h1", "When did the harbor open?",
                                                                              ("1852",))])])
    other = Article("Orchard", [Paragraph("Cider is pressed in October.", [QA("o1", "When is cider pressed?",
                                                                            ("October",))])])
    items = items_of([article, other])
    summary, records = evaluate_items(generator, items, lambda item: [gold_chunk(article, article.paragraphs[0])],
                                      max_new_tokens=4, timeout_s=None, thresholds=Thresholds(relevance_min=0.5),
                                      in_corpus=lambda item: item.article.title == "Harbor")
    by_id = {r["id"]: r for r in records}
    assert not by_id["h1"]["abstained"] or by_id["h1"]["reason"] in ("unsupported_answer", "model_abstained",
                                                                           "incomplete_answer")
    assert by_id["o1"]["abstained"] and by_id["o1"]["reason"] == "no_relevant_context"  # no shared term: gated
    assert by_id["o1"]["generated"] is None and not by_id["o1"]["in_corpus"]
    assert summary["n"] == 1 and summary["n_out_of_corpus"] == 1 and summary["abstain_out_of_corpus"] == 100.0
    for key in ("citation_valid", "citation_precision", "unsupported_rate", "abstain_reasons"):
        assert key in summary
    assert set(by_id["h1"]["signals"]) >= {"relevance", "dense", "support", "evidence", "abstain_preference"}


def slope_cases():
    """Three questions no gate and no flat margin can sort (see the test below): (qa, chunk, generated,
    first-token preference, in corpus)."""
    from generation.prompt import ContextChunk

    vacation = "Full-time employees get 28 vacation days per calendar year."
    meals = "The daily meal allowance while travelling is 55 euros."
    return [
        # answerable, its context matches closely, yet the model leans to "I don't know." (preference 2)
        (QA("a", "How many vacation days do employees get?", ("28 vacation days",)),
         ContextChunk(vacation, dense_score=0.9), "28 vacation days [1]", 2.0, True),
        # answerable, its context matches weakly; the model answers without doubt
        (QA("b", "What is the per diem?", ("55 euros",)), ContextChunk(meals, dense_score=0.4), "55 euros [1]",
         -3.0, True),
        # out of corpus: a context between the two, a mild lean to "I don't know." (preference 1)
        (QA("c", "What is the capital of France?", ("Paris",)), ContextChunk(meals, dense_score=0.6),
         "55 euros [1]", 1.0, False),
    ]


def test_a_margin_that_grows_with_the_gate_score_sorts_what_a_flat_one_cannot():
    """To keep b the gate must let c through; a flat margin that lets a answer lets c answer too. A margin
    raised by margin_slope per unit of gate score above gate_min abstains on c alone, and the search finds
    it (its vectorized rule agrees with rescore's exact one: the chosen point scores perfectly)."""
    from dataclasses import asdict, replace

    from generation.finetune.calibrate import GRID, search
    from generation.finetune.evaluate import Item, decision_record, rescore
    from generation.grounding import Signals, Thresholds, abstain_margin_for, measure, relevance_signals, verdict

    records, items = [], []
    for qa, chunk, generated, preference, inside in slope_cases():
        signals = measure(qa.question, [chunk], generated, abstain_preference=preference,
                          signals=relevance_signals(qa.question, [chunk]))
        decision = verdict(signals, Thresholds(), "flag")
        records.append({"id": qa.qid, "in_corpus": inside, "chunks": 1, "context": [chunk.text],
                        "signals": asdict(signals), **decision_record(decision, qa, [chunk.text], 1)})
        items.append(Item(None, None, qa))  # type: ignore[arg-type]
    # gate_weight 0: the gate score is the cosine similarity itself
    sloped = Thresholds(gate_weight=0.0, gate_min=0.4, margin_slope=10.0)
    assert [abstain_margin_for(-2.0, Signals(**r["signals"]), sloped) for r in records] == \
        pytest.approx([3.0, -2.0, 0.0])
    assert abstain_margin_for(-2.0, Signals(**records[0]["signals"]), replace(sloped, gate_weight=None)) == -2.0
    assert [r["abstained"] for r in rescore(records, items, sloped, -2.0)] == [False, False, True]
    for margin in (0.5, 1.0, 2.0, 3.0):  # flat: a and c abstain together, or neither does
        flat = [r["abstained"] for r in rescore(records, items, replace(sloped, margin_slope=0.0), margin)]
        assert flat[0] or not flat[2]
    grid = {**GRID, "relevance_min": [0.0], "dense_min": [2.0], "gate_weight": [0.0], "gate_min": [0.3, 0.4, 0.5],
            "evidence_min": [0.0], "support_min": [0.5], "confidence_min": [None]}
    best = search(records, items, max_abstain_answerable=0.0, grid=grid)
    assert best["thresholds"].margin_slope > 0 and best["thresholds"].gate_weight == 0.0
    summary = best["summary"]
    assert summary["abstain_answerable"] == 0.0 and summary["f1"] == 100.0 and summary["abstain_out_of_corpus"] == 100.0
    without = search(records, items, max_abstain_answerable=0.0, grid={**grid, "margin_slope": [0.0]})
    assert without["summary"]["abstain_out_of_corpus"] == 0.0  # flat: c is answered to keep a and b


def test_the_serving_path_raises_the_margin_with_the_gate_score(tiny_model_dir):
    """grounded_generation hands the generator the margin abstain_margin_for gives its context."""
    from generation.grounding import Thresholds
    from generation.loading import load_generator
    from generation.rag import grounded_generation

    generator = load_generator(str(tiny_model_dir), context_window=512)
    generator.abstain_margin = 1.0
    seen: list[float | None] = []
    generate = generator.generate

    def recording(packed, **kwargs):
        seen.append(kwargs.get("abstain_margin"))
        return generate(packed, **kwargs)

    generator.generate = recording  # type: ignore[method-assign]
    qa, chunk, *_ = slope_cases()[0]
    for slope in (0.0, 10.0):
        grounded_generation(generator, qa.question, [chunk], max_new_tokens=2,
                            thresholds=Thresholds(gate_weight=0.0, gate_min=0.4, margin_slope=slope))
    assert seen[0] is None  # no slope: the generator's own margin
    assert seen[1] == pytest.approx(1.0 + 10.0 * 0.5)
