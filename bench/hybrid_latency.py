"""Hybrid retrieval latency (p50/p95) at 10k, 100k and 1M chunks, and memory/disk per chunk.

10k: the real SciFact index built by ``rag eval retrieval`` (real chunks, real MiniLM vectors) when it
is cached, else SciFact chunks embedded here. 100k and 1M: chunks of real SciFact sentences drawn at
random, with random unit vectors (384-d) and the service's chunk metadata. Built indexes are cached
under .cache/bench/ (1M takes a long while: run it once with nohup). Each size is measured in a fresh
process, so RSS growth belongs to that index alone. Queries are SciFact claims, embedded by MiniLM.

    python bench/hybrid_latency.py [--sizes 10000 100000 1000000] [--queries 200] [--build-only]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import (CACHE, REPO, folder_bytes, percentiles, random_unit_vectors, real_chunks, rss_bytes,
                    scifact_queries, synthetic_chunks, update_section)

from app.settings import Settings

BATCH = 5000
DIM = 384


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def settings() -> Settings:
    """The service's defaults, tuning file included (fusion, alpha and candidates as served)."""
    return Settings(_env_file=None)


# --- building -----------------------------------------------------------------------------------


def eval_index() -> dict | None:
    """The SciFact index cached by `rag eval retrieval`, if any (newest first)."""
    from ingestion.ledger import Ledger

    markers = sorted((REPO / ".cache" / "eval").glob("*/eval_index.json"), key=lambda p: p.stat().st_mtime,
                     reverse=True)
    for marker in markers:
        info = json.loads(marker.read_text())
        if info["key"].get("chunker") == "semantic" and "squad_articles" not in info["key"]:
            ledger = Ledger(marker.parent / "ledger.sqlite3")
            generation = ledger.live_generation()
            ledger.close()
            return {"kind": "SciFact, real chunks and vectors", "n": info["chunks"],
                    "chroma": str(marker.parent / "chroma"), "collection": generation.collection,
                    "bm25": str(marker.parent / "bm25" / f"g{generation.generation}")}
    return None


def metadata(i: int, text: str) -> dict:
    """What the service stores beside each vector (same keys, realistic sizes)."""
    import hashlib

    return {"document_id": f"doc-{i // 8:07d}", "section": "", "chunk_index": i % 8,
            "chunk_size_tokens": len(text) // 5, "created_at": "2026-01-01T00:00:00+00:00",
            "source": f"/data/corpus/part-{i // 100_000:03d}.jsonl",
            "content_hash": hashlib.sha256(text.encode()).hexdigest()}


def model_name(dim: int) -> str:
    return settings().embedding_model if dim == DIM else f"random-{dim}d"


def build(n: int, root: Path, *, real: bool, dim: int = DIM) -> dict:
    """Chroma collection + BM25 index of `n` chunks under `root` (resumes an interrupted Chroma build)."""
    from retrieval.bm25 import BM25Index
    from retrieval.dense import DenseIndex, chroma_client

    done = root / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    texts = real_chunks(n) if real else synthetic_chunks(n)
    ids = [f"c{i:08d}" for i in range(n)]
    metas = [metadata(i, t) for i, t in enumerate(texts)]
    if not (root / "bm25" / "CURRENT").exists():
        log(f"bm25: indexing {n:,} chunks")
        columns = {"document_id": [m["document_id"] for m in metas], "source": [m["source"] for m in metas],
                   "section": [""] * n}
        BM25Index.build(ids, texts, columns, show_progress=True).save(root / "bm25")
    dense = DenseIndex(chroma_client(path=root / "chroma"), "bench_chunks", embedding_model=model_name(dim),
                       dimension=dim, create=True)
    embedder = None
    if real:
        from app.container import build_embedder

        embedder = build_embedder(settings())
    start = dense.count() // BATCH * BATCH  # upserts are idempotent: redo the last partial batch
    started = time.perf_counter()
    for at in range(start, n, BATCH):
        stop = min(at + BATCH, n)
        vectors = (embedder.embed_passages(texts[at:stop]) if embedder is not None
                   else random_unit_vectors(stop - at, dim, seed=at))
        dense.upsert(ids[at:stop], vectors, metas[at:stop])
        rate = (stop - start) / (time.perf_counter() - started)
        log(f"chroma: {stop:,}/{n:,} ({rate:,.0f}/s)")
    info = {"kind": "SciFact chunks, MiniLM vectors" if real else "random SciFact sentences, random vectors",
            "n": n, "dim": dim, "chroma": str(root / "chroma"), "collection": "bench_chunks",
            "bm25": str(root / "bm25"),
            "chroma_upserts_per_s": round((n - start) / (time.perf_counter() - started), 1) if n > start else None}
    done.write_text(json.dumps(info, indent=2))
    return info


def index_for(n: int, dim: int = DIM) -> dict:
    if dim != DIM:
        return build(n, CACHE / f"hybrid-{n}-d{dim}", real=False, dim=dim)
    if n <= 20_000:
        found = eval_index()
        if found is not None:
            return found
    return build(n, CACHE / f"hybrid-{n}", real=n <= 20_000)


# --- measuring (in a fresh process) -------------------------------------------------------------


class RandomEmbedder:
    """Stands in for an encoder of another dimension (random unit query vectors)."""

    def __init__(self, dimension: int) -> None:
        self.dimension = dimension

    def embed_queries(self, texts: list[str]):
        return random_unit_vectors(len(texts), self.dimension, seed=len(texts))


def measure(info: dict, n_queries: int, candidates: int, ef_search: int | None) -> dict:
    from app.container import build_embedder
    from retrieval.bm25 import BM25Index
    from retrieval.dense import DenseIndex, chroma_client
    from retrieval.hybrid import HybridRetriever, QueryVectorCache

    dim = info.get("dim", DIM)
    embedder = build_embedder(settings()) if dim == DIM else RandomEmbedder(dim)
    queries = scifact_queries(n_queries)
    vectors = embedder.embed_queries(queries)
    rss0 = rss_bytes()
    bm25 = BM25Index.load(Path(info["bm25"]), mmap=True)
    rss_bm25_open = rss_bytes()
    for q in queries[:50]:
        bm25.search(q, candidates)
    rss_bm25 = rss_bytes()
    client = chroma_client(path=Path(info["chroma"]))
    dense = DenseIndex(client, info["collection"], embedding_model=model_name(dim), dimension=dim)
    if ef_search:
        dense.collection.modify(configuration={"hnsw": {"ef_search": ef_search}})
    for v in vectors[:50]:
        dense.search(v, candidates)
    rss_chroma = rss_bytes()
    n = info["n"]

    def run(retriever, **options) -> list[float]:
        times = []
        for q, v in zip(queries, vectors):
            started = time.perf_counter()
            retriever.search(q, 10, query_vector=v if options.get("vector") else None,
                             **{k: val for k, val in options.items() if k != "vector"})
            times.append(1000 * (time.perf_counter() - started))
        return times

    tuned = settings()
    fusion = dict(fusion=tuned.fusion, alpha=tuned.fusion_alpha, rrf_k=tuned.rrf_k, candidates=candidates)
    plain = HybridRetriever(embedder=embedder, dense=dense, bm25=bm25, **fusion)
    cached = HybridRetriever(embedder=embedder, dense=dense, bm25=bm25, query_cache=QueryVectorCache(4096), **fusion)
    run(plain, vector=True)  # warm-up pass
    results = {
        "bm25": percentiles(run(plain, vector=True, method="bm25")),
        "dense": percentiles(run(plain, vector=True, method="dense")),
        "hybrid": percentiles(run(plain, vector=True)),
        "hybrid_embed": percentiles(run(plain)),
    }
    run(cached)  # first ask fills the cache
    results["hybrid_cached"] = percentiles(run(cached))
    if dim != DIM:  # no real encoder of this size here: embedding latency is not measured
        for key in ("hybrid_embed", "hybrid_cached"):
            results[key] = (float("nan"), float("nan"))
    return {
        "n": n, "dim": dim, "kind": info["kind"], "candidates": candidates, "ef_search": ef_search,
        "queries": len(queries),
        **{f"{k}_p50": v[0] for k, v in results.items()}, **{f"{k}_p95": v[1] for k, v in results.items()},
        "bm25_disk_per_chunk": folder_bytes(Path(info["bm25"])) / n,
        "chroma_disk_per_chunk": folder_bytes(Path(info["chroma"])) / n,
        "bm25_rss_open_per_chunk": (rss_bm25_open - rss0) / n,
        "bm25_rss_per_chunk": (rss_bm25 - rss0) / n,
        "chroma_rss_per_chunk": (rss_chroma - rss_bm25) / n,
    }


# --- report -------------------------------------------------------------------------------------


def tables(rows: list[dict]) -> str:
    latency = ["| chunks | data | BM25 p50 / p95 | dense p50 / p95 | hybrid p50 / p95 | hybrid + query embedding "
               "p50 / p95 | hybrid, repeated question (cached vector) p50 / p95 |", "|---|---|---|---|---|---|---|"]
    memory = ["| chunks | BM25 disk B/chunk | BM25 RSS B/chunk (mmap open / after queries) | Chroma disk B/chunk "
              "| Chroma RSS B/chunk |", "|---|---|---|---|---|"]
    for r in rows:
        pair = lambda key: ("n/a" if r[key + "_p50"] != r[key + "_p50"]  # noqa: E731  (NaN: not measured)
                            else f"{r[key + '_p50']:.1f} / {r[key + '_p95']:.1f}")
        latency.append(f"| {r['n']:,} | {r['kind']} | {pair('bm25')} | {pair('dense')} | **{pair('hybrid')}** "
                       f"| {pair('hybrid_embed')} | {pair('hybrid_cached')} |")
        memory.append(f"| {r['n']:,} | {r['bm25_disk_per_chunk']:.0f} | {r['bm25_rss_open_per_chunk']:.0f} / "
                      f"{r['bm25_rss_per_chunk']:.0f} | {r['chroma_disk_per_chunk']:.0f} | "
                      f"{r['chroma_rss_per_chunk']:.0f} |")
    r = rows[-1]
    head = (f"### Hybrid retrieval latency ({r['dim']}-d, ms, top 10, {r['candidates']} candidates per retriever, "
            f"{settings().fusion} fusion, "
            f"{r['queries']} SciFact claims; Chroma HNSW ef_search {r['ef_search'] or 'default (100)'})\n\n")
    return head + "\n".join(latency) + f"\n\n### Memory and disk per chunk ({r['dim']}-d)\n\n" + "\n".join(memory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--candidates", type=int, default=None, help="default: the service's RAG_CANDIDATES")
    parser.add_argument("--ef-search", type=int, default=None)
    parser.add_argument("--dim", type=int, default=DIM, help="vector size; other than 384: random vectors, and "
                        "the report goes to its own section")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: JSON of one index, in a child process
    args = parser.parse_args()
    candidates = args.candidates or Settings(_env_file=None).candidates
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure), args.queries, candidates, args.ef_search)))
        return
    infos = [index_for(n, args.dim) for n in args.sizes]
    if args.build_only:
        return
    rows = []
    for info in infos:
        log(f"measuring {info['n']:,} chunks")
        command = [sys.executable, __file__, "--measure", json.dumps(info), "--queries", str(args.queries),
                   "--candidates", str(candidates)] + (["--ef-search", str(args.ef_search)] if args.ef_search else [])
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    body = tables(rows)
    print(body)
    if not args.no_write:
        name = "hybrid" if args.dim == DIM else f"hybrid-{args.dim}d"
        update_section(name if candidates == settings().candidates else f"{name}-c{candidates}", body)


if __name__ == "__main__":
    main()
