"""Fusion tuning: sweep convex alpha and RRF k over recorded BM25/dense candidates, keep the best NDCG@10.

The sweep re-fuses the candidate lists the evaluation already retrieved (the same lists the hybrid
retriever fuses at that depth), so it costs no retrieval. The choice is written as the JSON file the
service reads (``RAG_RETRIEVAL_TUNING``), with where it came from.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from app.evaluation.scoring import MethodRuns, Qrels, score_rankings
from app.settings import Settings
from retrieval.fusion import fuse

ALPHAS = [round(a, 2) for a in np.arange(0.0, 1.0 + 1e-9, 0.05)]
RRF_KS = (5, 10, 20, 40, 60, 100)
CANDIDATES = (50, 100, 200)  # per retriever; more costs dense search time at scale
OBJECTIVE = "ndcg@10"


def fused_metrics(runs: MethodRuns, qrels: Qrels, chunk_document: Mapping[str, str], candidates: int,
                  fuse) -> dict[str, float]:
    """Metrics of `fuse(lexical, dense)` on every query's recorded lists, each cut to `candidates`."""
    lexical, dense = runs.hits["bm25"], runs.hits["dense"]
    rankings = {}
    for qid in lexical:
        fused = fuse([(h.chunk_id, h.score) for h in lexical[qid][:candidates]],
                     [(h.chunk_id, h.score) for h in dense[qid][:candidates]])
        rankings[qid] = list(dict.fromkeys(chunk_document[cid] for cid, _ in fused))
    return score_rankings(qrels, rankings)[0]


def candidate_depths(settings: Settings, depth: int) -> list[int]:
    """Candidate list lengths to sweep: the configured one and the usual steps, up to the recorded depth."""
    return sorted({c for c in (*CANDIDATES, settings.candidates) if c <= depth} | {min(settings.candidates, depth)})


def sweep(runs: MethodRuns, qrels: Qrels, chunk_document: Mapping[str, str],
          depths: Sequence[int]) -> dict[str, list]:
    """{"convex": [{"candidates", "alpha", metrics...}], "rrf": [{"candidates", "k", metrics...}]}."""
    convex, rrf = [], []
    for n in depths:
        convex += [{"candidates": n, "alpha": a, **fused_metrics(
            runs, qrels, chunk_document, n, partial(fuse, fusion="convex", alpha=a, rrf_k=0))} for a in ALPHAS]
        rrf += [{"candidates": n, "k": k, **fused_metrics(
            runs, qrels, chunk_document, n, partial(fuse, fusion="rrf", alpha=0.0, rrf_k=k))} for k in RRF_KS]
    return {"convex": convex, "rrf": rrf}


def choose(curve: Mapping[str, list]) -> dict[str, Any]:
    """The best fusion and candidate depth by NDCG@10 (convex, then fewer candidates, win ties)."""
    def best(rows: list) -> dict:
        return max(rows, key=lambda row: (round(row[OBJECTIVE], 6), -row["candidates"]))

    best_convex, best_rrf = best(curve["convex"]), best(curve["rrf"])
    fusion = "convex" if best_convex[OBJECTIVE] >= best_rrf[OBJECTIVE] else "rrf"
    winner = best_convex if fusion == "convex" else best_rrf
    at_depth = lambda rows: best([r for r in rows if r["candidates"] == winner["candidates"]] or rows)  # noqa: E731
    return {"fusion": fusion, "candidates": winner["candidates"],
            "fusion_alpha": at_depth(curve["convex"])["alpha"], "rrf_k": at_depth(curve["rrf"])["k"],
            "metrics": {k: v for k, v in winner.items() if k not in ("alpha", "k", "candidates")}}


def write_tuning(path: Path, chosen: Mapping[str, Any], provenance: Mapping[str, Any]) -> None:
    """The tuning file, written atomically (a reader never sees half of it)."""
    data = {"fusion": chosen["fusion"], "fusion_alpha": chosen["fusion_alpha"], "rrf_k": chosen["rrf_k"],
            "candidates": chosen["candidates"], **provenance}
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tuning-", suffix=".json")
    with os.fdopen(handle, "w") as out:
        out.write(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def plot_curve(curve: Mapping[str, list], singles: Mapping[str, float], chosen: Mapping[str, Any],
               title: str, path: Path) -> None:
    """NDCG@10 against alpha; RRF values as horizontal lines; BM25 (alpha 0 side) and dense marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    depths = sorted({row["candidates"] for row in curve["convex"]})
    for n in depths:
        rows = [row for row in curve["convex"] if row["candidates"] == n]
        ax.plot([row["alpha"] for row in rows], [row[OBJECTIVE] for row in rows], "o-", ms=3,
                label=f"convex, {n} candidates")
    rrf = [row for row in curve["rrf"] if row["candidates"] == chosen["candidates"]]
    colors = plt.cm.Greys(np.linspace(0.35, 0.85, len(rrf)))
    for row, color in zip(rrf, colors):
        ax.axhline(row[OBJECTIVE], ls="--", lw=1, color=color, label=f"RRF k={row['k']} ({row['candidates']})")
    ax.plot([0.0], [singles["bm25"]], "s", color="tab:red", ms=8, label=f"BM25 alone {singles['bm25']:.3f}")
    ax.plot([1.0], [singles["dense"]], "^", color="tab:green", ms=8, label=f"dense alone {singles['dense']:.3f}")
    best = next(row for row in curve["convex"]
                if row["alpha"] == chosen["fusion_alpha"] and row["candidates"] == chosen["candidates"])
    ax.annotate(f"alpha={best['alpha']}: {best[OBJECTIVE]:.3f}", (best["alpha"], best[OBJECTIVE]),
                xytext=(0, 10), textcoords="offset points", ha="center", fontsize=8)
    ax.margins(y=0.15)
    ax.set_xlabel("alpha (weight of the dense score)")
    ax.set_ylabel("NDCG@10")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower center", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def format_curve(curve: Mapping[str, list]) -> str:
    lines = ["| fusion | candidates | parameter | NDCG@10 | Recall@100 | MRR@10 |", "|---|---|---|---|---|---|"]
    for row in curve["convex"]:
        lines.append(f"| convex | {row['candidates']} | alpha={row['alpha']:.2f} | {row['ndcg@10']:.4f} "
                     f"| {row['recall@100']:.4f} | {row['mrr@10']:.4f} |")
    for row in curve["rrf"]:
        lines.append(f"| rrf | {row['candidates']} | k={row['k']} | {row['ndcg@10']:.4f} | {row['recall@100']:.4f} "
                     f"| {row['mrr@10']:.4f} |")
    return "\n".join(lines)


def tune_fusion(runs: MethodRuns, qrels: Qrels, chunk_document: Mapping[str, str], settings: Settings, *,
                split: str, depth: int, tuning_out: Path | None, plot_out: Path | None) -> dict[str, Any]:
    """Sweep, choose, write the tuning file (and the plot); returns the curve and the choice."""
    curve = sweep(runs, qrels, chunk_document, candidate_depths(settings, depth))
    chosen = choose(curve)
    provenance = {
        "objective": OBJECTIVE,
        "score": round(chosen["metrics"][OBJECTIVE], 4),
        "dataset": split,
        "queries": len(qrels),
        "depth": depth,
        "embedding_model": settings.embedding_model,
        "chunk_max_tokens": settings.chunk_max_tokens,
        "chunk_overlap_tokens": settings.chunk_overlap_tokens,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "rag eval retrieval --tune",
    }
    if tuning_out is not None:
        write_tuning(tuning_out, chosen, provenance)
    if plot_out is not None:
        singles = {name: runs.metrics[name][OBJECTIVE] for name in ("bm25", "dense")}
        plot_curve(curve, singles, chosen, f"Fusion on {split} ({len(qrels)} queries)", plot_out)
    return {"curve": curve, "chosen": chosen, "tuning_file": str(tuning_out) if tuning_out else None,
            "plot": str(plot_out) if plot_out else None}
