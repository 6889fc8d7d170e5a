"""Grounded or silent: is the context relevant, does the answer come from it, and do its citations hold?

Serving and evaluation take the same decision (:func:`verdict`) from the same signals (:class:`Signals`):

- **relevance** (before generation), per chunk: the share of the question's content terms (lower-cased,
  stemmed, stop words and question words removed) that occur in the chunk, each weighted by its idf in
  the live BM25 index, and the raw cosine similarity of question and chunk from dense retrieval. When no chunk
  reaches the thresholds the generator is not run at all (``no_relevant_context``).
- **support** (after generation), per chunk: the share of the answer's words (SQuAD normalization) found
  in the chunk; 1.0 when the answer occurs in it verbatim.
- **evidence**, per supporting chunk: the share of the question's content terms that are not part of the
  answer and occur in the sentence holding the answer. A span copied from a sentence
  about something else ("Laptops are provided by the IT team" for "Who approves expense reports over
  500 euros?") is supported but has no evidence.
- **answerability** (before generation, when a reranker is configured), per chunk: the probability that
  the chunk answers the question, from the project's own cross-encoder (retrieval/cross_encoder.py): the
  reranking stage's score carried on the chunk, or scored here for chunks given without one.
- **confidence**: the mean log-probability of the answer's tokens under the generator.
- **abstention preference** (during generation): how much the generator prefers to start "I don't know."
  over any other first token. It abstains when that exceeds the adapter's margin; with ``margin_slope``
  the margin grows with the gate score (:func:`abstain_margin_for`), so a question whose context barely
  passed the gate is dropped on a weaker preference than one whose context matches it closely.

An answer is *grounded* when a chunk it cites supports it with enough evidence and the generator was
confident enough; its grounding score is ``support * evidence`` of its best cited chunk. Citations
``[n]`` that name no given chunk are removed from the text and counted. An answer without any citation
gets the best supporting chunk attached when one qualifies. Thresholds are calibrated per adapter on
held-out questions (``rag adapters calibrate``) and stored in its metadata under ``grounding``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from typing import Any, Literal

import Stemmer

from generation.prompt import ABSTAIN_ANSWER, CITATION_RE, ContextChunk, is_abstention

AbstainReason = Literal["no_relevant_context", "model_abstained", "unsupported_answer", "empty_answer",
                        "incomplete_answer"]
UnsupportedPolicy = Literal["abstain", "flag"]
CitationRepair = Literal["attached", "corrected"]

# Function words of questions and answers: never evidence that a passage is about the question.
STOP_WORDS = frozenset("""
a an and are as at be been being but by can could did do does doing for from had has have having he her
hers him his how i if in into is it its itself many may me might much must my no nor not of on or our
ours she should so some such than that the their theirs them then there these they this those to too
us was we were what when where which while who whom whose why will with would you your yours also
about after again against all any before below between both down during each few further here just
more most off once only other out over own same under until up very s t
""".split())
_WORD = re.compile(r"[a-z0-9]+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = re.compile(r"[^\w\s]")


@dataclass(frozen=True)
class Thresholds:
    """Where each signal turns an answer into an abstention (see module doc); 0 disables a check."""

    relevance_min: float = 0.0  # share of the question's (idf-weighted) terms a chunk must hold to pass the gate
    dense_min: float = 2.0  # cosine similarity that lets a chunk through without relevance_min (2: never)
    gate_weight: float | None = None  # set: the blended gate replaces relevance_min / dense_min (module doc)
    gate_min: float = 0.0  # what the blend of relevance and cosine similarity must reach, with gate_weight
    answerability_min: float = 0.0  # best chunk's cross-encoder probability of answering, below which likewise
    evidence_min: float = 0.0  # question terms around the answer in the cited chunk
    support_min: float = 0.5  # answer words found in the cited chunk
    confidence_min: float | None = None  # mean token log-probability of the answer (None: no check)
    # with gate_weight: logits added to the abstention margin per unit of gate score above gate_min, so the
    # generator's own "I don't know." decides where retrieval is weak and is overruled where it is strong
    margin_slope: float = 0.0

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any] | None) -> "Thresholds":
        stored = (metadata or {}).get("grounding", {}).get("thresholds", {})
        known = {k: v for k, v in stored.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Decision:
    """What the service returns for one question (see :func:`verdict`)."""

    answer: str  # the answer as returned: ABSTAIN_ANSWER when abstained
    abstained: bool
    abstain_reason: AbstainReason | None
    grounded: bool
    grounding_score: float  # support * evidence of the best cited chunk, 0 when none
    cited: list[int]  # refs (1-based) the returned answer cites
    signals: "Signals"  # what the decision was taken on
    # "attached": the answer cited nothing, its supporting chunk was cited; "corrected": citations that
    # did not support the answer were dropped (and the supporting chunk cited)
    citation_repair: CitationRepair | None = None

    # the signals' per-chunk lists are in ref order
    @property
    def generated(self) -> str | None:  # the generator's own text (None when it was not run)
        return self.signals.generated

    @property
    def removed_citations(self) -> int:  # [n] in the generated text that named no given chunk
        return self.signals.removed_citations

    @property
    def relevance(self) -> list[float]:
        return self.signals.relevance

    @property
    def answerability(self) -> list[float | None]:
        return self.signals.answerability or [None] * len(self.signals.relevance)

    @property
    def support(self) -> list[float]:
        return self.signals.support

    @property
    def evidence(self) -> list[float]:
        return self.signals.evidence

    @property
    def confidence(self) -> float | None:
        return self.signals.confidence


# --- text signals ---------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _stemmer() -> Stemmer.Stemmer:
    return Stemmer.Stemmer("english")


def content_terms(text: str) -> list[str]:
    """Lower-cased, stemmed words of ``text`` without stop words, in order (duplicates kept)."""
    words = [w for w in _WORD.findall(text.lower().replace("\u2019", "'")) if w not in STOP_WORDS]
    stemmed: list[str] = _stemmer().stemWords(words)
    return stemmed


def normalize_words(text: str) -> list[str]:
    """SQuAD's answer normalization as a word list: lower case, no punctuation, no articles."""
    return _ARTICLES.sub(" ", _PUNCTUATION.sub(" ", text.lower())).split()


TermWeights = Callable[[Sequence[str]], list[float]]  # stemmed terms -> weights (the index's BM25 idf)


def relevance(question: str, chunk_text: str, term_weights: TermWeights | None = None) -> float:
    """Share of the question's distinct content terms that occur in the chunk, each term weighted by
    ``term_weights`` (the index's idf: a rare name counts for more than "year"); 0 when it has none."""
    return _weighted_share(_weighted_terms(question, term_weights), chunk_text)


def _weighted_terms(question: str, term_weights: TermWeights | None) -> dict[str, float]:
    wanted = sorted(set(content_terms(question)))
    weights = term_weights(wanted) if term_weights is not None and wanted else [1.0] * len(wanted)
    return dict(zip(wanted, weights))


def _weighted_share(weighted: dict[str, float], chunk_text: str) -> float:
    total = sum(weighted.values())
    if total <= 0:
        return 0.0
    present = set(content_terms(chunk_text))
    return sum(w for term, w in weighted.items() if term in present) / total


def support(answer: str, chunk_text: str) -> float:
    """Share of the answer's normalized words that occur in the chunk; 1.0 for a verbatim occurrence."""
    words = normalize_words(answer)
    if not words:
        return 0.0
    body = normalize_words(chunk_text)
    if _contains(body, words):
        return 1.0
    present = set(body)
    return sum(w in present for w in words) / len(words)


def evidence(question: str, answer: str, chunk_text: str) -> float:
    """Share of the question's content terms (the answer's own words excluded) in the sentence of the
    chunk that holds the answer (the best one when several do; with its neighbours the signal separated
    answerable from unanswerable questions less well). 1.0 when the question has no term beyond the
    answer's; 0 when the answer is not in the chunk."""
    from ingestion.chunker import split_sentences

    answer_terms = set(content_terms(answer))
    wanted = set(content_terms(question)) - answer_terms
    sentences = split_sentences(" ".join(chunk_text.split())) or [chunk_text]
    answer_words = normalize_words(answer)
    holding = [i for i, s in enumerate(sentences) if answer_words and _contains(normalize_words(s), answer_words)]
    if not holding:  # not verbatim: the sentence sharing most of the answer's words
        scored = [(len(set(normalize_words(s)) & set(answer_words)), i) for i, s in enumerate(sentences)]
        best = max(scored, default=(0, 0))
        if best[0] == 0:
            return 0.0
        holding = [best[1]]
    if not wanted:
        return 1.0
    return max(len(wanted & set(content_terms(sentences[i]))) / len(wanted) for i in holding)


def _contains(body: Sequence[str], words: Sequence[str]) -> bool:
    n = len(words)
    return any(list(body[i:i + n]) == list(words) for i in range(len(body) - n + 1))


# --- citations ------------------------------------------------------------------------------------


def clean_citations(text: str, n_chunks: int) -> tuple[str, list[int], int]:
    """(text without citations that name no given chunk, cited refs in first-seen order, removed count)."""
    cited: list[int] = []
    removed = 0

    def keep(match: re.Match[str]) -> str:
        nonlocal removed
        refs = []
        for part in match.group(1).split(","):
            ref = int(part)
            if 1 <= ref <= n_chunks:
                refs.append(ref)
                if ref not in cited:
                    cited.append(ref)
            else:
                removed += 1
        return f"[{', '.join(map(str, refs))}]" if refs else ""

    cleaned = " ".join(CITATION_RE.sub(keep, text).split())
    cleaned = re.sub(r"\s+([.,;:!?])", r"\1", cleaned)
    return cleaned, cited, removed


def strip_citations(text: str) -> str:
    """The answer without its ``[n]`` citations, whitespace collapsed (for support checks and EM / F1)."""
    return " ".join(CITATION_RE.sub(" ", text).split())


# --- the decision -----------------------------------------------------------------------------------


@dataclass
class Signals:
    """Everything measured about one question's context and answer; thresholds are applied by :func:`verdict`."""

    relevance: list[float]  # per given chunk, in ref order
    dense: list[float | None]  # per given chunk: raw cosine similarity (None: dense retrieval did not see it)
    answerability: list[float | None] = field(default_factory=list)  # per given chunk (None: no cross-encoder)
    generated: str | None = None  # the generator's text; None when it was not run
    text: str = ""  # generated, citations naming no given chunk removed
    cited: list[int] = field(default_factory=list)
    removed_citations: int = 0
    support: list[float] = field(default_factory=list)
    evidence: list[float] = field(default_factory=list)
    confidence: float | None = None
    abstain_preference: float | None = None
    finish_reason: str = "stop"  # the generator's: only "stop" is a complete answer


def relevance_signals(question: str, chunks: Sequence[ContextChunk], scorer: Any = None,
                      term_weights: TermWeights | None = None) -> Signals:
    """The pre-generation signals; answerability is the chunks' ``rerank_score`` when they all carry one,
    else ``scorer``'s (retrieval.cross_encoder.CrossEncoderReranker) when given; ``term_weights``
    (``BM25Index.idf``) weights the question's terms in ``relevance``."""
    answerability: list[float | None] = [c.rerank_score for c in chunks]
    if scorer is not None and chunks and any(a is None for a in answerability):
        answerability = [round(p, 4) for p in scorer.score(question, [c.text for c in chunks])]
    weighted = _weighted_terms(question, term_weights)
    return Signals(relevance=[round(_weighted_share(weighted, c.text), 4) for c in chunks],
                   dense=[None if c.dense_score is None else round(c.dense_score, 4) for c in chunks],
                   answerability=answerability)


def has_relevant_context(signals: Signals, thresholds: Thresholds) -> bool:
    """True when some chunk matches the question (the generator should run): it holds enough of the
    question's terms *or* is close enough to it in embedding space (a question worded unlike its document
    still gets through; requiring both refused 15% of answerable questions given their own paragraph) or,
    with ``gate_weight``, their blend reaches ``gate_min``; and it passes the cross-encoder's threshold when
    there is one. A chunk dense retrieval did not score cannot pass by similarity alone; a chunk without a
    cross-encoder score passes that threshold.
    """
    answerability = signals.answerability or [None] * len(signals.relevance)
    if thresholds.gate_weight is not None:
        w = thresholds.gate_weight
        topical = [blend(w, rel, dense) >= thresholds.gate_min for rel, dense in zip(signals.relevance, signals.dense)]
    else:
        topical = [matches(rel >= thresholds.relevance_min, dense is not None and dense >= thresholds.dense_min)
                   for rel, dense in zip(signals.relevance, signals.dense)]
    return any(passes and (answer is None or answer >= thresholds.answerability_min)
               for passes, answer in zip(topical, answerability))


def gate_score(signals: Signals, thresholds: Thresholds) -> float | None:
    """The best chunk's blended gate score (None without a blended gate or without chunks)."""
    if thresholds.gate_weight is None or not signals.relevance:
        return None
    return float(max(blend(thresholds.gate_weight, rel, dense) for rel, dense in zip(signals.relevance, signals.dense)))


def abstain_margin_for(margin: float, signals: Signals, thresholds: Thresholds) -> float:
    """The abstention margin for this context: ``margin`` plus ``margin_slope`` per unit of the best chunk's
    gate score above ``gate_min`` (a context below it does not reach the generator)."""
    score = gate_score(signals, thresholds)
    if not thresholds.margin_slope or score is None:
        return margin
    return margin + thresholds.margin_slope * max(score - thresholds.gate_min, 0.0)


def blend(weight: Any, relevance: Any, dense: Any) -> Any:
    """The blended gate score (floats or NumPy arrays); a chunk dense retrieval did not score counts 0."""
    return weight * relevance + (1 - weight) * (0.0 if dense is None else dense)


def matches(lexical: Any, dense: Any) -> Any:
    """The gate's rule on the two match tests (bools or NumPy arrays of them): either suffices."""
    return lexical | dense


def measure(question: str, chunks: Sequence[ContextChunk], generated: str, *, confidence: float | None = None,
            abstain_preference: float | None = None, finish_reason: str = "stop",
            signals: Signals | None = None) -> Signals:
    """Add the answer's signals (citations, support, evidence) to the context's ``signals``."""
    base = signals or relevance_signals(question, chunks)
    text, cited, removed = clean_citations(generated, len(chunks))
    span = strip_citations(text)
    sup = [round(support(span, c.text), 4) for c in chunks]
    # evidence is looked for only where the answer is (mostly) present: SUPPORT_FOR_EVIDENCE
    evi = [round(evidence(question, span, c.text), 4) if s >= SUPPORT_FOR_EVIDENCE else 0.0
           for c, s in zip(chunks, sup)]
    return replace(base, generated=generated, text=text, cited=cited, removed_citations=removed, support=sup,
                   evidence=evi, confidence=confidence, abstain_preference=abstain_preference,
                   finish_reason=finish_reason)


SUPPORT_FOR_EVIDENCE = 0.5


def verdict(signals: Signals, thresholds: Thresholds, unsupported: UnsupportedPolicy = "abstain") -> Decision:
    """The answer to return, from measured ``signals`` (``[n]`` is the n-th given chunk)."""

    def abstain(reason: AbstainReason) -> Decision:
        return Decision(answer=ABSTAIN_ANSWER, abstained=True, abstain_reason=reason, grounded=False,
                        grounding_score=0.0, cited=[], signals=signals)

    if signals.generated is None or not signals.relevance:
        return abstain("no_relevant_context")
    if is_abstention(signals.generated):
        reason: AbstainReason = "model_abstained" if signals.generated.strip() else "empty_answer"
        return abstain(reason)

    score_of = [s * e for s, e in zip(signals.support, signals.evidence)]

    def qualifies(ref: int) -> bool:
        return (signals.support[ref - 1] >= max(thresholds.support_min, 1e-9)
                and signals.evidence[ref - 1] >= thresholds.evidence_min)

    # Citations that do not support the answer are dropped; when none is left, the best supporting
    # chunk (support and evidence both qualifying) is cited instead: "attached" for an answer that cited
    # nothing, "corrected" for one that cited the wrong chunk.
    span = strip_citations(signals.text)
    cited = [ref for ref in signals.cited if qualifies(ref)]
    repair: CitationRepair | None = None
    if not cited:
        candidates = [ref for ref in range(1, len(signals.support) + 1) if qualifies(ref)]
        if candidates:
            cited = [max(candidates, key=lambda ref: (score_of[ref - 1], -ref))]
            repair = "corrected" if signals.cited else "attached"
    elif cited != signals.cited:
        repair = "corrected"
    text = signals.text if repair is None else f"{span} {''.join(f'[{ref}]' for ref in cited)}"
    confident = (thresholds.confidence_min is None or signals.confidence is None
                 or signals.confidence >= thresholds.confidence_min)
    # an answer cut off by the token limit, the deadline or a cancellation is never returned as grounded
    complete = signals.finish_reason == "stop"
    grounded = bool(cited) and confident and bool(span) and complete
    if not grounded and unsupported == "abstain":
        reason = "unsupported_answer" if complete else "incomplete_answer"
        return abstain(reason)
    if not cited:  # flagged: keep what the model cited, verified or not
        text, cited = signals.text, list(signals.cited)
    score = round(max((score_of[ref - 1] for ref in cited), default=0.0), 4)
    return Decision(answer=text, abstained=False, abstain_reason=None, grounded=grounded, grounding_score=score,
                    cited=cited, citation_repair=repair, signals=signals)
