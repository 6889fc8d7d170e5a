"""Retrieval quality on BEIR-format data: BM25, dense and both hybrid fusions, scored with ir-measures.

The corpus goes through the real pipeline into an evaluation index (app/evaluation/indexes.py); chunk
hits become document rankings scored by app/evaluation/scoring.py.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from app.evaluation.indexes import DEFAULT_CACHE, EvalIndex, open_corpus_index
from app.evaluation.scoring import (MethodRuns, Qrels, document_ranking, latency_summary, load_qrels, load_queries,
                                    score_rankings)
from app.settings import Settings
from retrieval.hybrid import Hit, HybridRetriever

DEFAULT_DEPTH = 200  # chunk candidates per retriever: enough chunks to rank >= 100 documents


def embed_queries(embedder, texts: Sequence[str], batch: int = 256) -> tuple[np.ndarray, float]:
    """(vectors (n, d), mean ms per query), batched: each query is embedded once for all methods."""
    started = time.perf_counter()
    parts = [embedder.embed_queries(list(texts[i:i + batch]))
             for i in tqdm(range(0, len(texts), batch), desc="embed queries", unit="batch")]
    vectors = np.concatenate(parts) if parts else np.zeros((0, embedder.dimension), dtype=np.float32)
    return vectors, 1000 * (time.perf_counter() - started) / max(len(texts), 1)


def run_method(retriever: HybridRetriever, questions: Mapping[str, str], vectors: np.ndarray, depth: int,
               label: str, **options: Any) -> tuple[dict[str, list[Hit]], list[float]]:
    """Chunk hits per query and per-query latency in ms (query embedding excluded: vectors are given)."""
    hits: dict[str, list[Hit]] = {}
    latencies: list[float] = []
    for (qid, text), vector in tqdm(zip(questions.items(), vectors), total=len(questions), desc=label, unit="q"):
        started = time.perf_counter()
        hits[qid] = retriever.search(text, depth, query_vector=vector, **options)
        latencies.append(1000 * (time.perf_counter() - started))
    return hits, latencies


def eval_retriever(index: EvalIndex, settings: Settings, depth: int) -> HybridRetriever:
    """The service's retriever with `depth` candidates per side (fused lists are cut to `depth` too)."""
    services = index.services
    return HybridRetriever(embedder=services.embedder, dense=services.dense, bm25=services.bm25,
                           fusion=settings.fusion, alpha=settings.fusion_alpha, rrf_k=settings.rrf_k,
                           candidates=depth)


def run_all(index: EvalIndex, settings: Settings, questions: Mapping[str, str], qrels: Qrels,
            vectors: np.ndarray, depth: int) -> MethodRuns:
    """BM25 and dense `depth` deep; the hybrids exactly as served (each side cut to RAG_CANDIDATES)."""
    from retrieval.fusion import fuse
    from app.evaluation.tuning import fused_metrics

    chunk_document = index.chunk_document
    runs = MethodRuns({}, {}, {})
    single = eval_retriever(index, settings, depth)
    for name in ("bm25", "dense"):
        hits, runs.latencies[name] = run_method(single, questions, vectors, depth, name, method=name)
        runs.hits[name] = hits
        runs.metrics[name] = score_rankings(qrels, {q: document_ranking(h, chunk_document) for q, h in hits.items()})[0]
    # Hybrid quality: the service's fusion code on the recorded lists cut to the service's candidates;
    # hybrid latency: the service's retriever, timed at the service's top_k.
    candidates = min(settings.candidates, depth)
    served = eval_retriever(index, settings, candidates)
    for fusion in ("convex", "rrf"):
        name = f"hybrid_{fusion}"
        runs.latencies[name] = run_method(served, questions, vectors, settings.top_k, name, fusion=fusion)[1]
        runs.metrics[name] = fused_metrics(runs, qrels, chunk_document, candidates, partial(
            fuse, fusion=fusion, alpha=settings.fusion_alpha, rrf_k=settings.rrf_k))
    return runs


def evaluate(corpus: Path, queries_path: Path, qrels_path: Path, settings: Settings, *,
             data_dir: Path | None = None, cache_root: Path = DEFAULT_CACHE, depth: int = DEFAULT_DEPTH,
             split_name: str | None = None, tune: bool = False, tuning_out: Path | None = None,
             plot_out: Path | None = None) -> dict[str, Any]:
    """The full report (see ``format_table``); with `tune`, also sweeps fusion and writes the choice."""
    qrels = load_qrels(qrels_path)
    all_queries = load_queries(queries_path)
    missing = sorted(set(qrels) - set(all_queries))
    if missing:
        raise ValueError(f"{len(missing)} judged queries are not in {queries_path} (e.g. {missing[:3]})")
    questions = {qid: all_queries[qid] for qid in qrels}
    index = open_corpus_index(corpus, settings, data_dir=data_dir, cache_root=cache_root)
    try:
        vectors, embed_ms = embed_queries(index.services.embedder, list(questions.values()))
        runs = run_all(index, settings, questions, qrels, vectors, depth)
        split = split_name or f"{corpus.parent.name}/{qrels_path.stem}"
        report = build_report(index, settings, runs, split=split, n_queries=len(questions), depth=depth,
                              embed_ms=embed_ms)
        if tune:
            from app.evaluation.tuning import tune_fusion

            report["tuning"] = tune_fusion(runs, qrels, index.chunk_document, settings, split=split, depth=depth,
                                           tuning_out=tuning_out or settings.retrieval_tuning,
                                           plot_out=plot_out)
            apply_tuned_hybrid(report, runs)
    finally:
        index.close()
    return report


def build_report(index: EvalIndex, settings: Settings, runs: MethodRuns, *, split: str, n_queries: int,
                 depth: int, embed_ms: float) -> dict[str, Any]:
    methods = {name: {**{k: round(v, 4) for k, v in metrics.items()}, **latency_summary(runs.latencies[name])}
               for name, metrics in runs.metrics.items()}
    configured = "hybrid_rrf" if settings.fusion == "rrf" else "hybrid_convex"
    methods = {"bm25": methods["bm25"], "dense": methods["dense"], "hybrid": dict(methods[configured]),
               "hybrid_convex": methods["hybrid_convex"], "hybrid_rrf": methods["hybrid_rrf"]}
    return {
        "dataset": split,
        "queries": n_queries,
        "documents": index.info.get("documents"),
        "chunks": len(index.services.bm25),
        "methods": methods,
        "hybrid": {"fusion": settings.fusion, "fusion_alpha": settings.fusion_alpha, "rrf_k": settings.rrf_k,
                   "candidates": min(settings.candidates, depth), "from_tuning_file": sorted(settings.tuned_fields)},
        "query_embedding_ms": round(embed_ms, 2),
        "latency_note": ("per query, query embedding excluded (embedded once, batched, reused by every method); "
                         "bm25/dense return `depth` chunks, hybrids the service's top_k from `candidates` per side"),
        "depth": depth,
        "embedding_model": settings.embedding_model,
        "index": {"dir": str(index.data_dir), "reused": index.reused, "build_s": index.info.get("build_s")},
    }


def apply_tuned_hybrid(report: dict[str, Any], runs: MethodRuns) -> None:
    """After --tune, "hybrid" reports the chosen fusion (latency from the timed run of that fusion)."""
    choice = report["tuning"]["chosen"]
    timed = "hybrid_rrf" if choice["fusion"] == "rrf" else "hybrid_convex"
    report["methods"]["hybrid"] = {**{k: round(v, 4) for k, v in choice["metrics"].items()},
                                   **latency_summary(runs.latencies[timed])}
    report["hybrid"] = {"fusion": choice["fusion"], "fusion_alpha": choice["fusion_alpha"],
                        "rrf_k": choice["rrf_k"], "candidates": choice["candidates"],
                        "from_tuning_file": ["fusion", "fusion_alpha", "rrf_k", "candidates"]}


def format_table(report: dict[str, Any]) -> str:
    """The methods as a Markdown table."""
    h = report["hybrid"]
    lines = [f"{report['dataset']}: {report['queries']} queries, {report['documents']} documents, "
             f"{report['chunks']} chunks; hybrid = {h['fusion']} (alpha {h['fusion_alpha']}, rrf k {h['rrf_k']}, "
             f"{h['candidates']} candidates per retriever)",
             "", "| method | NDCG@10 | Recall@100 | MRR@10 | p50 ms | p95 ms |", "|---|---|---|---|---|---|"]
    for name, m in report["methods"].items():
        lines.append(f"| {name} | {m['ndcg@10']:.4f} | {m['recall@100']:.4f} | {m['mrr@10']:.4f} "
                     f"| {m['latency_p50_ms']:.1f} | {m['latency_p95_ms']:.1f} |")
    lines.append(f"\nquery embedding: {report['query_embedding_ms']:.1f} ms/query (batched); "
                 f"latencies exclude it")
    return "\n".join(lines)
