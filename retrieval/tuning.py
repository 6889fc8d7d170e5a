"""Fusion tuning: sweep convex alpha and RRF k over recorded BM25/dense candidates, keep the best NDCG@10.

The sweep re-fuses the candidate lists the evaluation already retrieved (the same lists the hybrid
retriever fuses at that depth), so it costs no retrieval. The choice is written as the JSON file the
service reads (``RAG_RETRIEVAL_TUNING``), with where it came from.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.fusion import convex_fusion, rrf_fusion

if TYPE_CHECKING:
    from app.settings import Settings
    from retrieval.evaluation import MethodRuns, Qrels

ALPHAS = [round(a, 2) for a in np.arange(0.0, 1.0 + 1e-9, 0.05)]
RRF_KS = (5, 10, 20, 40, 60, 100)
OBJECTIVE = "ndcg@10"


def fused_metrics(runs: "MethodRuns", qrels: "Qrels", chunk_document: Mapping[str, str], depth: int,
                  fuse) -> dict[str, float]:
    """Metrics of `fuse(lexical, dense)` applied to every query's recorded candidates."""
    from retrieval.evaluation import score_rankings

    lexical, dense = runs.hits["bm25"], runs.hits["dense"]
    rankings = {}
    for qid in lexical:
        fused = fuse([(h.chunk_id, h.score) for h in lexical[qid]], [(h.chunk_id, h.score) for h in dense[qid]])
        rankings[qid] = list(dict.fromkeys(chunk_document[cid] for cid, _ in fused[:depth]))
    return score_rankings(qrels, rankings)[0]


def sweep(runs: "MethodRuns", qrels: "Qrels", chunk_document: Mapping[str, str], depth: int) -> dict[str, list]:
    """{"convex": [{"alpha", metrics...}], "rrf": [{"k", metrics...}]}."""
    convex = [{"alpha": a, **fused_metrics(runs, qrels, chunk_document, depth,
                                           lambda lex, den, a=a: convex_fusion(lex, den, a))} for a in ALPHAS]
    rrf = [{"k": k, **fused_metrics(runs, qrels, chunk_document, depth,
                                    lambda lex, den, k=k: rrf_fusion(lex, den, k=k))} for k in RRF_KS]
    return {"convex": convex, "rrf": rrf}


def choose(curve: Mapping[str, list]) -> dict[str, Any]:
    """The best fusion by NDCG@10 (convex wins ties); both best parameters are kept."""
    best_convex = max(curve["convex"], key=lambda row: row[OBJECTIVE])
    best_rrf = max(curve["rrf"], key=lambda row: row[OBJECTIVE])
    fusion = "convex" if best_convex[OBJECTIVE] >= best_rrf[OBJECTIVE] else "rrf"
    best = best_convex if fusion == "convex" else best_rrf
    return {"fusion": fusion, "fusion_alpha": best_convex["alpha"], "rrf_k": best_rrf["k"],
            "metrics": {k: v for k, v in best.items() if k not in ("alpha", "k")}}


def write_tuning(path: Path, chosen: Mapping[str, Any], provenance: Mapping[str, Any]) -> None:
    """The tuning file, written atomically (a reader never sees half of it)."""
    data = {"fusion": chosen["fusion"], "fusion_alpha": chosen["fusion_alpha"], "rrf_k": chosen["rrf_k"],
            **provenance}
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
    alphas = [row["alpha"] for row in curve["convex"]]
    ax.plot(alphas, [row[OBJECTIVE] for row in curve["convex"]], "o-", ms=3, label="convex fusion")
    colors = plt.cm.Greys(np.linspace(0.35, 0.85, len(curve["rrf"])))
    for row, color in zip(curve["rrf"], colors):
        ax.axhline(row[OBJECTIVE], ls="--", lw=1, color=color, label=f"RRF k={row['k']}")
    ax.plot([0.0], [singles["bm25"]], "s", color="tab:red", ms=8, label=f"BM25 alone {singles['bm25']:.3f}")
    ax.plot([1.0], [singles["dense"]], "^", color="tab:green", ms=8, label=f"dense alone {singles['dense']:.3f}")
    best = next(row for row in curve["convex"] if row["alpha"] == chosen["fusion_alpha"])
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
    lines = ["| fusion | parameter | NDCG@10 | Recall@100 | MRR@10 |", "|---|---|---|---|---|"]
    for row in curve["convex"]:
        lines.append(f"| convex | alpha={row['alpha']:.2f} | {row['ndcg@10']:.4f} | {row['recall@100']:.4f} "
                     f"| {row['mrr@10']:.4f} |")
    for row in curve["rrf"]:
        lines.append(f"| rrf | k={row['k']} | {row['ndcg@10']:.4f} | {row['recall@100']:.4f} | {row['mrr@10']:.4f} |")
    return "\n".join(lines)


def tune_fusion(runs: "MethodRuns", qrels: "Qrels", chunk_document: Mapping[str, str], settings: "Settings", *,
                split: str, depth: int, tuning_out: Path | None, plot_out: Path | None) -> dict[str, Any]:
    """Sweep, choose, write the tuning file (and the plot); returns the curve and the choice."""
    curve = sweep(runs, qrels, chunk_document, depth)
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
