"""Encoding backends side by side (torch, ONNX Runtime fp32, ONNX Runtime int8, OpenVINO): chunks/s, agreement
with torch's vectors, retrieval quality, and query latency, in one run on the same machine.

- Throughput: the same real chunks (SciFact abstracts cut into ~6-sentence windows, bench/common.py) through
  each backend's Embedder, same batch size (RAG_EMBEDDING_BATCH_SIZE) and threads, in rounds that rotate the
  backends (the median round is reported: other work on the machine hits every backend alike).
- Quality: NDCG@10 on SciFact train judgments through `rag eval retrieval`'s code (app/evaluation: the real
  pipeline indexes the corpus with each backend's passage vectors; dense and hybrid as served). To keep four
  index builds affordable on 2 cores the corpus is every judged document plus random others (--docs in all).
- Latency: hybrid search over the 100k-chunk bench index (bench/hybrid_latency.py; random vectors, so every
  backend searches the same index) with the query embedded by each backend, one query at a time. (1M chunks:
  hybrid_latency.py's table; the query embedding costs the same there.) `--latency-only --index-chunks 1000000`
  measures only this, over the 1M-chunk index (built once, about 35 min of Chroma upserts on 2 cores), into its
  own section.

    python bench/encoding_backends.py [--chunks 192] [--rounds 3] [--docs 1200] [--queries 200]
    python bench/encoding_backends.py --latency-only --index-chunks 1000000
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
from common import CACHE, SCIFACT, percentiles, real_chunks, scifact_queries, update_section
from tqdm import tqdm

from app.settings import Settings

BACKENDS = ("torch", "onnx", "onnx-int8", "openvino")
OUT = CACHE / "encoding"
BLOCK = 20  # latency: queries per backend in a row


def settings_for(backend: str) -> Settings:
    """The service's defaults (tuning file included) with this backend; exports cached under .cache/bench."""
    return Settings(_env_file=None, embedding_backend=backend, model_cache_dir=OUT / "models")


def folder_mb(path: Path | None) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20 if path else float("nan")


def throughput(chunks: list[str], rounds: int) -> dict[str, dict]:
    import torch

    from app.container import build_embedder

    embedders, rows = {}, {}
    for backend in BACKENDS:
        started = time.perf_counter()
        embedders[backend] = build_embedder(settings_for(backend))
        rows[backend] = {"load_s": time.perf_counter() - started, "exported_now": embedders[backend].exported_now,
                         "files_mb": folder_mb(embedders[backend].exported_to), "rates": []}
        embedders[backend].embed_passages(chunks[:32])  # warm-up
    vectors = {}
    with tqdm(total=rounds * len(BACKENDS) * len(chunks), desc="encode", unit="chunk") as bar:
        for r in range(rounds):
            for backend in BACKENDS[r % len(BACKENDS):] + BACKENDS[:r % len(BACKENDS)]:
                started = time.perf_counter()
                vectors[backend] = embedders[backend].embed_passages(chunks, on_batch=bar.update)
                rows[backend]["rates"].append(len(chunks) / (time.perf_counter() - started))
    for backend, row in rows.items():
        cosine = (vectors[backend] * vectors["torch"]).sum(axis=1)
        row.update(chunks_per_s=float(np.median(row["rates"])), cos_min=float(cosine.min()),
                   cos_mean=float(cosine.mean()), threads=torch.get_num_threads())
    return rows


def subset_corpus(qrels: Path, docs: int) -> Path:
    """Every document judged in `qrels` plus random others (seed 0) up to `docs`, as a BEIR corpus.jsonl."""
    judged = {line.split("\t")[1] for line in qrels.read_text().splitlines()[1:] if line.strip()}
    lines = (SCIFACT / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    keep = [line for line in lines if json.loads(line)["_id"] in judged]
    others = [line for line in lines if json.loads(line)["_id"] not in judged]
    keep += random.Random(0).sample(others, max(0, min(len(others), docs - len(keep))))
    path = OUT / f"scifact-{qrels.stem}-{len(keep)}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text("\n".join(keep) + "\n", encoding="utf-8")
    return path


def quality(qrels: Path, docs: int) -> tuple[dict[str, dict], dict]:
    from app.evaluation.retrieval import evaluate

    corpus = subset_corpus(qrels, docs)
    reports = {}
    for backend in BACKENDS:
        print(f"{time.strftime('%H:%M:%S')} quality: {backend}", flush=True)
        reports[backend] = evaluate(corpus, SCIFACT / "queries.jsonl", qrels, settings_for(backend),
                                    cache_root=OUT / "eval", split_name=f"SciFact {qrels.stem}")
    first = reports["torch"]
    return reports, {"documents": first["documents"], "chunks": first["chunks"], "queries": first["queries"],
                     "hybrid": first["hybrid"]}


def latency(n_queries: int, n_chunks: int = 100_000) -> tuple[dict[str, dict], int]:
    """Per backend: query embedding alone, and hybrid search with it, over the `n_chunks` bench index."""
    from hybrid_latency import DIM, index_for, model_name

    from app.container import build_embedder
    from retrieval.bm25 import BM25Index
    from retrieval.dense import DenseIndex, chroma_client
    from retrieval.hybrid import HybridRetriever

    info = index_for(n_chunks)
    bm25 = BM25Index.load(Path(info["bm25"]), mmap=True)
    dense = DenseIndex(chroma_client(path=Path(info["chroma"])), info["collection"], embedding_model=model_name(DIM),
                       dimension=DIM)
    served = settings_for("torch")
    retrievers = {b: HybridRetriever(embedder=build_embedder(settings_for(b)), dense=dense, bm25=bm25,
                                     fusion=served.fusion, alpha=served.fusion_alpha, rrf_k=served.rrf_k,
                                     candidates=served.candidates) for b in BACKENDS}
    queries = scifact_queries(n_queries)
    times: dict[str, dict[str, list[float]]] = {b: {"embed": [], "search": [], "both": []} for b in BACKENDS}
    for retriever in retrievers.values():
        for q in queries[:20]:  # warm-up: caches, HNSW pages
            retriever.search(q, 10)
    # Blocks of BLOCK queries, the backends in rotating order: load from other work on the machine hits every
    # backend alike, and ONNX Runtime's and OpenVINO's thread pools, which spin for a moment after a call,
    # slow only the first query of the next block (per-query interleaving would slow every one).
    order = list(retrievers)
    blocks = [(start, order[(start // BLOCK) % len(order):] + order[:(start // BLOCK) % len(order)])
              for start in range(0, len(queries), BLOCK)]
    for start, rotation in tqdm(blocks, desc="latency", unit="block"):
        for backend in rotation:
            retriever = retrievers[backend]
            for q in queries[start:start + BLOCK]:
                started = time.perf_counter()
                vector = retriever.embedder.embed_queries([q])[0]
                embedded = time.perf_counter()
                retriever.search(q, 10, query_vector=vector)
                done = time.perf_counter()
                for key, ms in (("embed", embedded - started), ("search", done - embedded),
                                ("both", done - started)):
                    times[backend][key].append(1000 * ms)
    return {b: {k: percentiles(v) for k, v in t.items()} for b, t in times.items()}, info["n"]


def tables(speed: dict, reports: dict, about: dict, lat: dict, n_index: int, chunks: int, rounds: int) -> str:
    from ingestion.embedder import vector_space

    base = speed["torch"]["chunks_per_s"]
    lines = [f"### Encoding backends: chunks/s, agreement, NDCG@10, query latency (all-MiniLM-L6-v2, "
             f"batch {settings_for('torch').embedding_batch_size}, {speed['torch']['threads']} threads)", "",
             f"Encoding: {chunks} SciFact chunks (abstracts in ~6-sentence windows), median of {rounds} rounds "
             "that rotate the backends; cosine: each chunk's vector against torch's.", "",
             "| backend | chunks/s | vs torch | cosine to torch min / mean | exported files MB | first load s "
             "| index records |", "|---|---|---|---|---|---|---|"]
    for b, row in speed.items():
        lines.append(f"| {b} | {row['chunks_per_s']:.1f} | {row['chunks_per_s'] / base:.2f}x | "
                     f"{row['cos_min']:.6f} / {row['cos_mean']:.6f} | "
                     + ("-" if b == "torch" else f"{row['files_mb']:.0f}")
                     + f" | {row['load_s']:.1f}{' (export)' if row['exported_now'] else ''} "
                     f"| `{vector_space('<model>', b)}` |")
    h = about["hybrid"]
    lines += ["", f"Quality: SciFact train, {about['queries']} queries over {about['documents']} documents (every "
              f"judged one plus random others) = {about['chunks']} chunks, indexed by each backend; hybrid = "
              f"{h['fusion']} (alpha {h['fusion_alpha']}, {h['candidates']} candidates per retriever).", "",
              "| backend | dense NDCG@10 | Δ vs torch | hybrid NDCG@10 | Δ vs torch | hybrid Recall@100 "
              "| index build s (when built) |", "|---|---|---|---|---|---|---|"]
    ref = reports["torch"]["methods"]
    for b, report in reports.items():
        m = report["methods"]
        lines.append(f"| {b} | {m['dense']['ndcg@10']:.4f} | {m['dense']['ndcg@10'] - ref['dense']['ndcg@10']:+.4f} "
                     f"| {m['hybrid']['ndcg@10']:.4f} | {m['hybrid']['ndcg@10'] - ref['hybrid']['ndcg@10']:+.4f} "
                     f"| {m['hybrid']['recall@100']:.4f} | {report['index']['build_s']} |")
    return "\n".join(lines + ["", latency_table(lat, n_index)])


def latency_table(lat: dict, n_index: int) -> str:
    lines = [f"Latency (ms, one query at a time, in blocks of {BLOCK} per backend in rotating order): hybrid "
             f"top 10 over the {n_index:,}-"
             "chunk bench index (random SciFact sentences, random vectors: the same index for every backend).", "",
             "| backend | query embedding p50 / p95 | hybrid, vector given p50 / p95 | hybrid + query embedding "
             "p50 / p95 |", "|---|---|---|---|"]
    for b, row in lat.items():
        pair = lambda key: f"{row[key][0]:.1f} / {row[key][1]:.1f}"  # noqa: E731
        lines.append(f"| {b} | {pair('embed')} | {pair('search')} | **{pair('both')}** |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--docs", type=int, default=1200)
    parser.add_argument("--qrels", type=Path, default=SCIFACT / "qrels" / "train.tsv")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--index-chunks", type=int, default=100_000, help="size of the latency bench index")
    parser.add_argument("--latency-only", action="store_true",
                        help="only the latency table, into its own section (encoding-backends-latency-<N>)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    if args.latency_only:
        lat, n_index = latency(args.queries, args.index_chunks)
        body = (f"#### Encoding backends: query latency over {n_index:,} chunks\n\n"
                + latency_table(lat, n_index))
        print(body)
        if not args.no_write:
            update_section(f"encoding-backends-latency-{n_index}", body)
        return
    chunks = real_chunks(5000)[::25][:args.chunks]  # spread over the corpus, not its first abstracts
    speed = throughput(chunks, args.rounds)
    reports, about = quality(args.qrels, args.docs)
    lat, n_index = latency(args.queries, args.index_chunks)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps({"speed": speed, "about": about, "latency": lat,
                                                  "quality": {b: r["methods"] for b, r in reports.items()}}, indent=2))
    body = tables(speed, reports, about, lat, n_index, len(chunks), args.rounds)
    print(body)
    if not args.no_write:
        update_section("encoding-backends", body)


if __name__ == "__main__":
    main()
