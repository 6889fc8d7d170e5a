"""What the three sides of bench/peers.py share: the plan they read, the timed runs, the result they write.

Standard library only (tqdm if present): it is imported by the service's side in the project's virtualenv
and by the LlamaIndex and Haystack sides in theirs. A side is run as ``python bench/peers_<side>.py PLAN OUT``:
PLAN is the JSON bench/peers.py wrote (see ``Plan``); OUT receives the JSON result (see ``result``).
Every side returns chunks as (document id, chunk text) pairs, and bench/peers.py scores them all with
the same code.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Chunk = tuple[str, str]  # (document id, chunk text)
Search = Callable[[str], Sequence[Chunk]]  # question -> the best chunks, best first


@dataclass
class Plan:
    embedding_model: str  # the bundled all-MiniLM-L6-v2 folder, passed to every framework's embedder
    chunk_tokens: int  # the service's effective chunk limit in MiniLM tokens
    overlap_tokens: int
    chunk_words: int  # the same limit in words (for word splitters), from the corpus's tokens per word
    overlap_words: int
    depth: int  # chunks kept after fusion (Recall@100 needs 100)
    candidates: int  # chunks each retriever hands to fusion (the service's RAG_CANDIDATES, as served)
    probe_k: int  # chunks counted per update probe
    documents: list[dict[str, str]]  # {"id", "title", "text"}
    queries: dict[str, str]  # judged query id -> text
    changed: list[dict[str, str]]  # the new versions of changed documents
    deleted: list[str]  # ids of deleted documents
    probes: dict[str, str]  # probe id -> question aimed at a changed or deleted document

    @staticmethod
    def read(path: Path) -> "Plan":
        return Plan(**json.loads(path.read_text(encoding="utf-8")))


def args() -> tuple[Plan, Path]:
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: {sys.argv[0]} PLAN.json OUT.json")
    return Plan.read(Path(sys.argv[1])), Path(sys.argv[2])


def progress(items, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="q", mininterval=5, file=sys.stderr)


class Clock:
    """Wall-clock seconds of a block, and this process's CPU seconds (all its threads), which other
    processes on a shared machine barely move: ``with Clock() as c: ...; c.seconds, c.cpu``."""

    def __enter__(self) -> "Clock":
        self.started, self.cpu_started = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started
        self.cpu = time.process_time() - self.cpu_started


def run_queries(search: Search, queries: dict[str, str]) -> tuple[dict[str, list[str]], list[float]]:
    """(document ids of each query's chunks, best first; per-query ms, query embedding included). One
    untimed query first: lazy loading and first-call set-up are no query's latency."""
    rankings, latencies = {}, []
    search(next(iter(queries.values()), "warm-up"))
    for qid, text in progress(queries.items(), "queries"):
        started = time.perf_counter()
        chunks = search(text)
        latencies.append(1000 * (time.perf_counter() - started))
        rankings[qid] = [doc for doc, _ in chunks]
    return rankings, latencies


def run_probes(search: Search, probes: dict[str, str], k: int) -> dict[str, list[Chunk]]:
    return {pid: [tuple(c) for c in search(text)[:k]] for pid, text in progress(probes.items(), "probes")}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write(out: Path, *, packages: Sequence[str], ingest: Clock, update: Clock, **fields: Any) -> None:
    """The result: system, versions (of `packages`), chunking, retrieval, ingest_s, ingest_cpu_s, chunks,
    rankings, latencies_ms, update_s, probes, store (every chunk after the update), notes, peak_rss_mib."""
    from importlib.metadata import version

    fields.update(versions={name: version(name) for name in packages}, ingest_s=ingest.seconds,
                  ingest_cpu_s=ingest.cpu, update_s=update.seconds, peak_rss_mib=round(peak_rss_mib(), 1))
    out.write_text(json.dumps(fields), encoding="utf-8")
