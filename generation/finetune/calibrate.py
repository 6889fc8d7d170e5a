"""Calibrating when to abstain: the abstention margin and the grounding thresholds, on held-out questions.

One run over the adapter's validation articles (never evaluation data) records, for every question, the
signals the serving path decides on (generation/grounding.py) with the gate open and abstention off.
Three kinds of question: answerable and SQuAD 2.0 unanswerable questions with their article indexed
beside the other training articles, and *out-of-corpus* questions asked of an index that lacks their
article. Every combination of thresholds is then scored from that one run without generating again
(:func:`generation.finetune.evaluate.rescore` is the exact rule; the grid here is its vectorized form,
and the chosen point is re-scored by it). The margin may grow with the gate score (``margin_slope``,
generation.grounding.abstain_margin_for), so the generator's own abstention decides where retrieval is
weak without costing answerable questions whose context matches closely. The chosen point has the best
SQuAD 2.0 F1 over all questions (out-of-corpus ones count as unanswerable) among those that abstain on at
most ``max_abstain_answerable`` percent of the answerable in-corpus questions, in retrieval mode and with
the gold paragraph alike.
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
from generation.grounding import Signals, Thresholds, blend, matches, verdict

NEVER_ABSTAIN = 1e4  # a margin no first-token preference reaches
OPEN = Thresholds(relevance_min=0.0, dense_min=2.0, answerability_min=0.0, evidence_min=0.0, support_min=0.0,
                  confidence_min=None)

GRID: dict[str, Sequence[Any]] = {
    "relevance_min": [round(0.1 * i, 1) for i in range(8)],  # 0 .. 0.7
    "dense_min": [2.0, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6],  # 2: off (no chunk passes by similarity)
    "gate_weight": [round(0.1 * i, 1) for i in range(1, 10)],  # the blended gate: 0.1 .. 0.9 on relevance
    "gate_min": [round(0.25 + 0.0125 * i, 4) for i in range(25)],  # 0.25 .. 0.55
    "answerability_min": [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
    "margin": [-2.0, -1.0] + [round(0.5 * i, 1) for i in range(13)] + [NEVER_ABSTAIN],  # -2 .. 6 logits, never
    "margin_slope": [0.0, 2.5, 5.0, 10.0, 20.0],  # with the blended gate: margin added per unit of gate score
    "support_min": [0.5, 0.75, 1.0],  # below half the answer's words, a chunk does not support it
    "evidence_min": [round(0.1 * i, 1) for i in range(9)],  # 0 .. 0.8
    "confidence_min": [None, -1.5, -1.0, -0.8, -0.6, -0.5, -0.4, -0.3],
}


def validation_titles(metadata: dict[str, Any]) -> set[str]:
    """The titles of the held-out training articles an adapter's metadata records (empty when none)."""
    return set(metadata.get("training_data", {}).get("articles", {}).get("validation", []))


def held_out_articles(metadata: dict[str, Any], root: Path) -> tuple[list[Article], list[Article], str]:
    """(validation articles of every training file, the training corpus, description) of an adapter.

    The corpus holds each training article once (SQuAD v1.1 and v2.0 files share articles); the
    validation articles keep every file's questions. Raises ValueError naming what is missing when the
    metadata records none or a file is absent.
    """
    files = [root / f for f in metadata.get("config", {}).get("train_files", [])]
    titles = validation_titles(metadata)
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

    # gate[i, g, a]: question i passes the pre-generation gate configuration g (either rule of
    # generation.grounding.has_relevant_context, see gate_configurations) and answerability_min a on a chunk
    gates = gate_configurations(grid)
    ans_values = grid["answerability_min"] if any(a is not None for s in signals for a in (s.answerability or [])) \
        else [0.0]  # no cross-encoder scores: the answerability axis changes nothing
    ans_grid = np.array(ans_values)[None, None, :]
    rel_min = np.array([g.relevance_min for g in gates])[None, :, None]
    dense_min = np.array([g.dense_min for g in gates])[None, :, None]
    blended = np.array([g.gate_weight is not None for g in gates])[None, :, None]
    weight = np.array([g.gate_weight or 0.0 for g in gates])[None, :, None]
    gate_min = np.array([g.gate_min for g in gates])[None, :, None]
    gate = np.zeros((n, len(gates), ans_grid.size), dtype=bool)
    # excess[i, g]: the best chunk's blended score above gate_min (0 for the either-signal gates), what
    # margin_slope multiplies (generation.grounding.abstain_margin_for)
    excess = np.zeros((n, len(gates)))
    for i, s in enumerate(signals):
        if not s.relevance:
            continue
        k = len(s.relevance)
        rel = np.array(s.relevance)[:, None, None]
        dense = np.array([-np.inf if d is None else d for d in s.dense])[:, None, None]  # unscored: no pass
        ans = np.array([1.0 if a is None else a for a in (s.answerability or [None] * k)])[:, None, None]
        score = blend(weight, rel, np.where(np.isinf(dense), 0.0, dense))
        topical = np.where(blended, score >= gate_min, matches(rel >= rel_min, dense >= dense_min))
        gate[i] = (topical & (ans >= ans_grid)).any(axis=0)
        excess[i] = np.where(blended, np.maximum(score.max(axis=0) - gate_min, 0.0), 0.0)[0, :, 0]
    # the model abstains when its first-token preference exceeds the margin (no preference: it speaks)
    pref = np.array([np.inf if s.abstain_preference is None else s.abstain_preference for s in signals])
    unmeasured = np.isinf(pref)[:, None]
    slopes = grid.get("margin_slope", [0.0])
    # grounded[i, s, e, c]: the answer passes verification
    post = list(itertools.product(grid["support_min"], grid["evidence_min"], grid["confidence_min"]))
    grounded = np.zeros((n, len(post)), dtype=bool)
    for i, s in enumerate(signals):
        for j, (sup, evi, conf) in enumerate(post):
            thresholds = replace(OPEN, support_min=sup, evidence_min=evi, confidence_min=conf)
            grounded[i, j] = verdict(s, thresholds, "flag").grounded
    # answered[i, g, a, p] at each margin; score: SQuAD 2.0 F1 pooled over every question; the cap holds
    # in each mode (retrieval, gold paragraph) on its own
    modes = np.array([r.get("mode", "retrieval") for r in records])
    groups = [answerable & (modes == mode) for mode in sorted(set(modes))]
    best: tuple[float, tuple[int, ...], int, int] | None = None
    for (k, slope), (m, margin) in itertools.product(enumerate(slopes), enumerate(grid["margin"])):
        speaks = (pref[:, None] <= margin + slope * excess) | unmeasured  # (n, gates)
        answered = gate[..., None] & speaks[:, :, None, None] & grounded[:, None, None, :]
        points = np.where(answerable[:, None, None, None], f1[:, None, None, None] * answered, ~answered).sum(0)
        worst = np.max([100 * (g[:, None, None, None] & ~answered).sum(0) / max(int(g.sum()), 1)
                        for g in groups if g.any()], axis=0)
        points = np.where(worst <= max_abstain_answerable, points, -1.0)
        at = np.unravel_index(int(points.argmax()), points.shape)
        if best is None or points[at] > best[0] + 1e-9:  # ties keep the smaller slope, then the smaller margin
            best = (float(points[at]), tuple(int(x) for x in at), m, k)
    assert best is not None
    (g, a, p), m, k = best[1], best[2], best[3]
    if best[0] < 0:  # nothing stays under the cap: the most permissive point
        g, a, m, p, k = 0, 0, int(np.argmax(grid["margin"])), 0, 0
    sup, evi, conf = post[p]
    thresholds = replace(gates[g], answerability_min=ans_values[a], support_min=sup, evidence_min=evi,
                         confidence_min=conf, margin_slope=slopes[k] if gates[g].gate_weight is not None else 0.0)
    margin = grid["margin"][m]
    summary = pooled_summary(rescore(records, items, thresholds, margin))
    return {"thresholds": thresholds, "abstain_margin": margin, "summary": summary}


def gate_configurations(grid: dict[str, Sequence[Any]] = GRID) -> list[Thresholds]:
    """Every gate the grid holds, as Thresholds with the rest open: first the either-signal rule (each
    relevance_min with each dense_min), then the blended rule (each gate_weight with each gate_min)."""
    either = [replace(OPEN, relevance_min=r, dense_min=d) for r in grid["relevance_min"] for d in grid["dense_min"]]
    blends = [replace(OPEN, gate_weight=w, gate_min=t)
              for w in grid.get("gate_weight", []) for t in grid.get("gate_min", [])]
    return either + blends


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
    gate_knobs = ("gate_weight", "gate_min", "margin_slope") if thresholds.gate_weight is not None \
        else ("relevance_min", "dense_min")
    for knob in (*gate_knobs, "answerability_min", "evidence_min", "confidence_min", "margin"):
        rows = []
        for value in grid.get(knob, []):
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
