"""Ingest throughput: the whole pipeline (chunk, embed, Chroma, ledger, BM25) against raw encoding.

SciFact abstracts (the first --docs of corpus.jsonl) are ingested into an empty data directory
through ``Indexer.apply``, what an ingest job runs; then the same model encodes the same chunk texts,
nothing else. The raw encode is measured before and after the pipeline (the machine is shared: the
mean of the two is the reference). Then, on the same data: an ingest job changing 1% of the documents
(through the job path: stored payload, checkpoints, BM25 rebuild) against a full refresh (a new
generation, golden-query validation, switch). Also, on --encoder-docs documents, the same ratio with
the chunker's breakpoints from full sentence embeddings (RAG_CHUNK_BREAKPOINT_VECTORS=encoder),
the setting before this benchmark.

    python bench/ingest_throughput.py [--docs 500] [--encoder-docs 100] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import SCIFACT, update_section

from app.container import build_embedder, build_services
from app.settings import Settings
from app.worker import run_pending, submit_refresh
from ingestion.documents import Document
from ingestion.jobs import ingest_payload


def scifact_documents(n: int) -> list[Document]:
    documents = []
    with (SCIFACT / "corpus.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            documents.append(Document(record["_id"], record["text"], title=record.get("title", ""),
                                      source="scifact", created_at="2024-01-01T00:00:00+00:00"))
            if len(documents) == n:
                break
    return documents


class Stopwatch:
    """Wraps methods to add up the seconds spent in them (a coarse profile of the pipeline)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - started

        setattr(owner, name, timed)


def raw_encode(embedder, texts: list[str]) -> float:
    started = time.perf_counter()
    embedder.embed_passages(texts)
    return len(texts) / (time.perf_counter() - started)


def pipeline(settings: Settings, embedder, documents: list[Document]) -> dict:
    services = build_services(settings, load_generator=False, embedder=embedder)
    watch = Stopwatch()
    indexer = services.indexer()
    watch.wrap(services.chunker, "chunk_many", "chunk (incl. breakpoint vectors)")
    watch.wrap(embedder, "embed_passages", "encode chunks")
    watch.wrap(services.dense, "upsert", "Chroma upsert")
    watch.wrap(indexer, "rebuild_bm25", "BM25 rebuild")
    raw_encode(embedder, [d.text[:200] for d in documents[:32]])  # warm-up
    started = time.perf_counter()
    counts = indexer.apply(documents)
    seconds = time.perf_counter() - started
    del embedder.embed_passages  # the instance attribute; the class method is back
    texts = [c.text for c in services.ledger.iter_chunks(services.generation.generation)]
    return {"services": services, "counts": counts, "seconds": seconds, "texts": texts,
            "profile": watch.seconds}


def incremental_and_refresh(services, documents: list[Document]) -> dict:
    changed = [Document(d.document_id, d.text + " This abstract was revised.", title=d.title, source=d.source,
                        created_at=d.created_at) for d in documents[:: 100]]
    services.ledger.accept_job("ingest", ingest_payload(changed, []), respond=lambda job_id: {"job_id": job_id})
    started = time.perf_counter()
    run_pending(services)
    incremental = time.perf_counter() - started
    submit_refresh(services)
    started = time.perf_counter()
    results = run_pending(services)
    refresh = time.perf_counter() - started
    assert set(results.values()) == {"succeeded"}, results
    return {"changed": len(changed), "incremental_s": incremental, "refresh_s": refresh}


def measure(documents: list[Document], breakpoints: str, embedder, with_jobs: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(_env_file=None, data_dir=Path(tmp), load_generator=False, refresh_cron="",
                            chunk_breakpoint_vectors=breakpoints)
        result = pipeline(settings, embedder, documents)
        texts = result["texts"]
        before = raw_encode(embedder, texts)
        after = raw_encode(embedder, texts)
        raw = (before + after) / 2
        out = {"documents": len(documents), "chunks": len(texts), "pipeline_cps": len(texts) / result["seconds"],
               "raw_cps": raw, "raw_runs": (before, after), "seconds": result["seconds"],
               "profile": result["profile"]}
        if with_jobs:
            out.update(incremental_and_refresh(result["services"], documents))
        result["services"].ledger.close()
    out["ratio"] = out["pipeline_cps"] / out["raw_cps"]
    return out


def table(main: dict, encoder: dict | None) -> str:
    lines = [
        "| measure | value |", "|---|---|",
        f"| documents (first {main['documents']} SciFact abstracts) / chunks | {main['documents']} / {main['chunks']} |",
        f"| pipeline: chunk + embed + Chroma + ledger + BM25 | {main['pipeline_cps']:.1f} chunks/s "
        f"({main['seconds']:.0f} s) |",
        f"| raw encode, same model, same chunk texts | {main['raw_cps']:.1f} chunks/s "
        f"(runs: {main['raw_runs'][0]:.1f}, {main['raw_runs'][1]:.1f}) |",
        f"| **pipeline / raw encode** | **{100 * main['ratio']:.0f}%** (target ≥ 85%) |",
    ]
    if encoder:
        lines.append(f"| same, breakpoints from full sentence embeddings (before), {encoder['documents']} docs | "
                     f"{100 * encoder['ratio']:.0f}% ({encoder['pipeline_cps']:.1f} vs {encoder['raw_cps']:.1f} chunks/s) |")
    lines += [
        f"| ingest job changing 1% of the documents ({main['changed']}) | {main['incremental_s']:.1f} s |",
        f"| full refresh (new generation, validation, switch) | {main['refresh_s']:.1f} s |",
    ]
    total = main["seconds"]
    profile = ", ".join(f"{name} {100 * s / total:.0f}%" for name, s in main["profile"].items())
    return "\n".join(lines) + f"\n\nWhere the pipeline's time goes: {profile}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=500)
    parser.add_argument("--encoder-docs", type=int, default=100, help="0 skips the 'encoder' breakpoints run")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()

    embedder = build_embedder(Settings(_env_file=None))
    documents = scifact_documents(args.docs)
    main_run = measure(documents, "static", embedder, with_jobs=True)
    encoder_run = measure(documents[:args.encoder_docs], "encoder", embedder, with_jobs=False) if args.encoder_docs else None
    body = "## Ingest throughput\n\n" + table(main_run, encoder_run)
    print(body)
    if not args.no_write:
        update_section("ingest", body)


if __name__ == "__main__":
    main()
