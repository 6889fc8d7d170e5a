"""Score fusion for hybrid retrieval: convex combination of min-max-normalized scores, or RRF.

Both take ranked lists of (id, score), best first, and return (id, fused score) best first.
Ties break by id so results are deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

Ranked = Sequence[tuple[str, float]]
FusionMethod = Literal["convex", "rrf"]


def min_max(hits: Ranked) -> dict[str, float]:
    """Scale scores to [0, 1] within one list; a list of equal scores maps to 1.0."""
    if not hits:
        return {}
    scores = [s for _, s in hits]
    low, high = min(scores), max(scores)
    span = high - low
    return {cid: (s - low) / span if span > 0 else 1.0 for cid, s in hits}


def convex_fusion(lexical: Ranked, dense: Ranked, alpha: float) -> list[tuple[str, float]]:
    """alpha * dense + (1 - alpha) * lexical, each min-max-normalized; absent from a list counts as 0."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    lex, den = min_max(lexical), min_max(dense)
    fused = {cid: alpha * den.get(cid, 0.0) + (1.0 - alpha) * lex.get(cid, 0.0) for cid in lex.keys() | den.keys()}
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))


def rrf_fusion(*rankings: Ranked, k: int = 60) -> list[tuple[str, float]]:
    """Reciprocal-rank fusion: sum over lists of 1 / (k + rank), rank starting at 1."""
    fused: dict[str, float] = {}
    for ranking in rankings:
        for rank, (cid, _) in enumerate(ranking, start=1):
            fused[cid] = fused.get(cid, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))


def fuse(lexical: Ranked, dense: Ranked, *, fusion: FusionMethod, alpha: float, rrf_k: int) -> list[tuple[str, float]]:
    """The hybrid's fusion step: convex with weight `alpha` on dense, or RRF with `rrf_k`."""
    if fusion == "rrf":
        return rrf_fusion(lexical, dense, k=rrf_k)
    if fusion == "convex":
        return convex_fusion(lexical, dense, alpha)
    raise ValueError(f"fusion must be 'convex' or 'rrf', got {fusion!r}")
