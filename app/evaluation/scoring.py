"""Scoring retrieval runs: BEIR queries and judgments in, document rankings scored by ir-measures.

Chunk hits become document rankings (a document ranks at its best chunk), and NDCG@10, Recall@100 and
MRR@10 are computed by ir-measures (pytrec_eval) over every judged query; a judged query with no hits
counts as 0. Shared by the retrieval evaluation and the fusion tuning.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import ir_measures
import numpy as np
from ir_measures import RR, R, nDCG

from retrieval.hybrid import Hit

METRICS = {"ndcg@10": nDCG @ 10, "recall@100": R @ 100, "mrr@10": RR @ 10}
Qrels = dict[str, dict[str, int]]
Rankings = dict[str, list[str]]  # query id -> document ids, best first


def load_queries(path: Path) -> dict[str, str]:
    """BEIR queries.jsonl: ``{"_id", "text"}`` per line."""
    queries = {}
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                queries[str(record["_id"])] = record["text"]
    return queries


def load_qrels(path: Path) -> Qrels:
    """BEIR qrels .tsv (``query-id corpus-id score``, optional header line, any line endings)."""
    qrels: Qrels = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        parts = line.strip().split("\t") if "\t" in line else line.split()
        if not parts or (number == 0 and not parts[-1].lstrip("-").isdigit()):
            continue
        if len(parts) == 4:  # TREC format: qid 0 docid rel
            parts = [parts[0], parts[2], parts[3]]
        query_id, doc_id, score = parts
        qrels.setdefault(query_id, {})[doc_id] = int(score)
    return qrels


def document_ranking(hits: Sequence[Hit], chunk_document: Mapping[str, str]) -> list[str]:
    """Documents in the order of their best chunk."""
    return list(dict.fromkeys(chunk_document[hit.chunk_id] for hit in hits))


def score_rankings(qrels: Qrels, rankings: Rankings) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(mean metrics over every judged query, per-query metrics); a query without a ranking scores 0."""
    # Scores encode the rank (n, n-1, ...), so ties never reorder a ranking.
    run = {qid: {doc: float(len(docs) - i) for i, doc in enumerate(docs)} for qid, docs in rankings.items() if docs}
    names = {measure: name for name, measure in METRICS.items()}
    per_query = {qid: dict.fromkeys(METRICS, 0.0) for qid in qrels}
    for metric in ir_measures.iter_calc(list(METRICS.values()), qrels, run):
        if metric.query_id in per_query:
            per_query[metric.query_id][names[metric.measure]] = float(metric.value)
    means = {name: float(np.mean([scores[name] for scores in per_query.values()])) if per_query else 0.0
             for name in METRICS}
    return means, per_query


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float]:
    values = np.asarray(latencies_ms, dtype=float)
    if not len(values):
        return {"latency_p50_ms": 0.0, "latency_p95_ms": 0.0}
    return {"latency_p50_ms": round(float(np.percentile(values, 50)), 2),
            "latency_p95_ms": round(float(np.percentile(values, 95)), 2)}


@dataclass
class MethodRuns:
    """Everything measured per method: chunk hits, latencies and document-level metrics."""

    hits: dict[str, dict[str, list[Hit]]]
    latencies: dict[str, list[float]]
    metrics: dict[str, dict[str, float]]
