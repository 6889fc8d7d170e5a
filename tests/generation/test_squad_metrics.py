"""SQuAD EM / F1 (official v1.1 normalization) and abstention scoring, against hand-computed cases."""

from __future__ import annotations

import pytest

from generation.finetune.data import QA
from generation.finetune.evaluate import (exact_match_score, f1_score, normalize_answer, sample_items,
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
    record = score_prediction("Paris [2]", qa)
    assert record["em"] == 1.0 and record["f1"] == 1.0 and not record["abstained"]
    partial = score_prediction("in Paris, France [1]", qa)
    assert partial["em"] == 0.0 and partial["f1"] == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    abstained = score_prediction("I don't know.", qa)
    assert abstained["abstained"] and abstained["f1"] == 0.0
    impossible = QA("2", "Why?", (), impossible=True)
    records = [record, partial, abstained, score_prediction("I do not know", impossible),
               score_prediction("Because [1]", impossible)]
    summary = summarize(records)
    assert summary["n"] == 3 and summary["n_unanswerable"] == 2
    assert summary["em"] == pytest.approx(100 / 3, abs=0.01)
    assert summary["abstain_answerable"] == pytest.approx(100 / 3, abs=0.01)
    assert summary["abstain_unanswerable"] == 50.0
    assert summary["em_all"] == pytest.approx(100 * 2 / 5)


def test_limit_sample_is_fixed_and_model_independent() -> None:
    from generation.finetune.evaluate import Item

    items = [Item(None, None, QA(str(i), "q", ("a",))) for i in range(50)]  # type: ignore[arg-type]
    first = sample_items(items, 10, seed=0)
    assert [i.qa.qid for i in first] == [i.qa.qid for i in sample_items(list(reversed(items))[::-1], 10, seed=0)]
    assert len(first) == 10 and [i.qa.qid for i in first] != [i.qa.qid for i in sample_items(items, 10, seed=1)]


def test_abstention_curve_rescores_one_never_abstaining_run():
    from generation.finetune.evaluate import abstention_curve, choose_margin

    def rec(answerable, f1, preference):
        return {"answerable": answerable, "abstained": False, "em": f1, "f1": f1, "abstain_preference": preference}

    records = [rec(True, 1.0, -3.0), rec(True, 0.0, 1.5), rec(False, 0.0, 2.5), rec(False, 0.0, 0.5)]
    curve = {row["margin"]: row for row in abstention_curve(records, [0.0, 1.0, 2.0, 3.0])}
    assert curve[0.0]["abstain_answerable"] == 50.0 and curve[0.0]["abstain_unanswerable"] == 100.0
    assert curve[2.0]["abstain_answerable"] == 0.0 and curve[2.0]["abstain_unanswerable"] == 50.0
    assert curve[3.0]["f1"] == 50.0 and curve[3.0]["f1_all"] == 25.0
    # margin 0 scores best over all questions but abstains on half the answerable ones: the cap rules it out
    assert choose_margin(list(curve.values()), max_abstain_answerable=10.0)["margin"] == 2.0
    assert choose_margin(list(curve.values()), max_abstain_answerable=60.0)["margin"] == 0.0
