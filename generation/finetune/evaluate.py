"""Answer quality on SQuAD-format files: EM / F1 with the official normalization, abstention and citations.

``gold`` mode gives the model the question's own paragraph (as one chunk, titled like the chunker's
chunks); ``retrieval`` mode ingests articles as whole documents (the file's own, or a ``--corpus``) and
lets the service's retriever pick ``top_k`` chunks, as in production. Every answer goes through the
serving path's grounding decision (:func:`generation.rag.grounded_generation`), so what is scored is what
``/query`` would return. Predictions have their ``[n]`` citations stripped before scoring; an abstention
scores as the empty answer.

``em`` / ``f1`` are over the answerable questions whose article is indexed (SQuAD v1.1 scoring). For files
with unanswerable questions, ``em_all`` / ``f1_all`` follow the SQuAD 2.0 convention (an unanswerable
question scores 1 when the model abstains, else 0). Questions whose article is not in the corpus are
*out of corpus*: the right answer is an abstention (``abstain_out_of_corpus``), unless another indexed
article holds the answer too (``out_of_corpus_answered_right``: answered with a gold answer, EM). Citations:
``citation_valid`` is the share of ``[n]`` in returned answers that name a given chunk
(``citation_valid_generated``: the same before verification), ``citation_precision`` the share of answered,
answerable in-corpus questions whose cited chunks hold a gold answer, ``unsupported_rate`` the share of
generated answers that verification did not find supported.
"""

from __future__ import annotations

import random
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from generation.finetune.data import QA, Article, Paragraph, gold_chunk, load_articles
from generation.grounding import (Signals, Thresholds, UnsupportedPolicy, abstain_margin_for, has_relevant_context,
                                  strip_citations, verdict)
from generation.prompt import ABSTAIN_ANSWER, CITATION_RE, ContextChunk

# --- the official SQuAD v1.1 metric ------------------------------------------------------------------
# normalize_answer, f1_score and exact_match_score follow evaluate-v1.1.py of the SQuAD authors
# (https://rajpurkar.github.io/SQuAD-explorer/, "Evaluation Script v1.1"), unchanged in behaviour.


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace."""

    def remove_articles(text: str) -> str:
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def f1_score(prediction: str, ground_truth: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match_score(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def max_over_ground_truths(metric: Callable[[str, str], float], prediction: str, truths: Sequence[str]) -> float:
    return max(metric(prediction, truth) for truth in truths)


# --- questions -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    article: Article
    paragraph: Paragraph
    qa: QA


def items_of(articles: Sequence[Article]) -> list[Item]:
    return [Item(a, p, q) for a in articles for p in a.paragraphs for q in p.qas]


def sample_items(items: Sequence[Item], limit: int | None, seed: int) -> list[Item]:
    """A fixed, seeded sample (by question id, independent of any model), in file order."""
    if limit is None or limit >= len(items):
        return list(items)
    chosen = set(random.Random(seed).sample(sorted(i.qa.qid for i in items), limit))
    return [i for i in items if i.qa.qid in chosen]


# --- scoring -----------------------------------------------------------------------------------------


def score_prediction(text: str, qa: QA, abstained: bool) -> dict[str, Any]:
    prediction = "" if abstained else strip_citations(text)
    record: dict[str, Any] = {"id": qa.qid, "question": qa.question, "prediction": text,
                              "abstained": abstained, "answerable": not qa.impossible}
    if qa.impossible:
        record["em"] = record["f1"] = float(abstained)
    else:
        record["em"] = max_over_ground_truths(exact_match_score, prediction, qa.answers)
        record["f1"] = max_over_ground_truths(f1_score, prediction, qa.answers)
        record["answers"] = list(qa.answers)
    return record


def _mean(values: Sequence[float]) -> float | None:
    return round(100 * sum(values) / len(values), 2) if values else None


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    inside = [r for r in records if r.get("in_corpus", True)]
    outside = [r for r in records if not r.get("in_corpus", True)]
    answerable = [r for r in inside if r["answerable"]]
    unanswerable = [r for r in inside if not r["answerable"]]
    generated = [r for r in records if r.get("generated") is not None and r.get("reason") != "model_abstained"]
    answered = [r for r in answerable if not r["abstained"]]
    refs = sum(r.get("refs", 0) for r in records)
    refs_generated = sum(r.get("refs_generated", 0) for r in records)
    report = {
        "em": _mean([r["em"] for r in answerable]),
        "f1": _mean([r["f1"] for r in answerable]),
        "f1_answered": _mean([r["f1"] for r in answered]),  # answerable questions not abstained on
        "n": len(answerable),
        "n_unanswerable": len(unanswerable),
        "n_out_of_corpus": len(outside),
        "abstain_unanswerable": _mean([float(r["abstained"]) for r in unanswerable]),
        "abstain_answerable": _mean([float(r["abstained"]) for r in answerable]),
        "abstain_out_of_corpus": _mean([float(r["abstained"]) for r in outside]),
        # out-of-corpus questions answered with their gold answer (EM): another indexed article held it after all
        "out_of_corpus_answered_right": _mean([float(not r["abstained"] and r.get("em") == 1.0) for r in outside]),
        "citation_valid": round(100 * sum(r.get("refs_valid", 0) for r in records) / refs, 2) if refs else None,
        "citation_valid_generated": (round(100 * sum(r.get("refs_generated_valid", 0) for r in records)
                                           / refs_generated, 2) if refs_generated else None),
        "citation_precision": _mean([float(r.get("cited_holds_answer", False)) for r in answered]),
        "unsupported_rate": _mean([float(not r.get("grounded", False)) for r in generated]),
        "abstain_reasons": dict(Counter(r.get("reason") for r in records if r["abstained"])),
    }
    if unanswerable:
        report["em_all"] = _mean([r["em"] for r in inside])
        report["f1_all"] = _mean([r["f1"] for r in inside])
    return report


# --- runs ---------------------------------------------------------------------------------------


Contexts = Callable[[Item], list[ContextChunk]]


def gold_contexts(item: Item) -> list[ContextChunk]:
    return [gold_chunk(item.article, item.paragraph)]


def scored_gold_contexts(embedder: Any) -> Contexts:
    """Gold contexts with the cosine similarity dense retrieval would have given the paragraph (the gate
    uses it), from the service's embedder (query and passage prefixes applied, unit vectors)."""
    def contexts(item: Item) -> list[ContextChunk]:
        chunk = gold_chunk(item.article, item.paragraph)
        question = embedder.embed_queries([item.qa.question])[0]
        passage = embedder.embed_passages([chunk.text])[0]
        return [replace(chunk, dense_score=float(question @ passage))]
    return contexts


def retrieval_contexts(retrieve: Callable[[str, int], list[ContextChunk]], top_k: int) -> Contexts:
    return lambda item: retrieve(item.qa.question, top_k)


def evaluate_items(generator: Any, items: Sequence[Item], contexts: Contexts, *, max_new_tokens: int,
                   timeout_s: float | None, desc: str = "generate", abstain_margin: float | None = None,
                   thresholds: Thresholds | None = None, unsupported: UnsupportedPolicy = "abstain",
                   in_corpus: Callable[[Item], bool] = lambda item: True, scorer: Any = None,
                   term_weights: Any = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Answer every item through the serving path (retrieve, gate, generate, verify) and score it.

    Returns (summary, per-question records). ``abstain_margin`` and ``thresholds`` override the
    generator's calibrated ones; each record keeps the grounding signals, so other thresholds can be
    scored without generating again (:func:`rescore`). ``term_weights``: the index's idf, as serving uses.
    """
    from generation.rag import grounded_generation

    records = []
    started = time.perf_counter()
    with tqdm(items, desc=desc, unit="q") as bar:
        for item in bar:
            out = grounded_generation(generator, item.qa.question, contexts(item), max_new_tokens=max_new_tokens,
                                      timeout_s=timeout_s, unsupported=unsupported, thresholds=thresholds,
                                      abstain_margin=abstain_margin, scorer=scorer, term_weights=term_weights)
            record: dict[str, Any] = {"in_corpus": in_corpus(item), "prompt_tokens": out.packed.n_tokens,
                      "chunks": len(out.packed.chunks), "context": [c.text for c in out.packed.chunks],
                      "gold_in_context": _holds_answer([c.text for c in out.packed.chunks], item.qa),
                      "seconds": round(out.result.elapsed_s, 2) if out.result else 0.0,
                      "abstain_preference": out.decision.signals.abstain_preference,
                      "signals": asdict(out.decision.signals)}
            record.update(decision_record(out.decision, item.qa, record["context"], len(out.packed.chunks)))
            records.append(record)
            summary = summarize(records)
            bar.set_postfix(f1=summary["f1"], em=summary["em"])
    summary = summarize(records)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["mean_prompt_tokens"] = round(sum(r["prompt_tokens"] for r in records) / max(len(records), 1), 1)
    answerable = [r for r in records if r["answerable"] and r["in_corpus"]]
    if answerable:
        summary["answer_in_context"] = round(100 * sum(r["gold_in_context"] for r in answerable) / len(answerable), 2)
    return summary, records


def decision_record(decision: Any, qa: QA, context: Sequence[str], n_chunks: int) -> dict[str, Any]:
    """The scored fields of one question's decision (see :func:`summarize`)."""
    record = score_prediction(decision.answer, qa, decision.abstained)
    returned = _refs(decision.answer)
    generated = _refs(decision.generated or "")
    record.update(
        generated=decision.generated, reason=decision.abstain_reason, grounded=decision.grounded,
        grounding_score=decision.grounding_score, cited=list(decision.cited), repair=decision.citation_repair,
        refs=len(returned), refs_valid=sum(1 <= ref <= n_chunks for ref in returned),
        refs_generated=len(generated), refs_generated_valid=sum(1 <= ref <= n_chunks for ref in generated),
        cited_holds_answer=_holds_answer([context[ref - 1] for ref in decision.cited if 1 <= ref <= len(context)],
                                         qa),
    )
    return record


def _refs(text: str) -> list[int]:
    return [int(part) for match in CITATION_RE.finditer(text) for part in match.group(1).split(",")]


def rescore(records: Sequence[dict[str, Any]], items: Sequence[Item], thresholds: Thresholds, margin: float,
            unsupported: UnsupportedPolicy = "abstain") -> list[dict[str, Any]]:
    """The records as the service would have answered with ``thresholds`` and abstention ``margin``.

    Exact for records of a run that gated nothing and never abstained (``NEVER_ABSTAIN``, open
    thresholds): greedy decoding abstains exactly when the first-token preference exceeds the margin, and
    otherwise writes the answer recorded in that run.
    """
    by_id = {item.qa.qid: item for item in items}
    out = []
    for record in records:
        signals = Signals(**record["signals"])
        if not has_relevant_context(signals, thresholds):
            signals = replace(signals, generated=None)
        elif (signals.abstain_preference is not None
              and signals.abstain_preference > abstain_margin_for(margin, signals, thresholds)):
            signals = replace(signals, generated=ABSTAIN_ANSWER)
        decision = verdict(signals, thresholds, unsupported)
        fields = decision_record(decision, by_id[record["id"]].qa, record["context"], record["chunks"])
        out.append({**record, **fields})
    return out


def _holds_answer(texts: Sequence[str], qa: QA) -> bool:
    """Some text holds a gold answer (case-insensitive)."""
    bodies = [t.lower() for t in texts]
    return any(a.lower() in body for a in qa.answers for body in bodies)


def load_eval_items(path: Path, limit: int | None, seed: int) -> tuple[list[Article], list[Item]]:
    articles = load_articles([path])
    return articles, sample_items(items_of(articles), limit, seed)
