"""Grounding verification with hand-written answers: supported, unsupported, wrong chunk, invalid refs, no refs."""

from dataclasses import replace

import pytest

from generation.grounding import (Signals, Thresholds, clean_citations, evidence, has_relevant_context, measure,
                                  relevance, relevance_signals, support, verdict)
from generation.prompt import ABSTAIN_ANSWER, ContextChunk

EXPENSES = ContextChunk(
    "Expense Policy > Equipment\nEach employee may spend up to 400 euros per year on home-office equipment such as "
    "chairs, monitors and keyboards. Laptops are provided by the IT team and are not bought through expenses.",
    chunk_id="c-exp", dense_score=0.41)
VACATION = ContextChunk(
    "Vacation and Leave > Vacation days\nFull-time employees get 28 vacation days per calendar year. "
    "Unused days may be carried over until the end of March.", chunk_id="c-vac", dense_score=0.63)
TRAVEL = ContextChunk(
    "Expense Policy > Travel\nThe daily meal allowance while travelling is 55 euros. Alcohol is never reimbursed.",
    chunk_id="c-trv", dense_score=0.35)
CHUNKS = [EXPENSES, VACATION, TRAVEL]
THRESHOLDS = Thresholds(relevance_min=0.2, support_min=0.5, evidence_min=0.4)
VACATION_Q = "How many vacation days do full-time employees get per year?"


def decide(question, generated, thresholds=THRESHOLDS, unsupported="abstain", chunks=CHUNKS, confidence=None):
    return verdict(measure(question, chunks, generated, confidence=confidence), thresholds, unsupported)


def test_supported_answer_with_its_citation_is_grounded():
    decision = decide(VACATION_Q, "28 vacation days [2]")
    assert not decision.abstained and decision.grounded
    assert decision.answer == "28 vacation days [2]" and decision.cited == [2]
    assert decision.support[1] == 1.0 and decision.evidence[1] >= 0.5
    assert decision.grounding_score == pytest.approx(decision.support[1] * decision.evidence[1])
    assert decision.citation_repair is None and decision.removed_citations == 0


def test_answer_absent_from_its_cited_chunk_abstains_as_unsupported():
    decision = decide("What is the capital of France?", "Paris [3]", thresholds=Thresholds())
    assert decision.abstained and decision.abstain_reason == "unsupported_answer"
    assert decision.answer == ABSTAIN_ANSWER and decision.cited == [] and not decision.grounded
    assert decision.generated == "Paris [3]"


def test_supported_span_from_a_sentence_about_something_else_has_no_evidence():
    # the demo's case: "IT team" is in the chunk, but not in a sentence about approving expense reports
    decision = decide("Who approves expense reports over 500 euros?", "IT team [1]")
    assert decision.support[0] == 1.0
    assert decision.evidence[0] < THRESHOLDS.evidence_min
    assert decision.abstained and decision.abstain_reason == "unsupported_answer"


@pytest.mark.parametrize("finish_reason", ["length", "timeout", "cancelled"])
def test_a_cut_off_answer_is_never_grounded(finish_reason):
    """Old main returned a timed-out generation ("2") as the answer; only a complete one can be grounded."""
    signals = measure(VACATION_Q, CHUNKS, "28 vacation days [2]", finish_reason=finish_reason)
    decision = verdict(signals, THRESHOLDS)
    assert decision.abstained and decision.abstain_reason == "incomplete_answer" and not decision.grounded
    flagged = verdict(signals, THRESHOLDS, "flag")
    assert not flagged.abstained and not flagged.grounded and flagged.answer == "28 vacation days [2]"
    assert verdict(measure(VACATION_Q, CHUNKS, "28 vacation days [2]", finish_reason="stop"), THRESHOLDS).grounded


def test_flag_policy_returns_the_unsupported_answer_marked_not_grounded():
    decision = decide("What is the capital of France?", "Paris [3]", thresholds=Thresholds(), unsupported="flag")
    assert not decision.abstained and not decision.grounded
    assert decision.answer == "Paris [3]" and decision.cited == [3] and decision.grounding_score == 0.0


def test_correct_answer_citing_the_wrong_chunk_is_not_grounded_by_that_chunk():
    decision = decide(VACATION_Q, "28 vacation days [1]")
    # the wrong citation is dropped and the chunk that does support the answer is cited instead
    assert decision.grounded and decision.cited == [2] and decision.citation_repair == "corrected"
    assert decision.answer == "28 vacation days [2]"
    # with the supporting chunk not given, the same answer is unsupported
    alone = decide(VACATION_Q, "28 vacation days [1]", chunks=[EXPENSES, TRAVEL])
    assert alone.abstained and alone.abstain_reason == "unsupported_answer"


def test_invalid_refs_are_removed_and_counted():
    decision = decide(VACATION_Q, "28 vacation days [2] [7] [0, 2]")
    assert decision.removed_citations == 2
    assert decision.cited == [2] and decision.grounded
    assert "[7]" not in decision.answer and "[0" not in decision.answer
    text, cited, removed = clean_citations("x [4] y [1, 9]", 3)
    assert (text, cited, removed) == ("x y [1]", [1], 2)


def test_uncited_answer_gets_its_supporting_chunk_attached_or_abstains():
    attached = decide(VACATION_Q, "28 vacation days")
    assert attached.grounded and attached.cited == [2] and attached.citation_repair == "attached"
    assert attached.answer == "28 vacation days [2]"
    nowhere = decide(VACATION_Q, "35 days")
    assert nowhere.abstained and nowhere.abstain_reason == "unsupported_answer"


def test_model_abstention_is_reported_as_such():
    decision = decide(VACATION_Q, "I don't know.")
    assert decision.abstained and decision.abstain_reason == "model_abstained" and decision.cited == []


def test_low_confidence_answer_is_unsupported():
    th = Thresholds(support_min=0.5, confidence_min=-0.5)
    assert decide(VACATION_Q, "28 vacation days [2]", thresholds=th, confidence=-0.2).grounded
    weak = decide(VACATION_Q, "28 vacation days [2]", thresholds=th, confidence=-1.3)
    assert weak.abstained and weak.abstain_reason == "unsupported_answer"


def test_blended_gate_draws_a_straight_boundary_between_the_two_signals():
    """With gate_weight, a chunk passes on w * relevance + (1 - w) * cosine >= gate_min: two middling signals
    together pass where the either-signal rule needs one of them high, and one high signal alone may not."""
    middling = Signals(relevance=[0.35], dense=[0.45])
    lopsided = Signals(relevance=[0.6], dense=[0.05])
    either = Thresholds(relevance_min=0.5, dense_min=0.5)
    blended = Thresholds(gate_weight=0.5, gate_min=0.38)
    assert not has_relevant_context(middling, either) and has_relevant_context(lopsided, either)
    assert has_relevant_context(middling, blended) and not has_relevant_context(lopsided, blended)
    # relevance_min / dense_min are not consulted by the blended rule; an unscored chunk counts cosine 0
    assert has_relevant_context(Signals(relevance=[0.8], dense=[None]), replace(blended, relevance_min=1.0))
    assert not has_relevant_context(Signals(relevance=[0.7], dense=[None]), blended)
    assert Thresholds.from_metadata({"grounding": {"thresholds": blended.as_dict()}}) == blended


def test_relevance_gate_before_generation():
    strict = Thresholds(relevance_min=0.5)
    off_topic = relevance_signals("What is the capital of France?", CHUNKS)
    assert max(off_topic.relevance) == 0.0 and not has_relevant_context(off_topic, strict)
    on_topic = relevance_signals(VACATION_Q, CHUNKS)
    assert has_relevant_context(on_topic, strict)
    # either test lets a chunk through: enough of the question's terms, or close enough in embedding space
    assert not has_relevant_context(on_topic, Thresholds(relevance_min=1.01, dense_min=0.9))
    assert has_relevant_context(on_topic, Thresholds(relevance_min=1.01, dense_min=0.6))  # VACATION: 0.63
    paraphrase = relevance_signals("How much leave does the staff receive annually?", CHUNKS)  # few shared terms
    assert max(paraphrase.relevance) < 0.5 and has_relevant_context(paraphrase, Thresholds(relevance_min=0.5,
                                                                                           dense_min=0.6))
    # a BM25-only hit: no dense score
    unscored = relevance_signals("How much leave does the staff receive annually?", [ContextChunk(VACATION.text)])
    assert not has_relevant_context(unscored, Thresholds(relevance_min=0.5, dense_min=0.6))
    gated = verdict(off_topic, strict)
    assert gated.abstained and gated.abstain_reason == "no_relevant_context" and gated.generated is None


def test_signals():
    assert relevance("How many vacation days?", VACATION.text) == 1.0
    assert relevance("Who won the 2018 FIFA World Cup?", VACATION.text) == 0.0
    assert support("28 vacation days", VACATION.text) == 1.0
    assert support("the IT team", EXPENSES.text) == 1.0  # SQuAD normalization: articles dropped
    assert support("35 days", VACATION.text) == 0.5
    assert support("", VACATION.text) == 0.0
    assert evidence("How much is the daily meal allowance?", "55 euros", TRAVEL.text) == 1.0
    assert evidence("How much is the daily meal allowance?", "Paris", TRAVEL.text) == 0.0


def test_relevance_weighs_rare_terms_by_idf():
    weights = {"vacat": 3.0, "day": 0.5, "employe": 0.5, "year": 0.5}
    idf = lambda terms: [weights.get(t, 1.0) for t in terms]  # noqa: E731
    text = "Employees get 28 days off per year."  # holds every term but the rare one
    # terms: vacat, day, employe, get, per, year; all but "vacat" are in the text
    assert relevance("How many vacation days do employees get per year?", text) == pytest.approx(5 / 6)
    assert relevance("How many vacation days do employees get per year?", text, idf) == pytest.approx(3.5 / 6.5)
