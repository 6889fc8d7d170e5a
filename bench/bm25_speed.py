"""BM25 query latency: our bm25s index against rank-bm25 (BM25Okapi) on the same chunks and tokens.

Both get the tokens of the service's tokenizer (bm25s, English Snowball stemming, English stop words);
each query's tokens are de-duplicated for both, as ``BM25Index.search`` does. rank-bm25 scores every
chunk in Python, so it runs on few queries at 100k. Agreement is overlap@10 of the two top-10 lists.

    python bench/bm25_speed.py [--sizes 10000 100000] [--queries 200] [--slow-queries 20]
"""

from __future__ import annotations

import argparse
import time

import bm25s
import numpy as np
from common import percentiles, real_chunks, scifact_queries, synthetic_chunks, timed, update_section
from rank_bm25 import BM25Okapi

from retrieval.bm25 import BM25Index


def corpus(n: int) -> tuple[str, list[str]]:
    if n <= 10_000:
        return "SciFact chunks", real_chunks(n)
    return "SciFact sentences, mixed", synthetic_chunks(n)


def tokens(index: BM25Index, texts: list[str]) -> list[list[str]]:
    """The stemmed, stop-worded tokens the index itself saw (its vocabulary is never extended)."""
    return index.tokenizer.tokenize(texts, update_vocab="never", return_as="string", show_progress=False)


def top10(okapi, tokens: list[str], k: int = 10) -> list[int]:
    scores = okapi.get_scores(tokens)
    top = np.argpartition(-scores, k - 1)[:k]
    return top[np.argsort(-scores[top], kind="stable")].tolist()


def run_size(n: int, queries: list[str], slow_queries: int) -> dict:
    kind, texts = corpus(n)
    ids = [str(i) for i in range(n)]
    build_ms, index = timed(BM25Index.build, ids, texts, {})
    # The same tokens for rank-bm25: the index's own tokenizer, as strings.
    started = time.perf_counter()
    corpus_tokens = tokens(index, texts)
    okapi = BM25Okapi(corpus_tokens)
    okapi_build_ms = 1000 * (time.perf_counter() - started)
    robertson = bm25s.BM25(method="robertson")  # rank-bm25's idf, to show the rankings are the same
    robertson.index(corpus_tokens, show_progress=False)

    ours_ms, ours_top = [], []
    for query in queries:
        ms, hits = timed(index.search, query, 10)
        ours_ms.append(ms)
        ours_top.append([int(cid) for cid, _ in hits])
    theirs_ms, overlaps, same_idf = [], [], []
    for query, top in zip(queries[:slow_queries], ours_top):
        ms, theirs = timed(lambda q: top10(okapi, list(dict.fromkeys(tokens(index, [q])[0]))), query)
        theirs_ms.append(ms)
        overlaps.append(len(set(theirs) & set(top)) / 10)
        same_idf.append(len(set(theirs) & set(top10(robertson, list(dict.fromkeys(tokens(index, [query])[0]))))) / 10)
    p50, p95 = percentiles(ours_ms)
    r50, r95 = percentiles(theirs_ms)
    return {"chunks": n, "corpus": kind, "bm25s_p50": p50, "bm25s_p95": p95, "rank_p50": r50, "rank_p95": r95,
            "speedup": r50 / p50, "overlap": float(np.mean(overlaps)),
            "overlap_robertson": float(np.mean(same_idf)), "queries": len(queries),
            "slow_queries": len(theirs_ms), "build_s": build_ms / 1000, "rank_build_s": okapi_build_ms / 1000}


def table(rows: list[dict]) -> str:
    lines = ["| chunks | corpus | bm25s p50 / p95 ms | rank-bm25 p50 / p95 ms | speedup (p50) | overlap@10 "
             "| overlap@10, bm25s with Robertson idf | build s (bm25s / rank-bm25) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['chunks']:,} | {r['corpus']} | {r['bm25s_p50']:.2f} / {r['bm25s_p95']:.2f} "
                     f"({r['queries']} q) | {r['rank_p50']:.1f} / {r['rank_p95']:.1f} ({r['slow_queries']} q) "
                     f"| {r['speedup']:.0f}x | {r['overlap']:.3f} | {r['overlap_robertson']:.3f} "
                     f"| {r['build_s']:.1f} / {r['rank_build_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200, help="queries for bm25s")
    parser.add_argument("--slow-queries", type=int, default=20, help="queries for rank-bm25 (slow)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    queries = scifact_queries(args.queries)
    rows = [run_size(n, queries, args.slow_queries) for n in args.sizes]
    body = ("### BM25: bm25s (our `BM25Index`) vs rank-bm25 `BM25Okapi`\n\n"
            "Same chunks, same tokens (bm25s tokenizer, English stemming + stop words), SciFact claims as queries; "
            "latency is one query end to end (tokenize, score every chunk, top 10). overlap@10: shared chunks of the "
            "two top-10 lists. Our index uses Lucene's idf, rank-bm25 Robertson's, so a few rankings differ; a bm25s "
            "index with Robertson's idf on the same tokens shows the two libraries rank alike (left: differences "
            "from ties and from rank-bm25's floor for terms in over half the chunks).\n\n" + table(rows))
    print(body)
    if not args.no_write:
        update_section("bm25", body)


if __name__ == "__main__":
    main()
