"""The reranking stage against the hybrid retriever alone: quality and the latency it adds, side by side.

SciFact: the trained reranker's held-out train queries (its metadata: the 20% of its sampled judged train
queries it never saw) over the same sampled corpus index it was trained on; the served hybrid's fused list
(100 chunks deep, documents ranked at their best chunk) against the same list with its top N (10, 20, 50)
reordered by the reranker. NDCG@10 and Recall@100 by ir-measures (app/evaluation/scoring.py).
SQuAD: answer recall@1/3 (a hit: a retrieved chunk holds a gold answer; app/evaluation/chunking.py) on
questions of the first dev-v1.1 articles, indexed by the service's pipeline, top N 10 and 20 reranked.
Latency: the reranker's time for the first N chunks of each query, on this CPU (the 10 / 20 / 50 chunks are
scored in increments of 10, 10 and 30: one batch each, summed), p50 / p95.

    python bench/reranker.py [--model minilm-rerank] [--limit 80] [--squad-articles 5] [--squad-questions 80]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from common import REPO, percentiles, update_section
from tqdm import tqdm

from app.container import build_reranker
from app.evaluation.chunking import answer_recall, chunk_body, open_chunking_index, squad_articles
from app.evaluation.indexes import DEFAULT_CACHE, beir_opener
from app.evaluation.scoring import score_rankings
from app.settings import Settings
from ingestion.registry import RerankerRegistry
from retrieval.cross_encoder import read_metadata

TOP_N = (10, 20, 50)
INCREMENTS = ((0, 10), (10, 20), (20, 50))  # scored one batch each; latency at N sums those below N
DEPTH = 100  # fused chunks ranked per SciFact query (documents at their best chunk): Recall@100


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def scored(reranker, question: str, texts: list[str], top: int) -> tuple[list[float], dict[int, float]]:
    """(scores of the first ``top`` texts, ms spent up to each N of TOP_N), scored in INCREMENTS."""
    scores: list[float] = []
    spent, elapsed = {}, 0.0
    for start, end in INCREMENTS:
        if start >= min(top, len(texts)):
            break
        began = time.perf_counter()
        scores += reranker.score(question, texts[start:min(end, top)])
        elapsed += 1000 * (time.perf_counter() - began)
        spent[end] = elapsed
    return scores, spent


def reorder(items: list, scores: list[float], n: int) -> list:
    """``items`` with its first ``n`` sorted by score (stable), the rest as fused."""
    head = sorted(range(min(n, len(items))), key=lambda i: -scores[i])
    return [items[i] for i in head] + items[len(head):]


def scifact(reranker, metadata: dict, settings: Settings, limit: int) -> tuple[list[list], dict[int, list[float]], int]:
    config = metadata["config"]
    beir = beir_opener(settings, DEFAULT_CACHE)(
        (REPO / config["scifact_dir"]).resolve(), config["scifact_queries"], config["scifact_documents"],
        config["seed"])
    held = metadata["training_data"]["scifact"]["held_out_queries"][:limit]
    qrels = {q: beir.qrels[q] for q in held}
    rankings: dict[str, dict[str, list[str]]] = {"hybrid": {}, **{f"rerank@{n}": {} for n in TOP_N}}
    latency: dict[int, list[float]] = {n: [] for n in TOP_N}
    index = beir.index
    try:
        vectors = index.embedder.embed_queries([beir.queries[q] for q in held])
        for qid, vector in tqdm(list(zip(held, vectors)), desc="scifact", unit="q"):
            hits = index.retriever.search(beir.queries[qid], DEPTH, query_vector=vector)
            rows = index.ledger.get_chunks(index.generation, [h.chunk_id for h in hits])
            chunks = [(rows[h.chunk_id].document_id, rows[h.chunk_id].text) for h in hits if h.chunk_id in rows]
            scores, spent = scored(reranker, beir.queries[qid], [t for _, t in chunks], max(TOP_N))
            rankings["hybrid"][qid] = list(dict.fromkeys(d for d, _ in chunks))
            for n in TOP_N:
                rankings[f"rerank@{n}"][qid] = list(dict.fromkeys(d for d, _ in reorder(chunks, scores, n)))
                if n in spent:
                    latency[n].append(spent[n])
    finally:
        index.close()
    rows = []
    for name, ranking in rankings.items():
        metrics = score_rankings(qrels, ranking)[0]
        n = int(name.split("@")[1]) if "@" in name else None
        p50, p95 = percentiles(latency[n]) if n else (0.0, 0.0)
        rows.append([name, metrics["ndcg@10"], metrics["recall@100"], metrics["mrr@10"], p50, p95])
    return rows, latency, len(held)


def squad(reranker, settings: Settings, articles: int, n_questions: int, seed: int) -> tuple[list[list], int]:
    path = REPO.parent / "shared" / "data" / "squad" / "dev-v1.1.json"
    documents, questions = squad_articles(path, articles)
    questions = random.Random(seed).sample(questions, min(n_questions, len(questions)))
    titles = {d.document_id: d.title for d in documents}
    index = open_chunking_index("semantic", path, settings, documents, articles, DEFAULT_CACHE)
    services = index.services
    try:
        bodies = {c.chunk_id: chunk_body(c, titles[c.document_id])
                  for c in services.ledger.iter_chunks(services.generation.generation)}
        texts = {c.chunk_id: c.text for c in services.ledger.iter_chunks(services.generation.generation)}
        runs: dict[str, dict[str, list]] = {"hybrid": {}, "rerank@10": {}, "rerank@20": {}}
        for q in tqdm(questions, desc="squad", unit="q"):
            hits = services.retriever.search(q.text, 20)
            scores, _ = scored(reranker, q.text, [texts[h.chunk_id] for h in hits], 20)
            runs["hybrid"][q.question_id] = hits
            for n in (10, 20):
                runs[f"rerank@{n}"][q.question_id] = reorder(hits, scores, n)
    finally:
        index.close()
    return [[name, *answer_recall(hits, questions, bodies, ks=(1, 3)).values()] for name, hits in runs.items()], \
        len(questions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm-rerank", help="Reranker: registry name[@version] or folder.")
    parser.add_argument("--limit", type=int, default=80, help="Held-out SciFact queries measured (0: all).")
    parser.add_argument("--squad-articles", type=int, default=5)
    parser.add_argument("--squad-questions", type=int, default=80)
    args = parser.parse_args()

    settings = Settings(_env_file=None, rerank_model=args.model)
    reranker = build_reranker(settings)
    folder = Path(args.model) if (Path(args.model) / "metadata.json").is_file() else \
        RerankerRegistry(settings.rerankers_path).resolve(args.model).path
    metadata = read_metadata(folder)
    log(f"reranker {reranker.name}: {metadata['metrics']}")
    sci_rows, _, n_sci = scifact(reranker, metadata, settings, args.limit or 10**9)
    squad_rows, n_squad = squad(reranker, settings, args.squad_articles, args.squad_questions,
                                metadata["config"]["seed"])

    data = metadata["training_data"]
    scifact_info, metrics = data["scifact"], metadata["metrics"]
    lines = [
        f"### Reranking: hybrid vs hybrid + the trained cross-encoder (`{reranker.name}`)",
        "",
        f"The reranker: sentence-transformers CrossEncoder from the bundled all-MiniLM-L6-v2 weights, "
        f"{data['pairs']['train']} training pairs ({scifact_info['train_queries']} SciFact train queries, "
        f"{data.get('squad', {}).get('questions', 0)} SQuAD train questions; 1 positive + hard negatives from the "
        f"hybrid retriever each), {metrics['steps']} steps in {metrics['train_seconds']:.0f} s, max_length "
        f"{metadata['max_length']}; validation average precision {metrics.get('average_precision')}.",
        "",
        f"SciFact: {n_sci} held-out train queries, never trained on (the rest of the split: "
        f"{scifact_info['split']}, of {scifact_info['sampled_queries']} sampled judged train queries) over the "
        f"{scifact_info['sampled_documents']}-document "
        f"corpus sample the reranker was trained on (their judged documents + random others). Hybrid as served "
        f"(fused list {DEPTH} chunks deep); rerank@N: its top N reordered by the reranker. Added latency: the "
        f"reranker's ms per query for N chunks (p50 / p95, this CPU, while other jobs shared it).",
        "",
        "| retrieval | NDCG@10 | Recall@100 | MRR@10 | added ms p50 | added ms p95 |",
        "|---|---|---|---|---|---|",
    ]
    for name, ndcg, recall, mrr, p50, p95 in sci_rows:
        added = ("", "") if name == "hybrid" else (f"{p50:.0f}", f"{p95:.0f}")
        lines.append(f"| {name} | {ndcg:.3f} | {recall:.3f} | {mrr:.3f} | {added[0]} | {added[1]} |")
    lines += ["", f"SQuAD dev-v1.1: {n_squad} questions (seeded) of the first {args.squad_articles} articles, indexed "
                  "as whole articles by the service's pipeline; a hit is a retrieved chunk holding a gold answer.", "",
              "| retrieval | answer recall@1 | answer recall@3 |", "|---|---|---|"]
    lines += [f"| {name} | {r1:.3f} | {r3:.3f} |" for name, r1, r3 in squad_rows]
    table = "\n".join(lines)
    print(table)
    update_section("reranker", table)


if __name__ == "__main__":
    main()
