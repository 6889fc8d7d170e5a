"""Calibrating when to abstain: the abstention margin and the grounding thresholds, on held-out questions.

One run over the adapter's validation articles (never evaluation data) records, for every question, the
signals the serving path decides on (generation/grounding.py) with the gate open and abstention off.
Three kinds of question: answerable and SQuAD 2.0 unanswerable questions with their article indexed
beside the other training articles, and *out-of-corpus* questions asked of an index that lacks their
article. Every combination of thresholds is then scored from that one run without generating again
(:func:`generation.finetune.evaluate.rescore` is the exact rule; the grid here is its vectorized form,
and the chosen point is re-scored by it). The chosen point has the best SQuAD 2.0 F1 over all questions
(out-of-corpus ones count as unanswerable) among those that abstain on at most ``max_abstain_answerable``
percent of the answerable in-corpus questions, in retrieval mode and with the gold paragraph alike.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from generation.finetune.data import Article, load_articles
from generation.finetune.evaluate import Item, rescore, summarize
from generation.grounding import Signals, Thresholds, matches, verdict

NEVER_ABSTAIN = 1e4  # a margin no first-token preference reaches
OPEN = Thresholds(relevance_min=0.0, dense_min=2.0, answerability_min=0.0, evidence_min=0.0, support_min=0.0,
                  confidence_min=None)

GRID: dict[str, Sequence[Any]] = {
    "relevance_min": [round(0.1 * i, 1) for i in range(8)],  # 0 .. 0.7
    "dense_min": [2.0, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6],  # 2: off (no chunk passes by similarity)
    "answerability_min": [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
    "margin": [round(0.5 * i, 1) for i in range(13)] + [NEVER_ABSTAIN],  # 0 .. 6 logits, never
    "support_min": [0.5, 0.75, 1.0],  # below half the answer's words, a chunk does not support it
    "evidence_min": [round(0.1 * i, 1) for i in range(9)],  # 0 .. 0.8
    "confidence_min": [None, -1.5, -1.0, -0.8, -0.6, -0.5, -0.4, -0.3],
}


def held_out_articles(metadata: dict[str, Any], root: Path) -> tuple[list[Article], list[Article], str]:
    """(validation articles of every training file, the training corpus, description) of an adapter.

    The corpus holds each training article once (SQuAD v1.1 and v2.0 files share articles); the
    validation articles keep every file's questions. Raises ValueError naming what is missing when the
    metadata records none or a file is absent.
    """
    files = [root / f for f in metadata.get("config", {}).get("train_files", [])]
    titles = set(metadata.get("training_data", {}).get("articles", {}).get("validation", []))
    missing = [str(f) for f in files if not f.is_file()]
    if not files or not titles or missing:
        raise ValueError(f"no held-out articles to calibrate on ({', '.join(missing) or 'none recorded'})")
    articles = load_articles(files)
    corpus = list({a.title: a for a in reversed(articles)}.values())[::-1]  # first file's copy of each title
    held_out = [a for a in articles if a.title in titles]
    return held_out, corpus, f"validation articles {sorted(titles)} of {[f.name for f in files]}"


def search(records: Sequence[dict[str, Any]], items: Sequence[Item], max_abstain_answerable: float,
           grid: dict[str, Sequence[Any]] = GRID) -> dict[str, Any]:
    """The best thresholds and margin over ``grid`` (see module doc), with the exact summary at that point."""
    n = len(records)
    answerable = np.array([r["answerable"] and r["in_corpus"] for r in records])
    f1 = np.array([r["f1"] if r["answerable"] and r["in_corpus"] else 0.0 for r in records])
    signals = [Signals(**r["signals"]) for r in records]

    # gate[i, r, d, a]: question i passes the pre-generation gate (relevance_min r or dense_min d, and
    # answerability_min a) on at least one chunk, by the rule of generation.grounding.has_relevant_context
    rel_grid = np.array(grid["relevance_min"])[None, :, None, None]
    dense_grid = np.array(grid["dense_min"])[None, None, :, None]
    ans_grid = np.array(grid["answerability_min"])[None, None, None, :]
    gate = np.zeros((n, rel_grid.size, dense_grid.size, ans_grid.size), dtype=bool)
    for i, s in enumerate(signals):
        if not s.relevance:
            continue
        k = len(s.relevance)
        rel = np.array(s.relevance)[:, None, None, None]
        dense = np.array([-np.inf if d is None else d for d in s.dense])[:, None, None, None]  # unscored: no pass
        ans = np.array([1.0 if a is None else a for a in (s.answerability or [None] * k)])[:, None, None, None]
        gate[i] = (matches(rel >= rel_grid, dense >= dense_grid) & (ans >= ans_grid)).any(axis=0)
    # speaks[i, m]: the model does not abstain at margin m
    pref = np.array([np.inf if s.abstain_preference is None else s.abstain_preference for s in signals])
    speaks = ~(pref[:, None] > np.array(grid["margin"])[None, :])
    speaks[pref == np.inf] = True
    # grounded[i, s, e, c]: the answer passes verification
    post = list(itertools.product(grid["support_min"], grid["evidence_min"], grid["confidence_min"]))
    grounded = np.zeros((n, len(post)), dtype=bool)
    for i, s in enumerate(signals):
        for j, (sup, evi, conf) in enumerate(post):
            thresholds = replace(OPEN, support_min=sup, evidence_min=evi, confidence_min=conf)
            grounded[i, j] = verdict(s, thresholds, "flag").grounded
    # answered[i, r, d, a, p] at each margin; score: SQuAD 2.0 F1 pooled over every question; the cap holds
    # in each mode (retrieval, gold paragraph) on its own
    modes = np.array([r.get("mode", "retrieval") for r in records])
    groups = [answerable & (modes == mode) for mode in sorted(set(modes))]
    best: tuple[float, tuple[int, ...], int] | None = None
    for m in range(len(grid["margin"])):
        answered = gate[..., None] & speaks[:, m][:, None, None, None, None] & grounded[:, None, None, None, :]
        points = np.where(answerable[:, None, None, None, None], f1[:, None, None, None, None] * answered,
                          ~answered).sum(0)
        worst = np.max([100 * (g[:, None, None, None, None] & ~answered).sum(0) / max(int(g.sum()), 1)
                        for g in groups if g.any()], axis=0)
        points = np.where(worst <= max_abstain_answerable, points, -1.0)
        at = np.unravel_index(int(points.argmax()), points.shape)
        if best is None or points[at] > best[0] + 1e-9:
            best = (float(points[at]), tuple(int(x) for x in at), m)
    assert best is not None
    (r, d, a, p), m = best[1], best[2]
    if best[0] < 0:  # nothing stays under the cap: the most permissive point
        r, d, a, m, p = 0, 0, 0, len(grid["margin"]) - 1, 0
    sup, evi, conf = post[p]
    thresholds = Thresholds(relevance_min=grid["relevance_min"][r], dense_min=grid["dense_min"][d],
                            answerability_min=grid["answerability_min"][a], support_min=sup, evidence_min=evi,
                            confidence_min=conf)
    margin = grid["margin"][m]
    summary = pooled_summary(rescore(records, items, thresholds, margin))
    return {"thresholds": thresholds, "abstain_margin": margin, "summary": summary}


def pooled_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """summarize() plus ``f1_pooled`` (SQuAD 2.0 F1 over all questions, out-of-corpus ones as unanswerable)
    and, when the records hold several modes, ``by_mode``: summarize() of each."""
    summary = summarize(records)
    points = [(r["f1"] if r["answerable"] and r["in_corpus"] else float(r["abstained"])) for r in records]
    summary["f1_pooled"] = round(100 * sum(points) / len(points), 2) if points else None
    modes = sorted({r.get("mode", "retrieval") for r in records})
    if len(modes) > 1:
        summary["by_mode"] = {m: summarize([r for r in records if r.get("mode", "retrieval") == m]) for m in modes}
    return summary


def sweeps(records: Sequence[dict[str, Any]], items: Sequence[Item], thresholds: Thresholds, margin: float,
           grid: dict[str, Sequence[Any]] = GRID) -> dict[str, list[dict[str, Any]]]:
    """One-at-a-time sweeps around the chosen point: for each knob, the summary at every grid value."""
    curves: dict[str, list[dict[str, Any]]] = {}
    for knob in ("relevance_min", "dense_min", "answerability_min", "evidence_min", "confidence_min", "margin"):
        rows = []
        for value in grid[knob]:
            if value is None or value == NEVER_ABSTAIN or (knob == "dense_min" and value > 1.0):
                continue  # "off" settings: no place on the axis
            point = margin if knob != "margin" else value
            th = thresholds if knob == "margin" else replace(thresholds, **{knob: value})
            rows.append({"value": value, **pooled_summary(rescore(records, items, th, point))})
        curves[knob] = rows
    return curves


def plot_calibration(curves: dict[str, list[dict[str, Any]]], chosen: dict[str, Any], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    knobs = [k for k in curves if len({row.get("abstain_answerable") for row in curves[k]}) > 1 or k == "margin"]
    columns = 3
    rows = (len(knobs) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), dpi=110, sharey=True, squeeze=False)
    for ax in axes.flat[len(knobs):]:
        ax.set_visible(False)
    series = [("f1_pooled", "F1, pooled (SQuAD 2.0)", "o-"), ("abstain_answerable", "abstains: answerable", "^--"),
              ("abstain_unanswerable", "abstains: unanswerable", "s--"),
              ("abstain_out_of_corpus", "abstains: out of corpus", "d--")]
    for ax, knob in zip(axes.flat, knobs):
        xs = [row["value"] for row in curves[knob]]
        for key, label, style in series:
            ax.plot(xs, [row.get(key) or 0.0 for row in curves[knob]], style, ms=3, label=label)
        value = chosen["abstain_margin"] if knob == "margin" else getattr(chosen["thresholds"], knob)
        off = value is None or value == NEVER_ABSTAIN or (knob == "dense_min" and value > 1.0)
        if off:
            ax.text(0.02, 0.02, "chosen: off", transform=ax.transAxes, fontsize=8, color="grey")
        else:
            ax.axvline(value, color="grey", lw=1, ls=":", label="chosen")
        ax.set_xlabel(knob)
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("%")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
