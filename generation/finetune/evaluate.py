"""Answer quality on SQuAD-format files: EM / F1 with the official normalization, and abstention rates.

``gold`` mode gives the model the question's own paragraph (as one chunk, titled like the chunker's
chunks); ``retrieval`` mode ingests the file's articles as whole documents and lets the service's retriever
pick ``top_k`` chunks, as in production. Predictions have their ``[n]`` citations stripped before scoring;
an abstention (:func:`generation.prompt.is_abstention`) scores as the empty answer.

``em`` / ``f1`` are over the answerable questions (SQuAD v1.1 scoring). For files with unanswerable
questions, ``em_all`` / ``f1_all`` follow the SQuAD 2.0 convention (an unanswerable question scores 1
when the model abstains, else 0).
"""

from __future__ import annotations

import random
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from generation.finetune.data import QA, Article, Paragraph, gold_chunk, load_articles
from generation.generate import generate_answer, strip_citations
from generation.prompt import ContextChunk, is_abstention, pack_prompt

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


def score_prediction(text: str, qa: QA) -> dict[str, Any]:
    abstained = is_abstention(text)
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


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    answerable = [r for r in records if r["answerable"]]
    unanswerable = [r for r in records if not r["answerable"]]

    def mean(values: list[float]) -> float | None:
        return round(100 * sum(values) / len(values), 2) if values else None

    report = {
        "em": mean([r["em"] for r in answerable]),
        "f1": mean([r["f1"] for r in answerable]),
        "n": len(answerable),
        "n_unanswerable": len(unanswerable),
        "abstain_unanswerable": mean([float(r["abstained"]) for r in unanswerable]),
        "abstain_answerable": mean([float(r["abstained"]) for r in answerable]),
    }
    if unanswerable:
        report["em_all"] = mean([r["em"] for r in records])
        report["f1_all"] = mean([r["f1"] for r in records])
    return report


# --- runs ---------------------------------------------------------------------------------------


Contexts = Callable[[Item], list[ContextChunk]]


def gold_contexts(item: Item) -> list[ContextChunk]:
    return [gold_chunk(item.article, item.paragraph)]


def retrieval_contexts(retrieve: Callable[[str, int], list[ContextChunk]], top_k: int) -> Contexts:
    return lambda item: retrieve(item.qa.question, top_k)


def evaluate_items(generator: Any, items: Sequence[Item], contexts: Contexts, *, max_new_tokens: int,
                   timeout_s: float | None, desc: str = "generate",
                   abstain_margin: float | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate an answer for every item and score it; (summary, per-question records).

    ``abstain_margin`` overrides the generator's calibrated one (see generation.generate.AbstainMargin).
    """
    records = []
    started = time.perf_counter()
    with tqdm(items, desc=desc, unit="q") as bar:
        for item in bar:
            packed = pack_prompt(generator.tokenizer, item.qa.question, contexts(item),
                                 context_window=generator.context_window, max_new_tokens=max_new_tokens)
            result = generate_answer(generator, packed, max_new_tokens=max_new_tokens, timeout_s=timeout_s,
                                     abstain_margin=abstain_margin)
            record = score_prediction(result.text, item.qa)
            record.update(prompt_tokens=packed.n_tokens, chunks=len(packed.chunks),
                          gold_in_context=_holds_answer(packed.chunks, item.qa),
                          seconds=round(result.elapsed_s, 2), abstain_preference=result.abstain_preference)
            records.append(record)
            summary = summarize(records)
            bar.set_postfix(f1=summary["f1"], em=summary["em"])
    summary = summarize(records)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["mean_prompt_tokens"] = round(sum(r["prompt_tokens"] for r in records) / max(len(records), 1), 1)
    answerable = [r for r in records if r["answerable"]]
    if answerable:
        summary["answer_in_context"] = round(100 * sum(r["gold_in_context"] for r in answerable) / len(answerable), 2)
    return summary, records


def _holds_answer(chunks: Sequence[ContextChunk], qa: QA) -> bool:
    bodies = [c.text.lower() for c in chunks]
    return any(a.lower() in body for a in qa.answers for body in bodies)


def load_eval_items(path: Path, limit: int | None, seed: int) -> tuple[list[Article], list[Item]]:
    articles = load_articles([path])
    return articles, sample_items(items_of(articles), limit, seed)


# --- abstention calibration ----------------------------------------------------------------------

NEVER_ABSTAIN = 1e4  # a margin no first-token preference reaches


def held_out_articles(metadata: dict[str, Any], root: Path) -> tuple[list[Article], str]:
    """(articles, description) of an adapter's validation articles, read from its training files.

    Raises ValueError naming what is missing when the metadata records none or a file is absent.
    """
    files = [root / f for f in metadata.get("config", {}).get("train_files", [])]
    titles = set(metadata.get("training_data", {}).get("articles", {}).get("validation", []))
    missing = [str(f) for f in files if not f.is_file()]
    if not files or not titles or missing:
        raise ValueError(f"no held-out articles to calibrate on ({', '.join(missing) or 'none recorded'})")
    articles = [a for a in load_articles(files) if a.title in titles]
    return articles, f"validation articles {sorted(titles)} of {[f.name for f in files]}"


def abstention_curve(records: Sequence[dict[str, Any]], margins: Sequence[float]) -> list[dict[str, Any]]:
    """Scores at each margin, from one run that never abstained (``NEVER_ABSTAIN``).

    Greedy decoding abstains exactly when the first-token preference exceeds the margin (the abstention's
    first token then wins; the model completes "I don't know." after it), and otherwise writes the answer
    recorded in that run, so every margin is scored without generating again.
    """
    curve = []
    for margin in margins:
        rescored = []
        for record in records:
            abstains = record["abstain_preference"] is not None and record["abstain_preference"] > margin
            if abstains:
                rescored.append({**record, "abstained": True, "em": float(not record["answerable"]),
                                 "f1": float(not record["answerable"])})
            else:
                rescored.append(record)
        curve.append({"margin": margin, **summarize(rescored)})
    return curve


def choose_margin(curve: Sequence[dict[str, Any]], max_abstain_answerable: float) -> dict[str, Any]:
    """The margin with the best F1 over all questions (SQuAD 2.0 scoring) whose abstention on answerable
    questions stays within ``max_abstain_answerable`` percent (the largest margin if none does)."""
    allowed = [row for row in curve if (row["abstain_answerable"] or 0.0) <= max_abstain_answerable]
    if not allowed:
        return max(curve, key=lambda row: row["margin"])
    return max(allowed, key=lambda row: (row.get("f1_all", row["f1"]) or 0.0, -row["margin"]))


def plot_abstention(curve: Sequence[dict[str, Any]], chosen: dict[str, Any], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    margins = [row["margin"] for row in curve]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(margins, [row["f1"] for row in curve], "o-", ms=3, label="F1, answerable questions")
    if curve[0].get("f1_all") is not None:
        ax.plot(margins, [row["f1_all"] for row in curve], "o-", ms=3, label="F1, all (SQuAD 2.0 scoring)")
        ax.plot(margins, [row["abstain_unanswerable"] for row in curve], "s--", ms=3,
                label="abstains on unanswerable, %")
    ax.plot(margins, [row["abstain_answerable"] for row in curve], "^--", ms=3, label="abstains on answerable, %")
    ax.axvline(chosen["margin"], color="grey", lw=1, ls=":", label=f"chosen margin {chosen['margin']}")
    ax.set_xlabel("abstention margin (logits)")
    ax.set_ylabel("%")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
