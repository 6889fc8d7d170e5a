"""Retrieval quality on BEIR-format data: BM25, dense and both hybrid fusions, scored with ir-measures.

The corpus goes through the real pipeline (loader, chunker, embedder, Chroma, BM25) into an index
directory that is reused while the corpus file and the chunking/embedding settings are unchanged (a
change of the ingestion code since the build is reported; ``--no-cache`` rebuilds). Chunk hits become document rankings (a document ranks at its best chunk), and
NDCG@10, Recall@100 and MRR@10 are computed by ir-measures (pytrec_eval) over every judged query;
a judged query with no hits counts as 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import ir_measures
import numpy as np
from ir_measures import RR, R, nDCG
from tqdm import tqdm

from app.container import Services, build_services, chunker_config
from app.settings import REPO_ROOT, Settings
from ingestion.documents import Document
from ingestion.progress import chunk_postfix
from retrieval.hybrid import Hit, HybridRetriever

log = logging.getLogger(__name__)
METRICS = {"ndcg@10": nDCG @ 10, "recall@100": R @ 100, "mrr@10": RR @ 10}
DEFAULT_CACHE = REPO_ROOT / ".cache" / "eval"
DEFAULT_DEPTH = 200  # chunk candidates per retriever: enough chunks to rank >= 100 documents
MARKER = "eval_index.json"
INDEX_FORMAT = 1  # bump when the way evaluation indexes are built changes
# Code whose changes change the index: recorded with the build, a mismatch is reported.
INDEX_CODE = ("ingestion/loaders.py", "ingestion/chunker.py", "ingestion/indexer.py", "retrieval/bm25.py")
Qrels = dict[str, dict[str, int]]
Rankings = dict[str, list[str]]  # query id -> document ids, best first


# --- data ---------------------------------------------------------------------------------------


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


# --- the index ----------------------------------------------------------------------------------


@dataclass
class EvalIndex:
    services: Services
    data_dir: Path
    reused: bool
    info: dict[str, Any]

    @property
    def chunk_document(self) -> dict[str, str]:
        bm25 = self.services.bm25
        return dict(zip(bm25.ids.tolist(), bm25.columns["document_id"].tolist()))

    def close(self) -> None:
        self.services.ledger.close()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def index_key(source_digest: str, settings: Settings, chunker: str = "semantic") -> dict[str, Any]:
    """The inputs and settings the built index depends on."""
    return {"format": INDEX_FORMAT, "source_sha256": source_digest, "chunker": chunker,
            "bm25_language": settings.bm25_language, **chunker_config(settings)}


def code_digest() -> str:
    return hashlib.sha256(b"".join((REPO_ROOT / name).read_bytes() for name in INDEX_CODE)).hexdigest()[:16]


def key_hash(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def open_index(settings: Settings, data_dir: Path, key: dict[str, Any], documents: Callable[[], list[Document]],
               *, chunker: Callable[[Services], object] | None = None, owned: bool = False) -> EvalIndex:
    """Reuse the index in `data_dir` if it was built from `key`; else build it there from `documents()`.

    An `owned` folder (a cache entry) without a finished build is an interrupted one and is wiped;
    any other folder must be empty or an evaluation index.
    """
    from ingestion.ledger import writer_lock

    marker = data_dir / MARKER
    local = settings.model_copy(update={"data_dir": data_dir, "chroma_host": None})
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("key") == key:
            if info.get("code_sha256") != code_digest():
                log.warning("%s was built by other ingestion code than the current one; rebuild it with "
                            "--no-cache (or delete the folder) if the chunks should change", data_dir)
            return EvalIndex(build_services(local, load_generator=False), data_dir, True, info)
        shutil.rmtree(data_dir)
    elif data_dir.exists() and any(data_dir.iterdir()):
        if owned:
            shutil.rmtree(data_dir)
        else:
            raise ValueError(f"{data_dir} holds data that is not an evaluation index; give an empty or new folder")
    started = time.perf_counter()
    with writer_lock(data_dir):
        services = build_services(local, load_generator=False)
        if chunker is not None:
            services.chunker = chunker(services)  # type: ignore[assignment]
        docs = documents()
        with tqdm(total=len(docs), desc="index", unit="doc") as bar:
            indexer = services.indexer()
            indexer.on_embedded = chunk_postfix(bar)
            indexer.apply(docs, progress=lambda done, total: bar.update(min(done, len(docs)) - bar.n))
    info = {"key": key, "code_sha256": code_digest(), "documents": len(docs), "chunks": len(services.bm25),
            "build_s": round(time.perf_counter() - started, 1), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    marker.write_text(json.dumps(info, indent=2))  # written last: a folder without it is incomplete
    return EvalIndex(services, data_dir, False, info)


def open_corpus_index(corpus: Path, settings: Settings, *, data_dir: Path | None = None,
                      cache_root: Path = DEFAULT_CACHE) -> EvalIndex:
    """The index of a BEIR corpus.jsonl, under `data_dir` or the cache folder keyed by its inputs."""
    from ingestion.loaders import load_documents

    key = index_key(file_digest(corpus), settings)
    folder = data_dir or cache_root / key_hash(key)
    return open_index(settings, folder, key, lambda: load_documents([corpus]), owned=data_dir is None)


# --- runs and metrics ---------------------------------------------------------------------------


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


@dataclass
class MethodRuns:
    """Everything measured per method: chunk hits, latencies and document-level metrics."""

    hits: dict[str, dict[str, list[Hit]]]
    latencies: dict[str, list[float]]
    metrics: dict[str, dict[str, float]]


def run_all(index: EvalIndex, settings: Settings, questions: Mapping[str, str], qrels: Qrels,
            vectors: np.ndarray, depth: int) -> MethodRuns:
    """BM25 and dense `depth` deep; the hybrids exactly as served (each side cut to RAG_CANDIDATES)."""
    from retrieval.fusion import fuse
    from retrieval.tuning import fused_metrics

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
            from retrieval.tuning import tune_fusion

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
