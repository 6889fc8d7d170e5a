"""Ingest throughput: the whole pipeline (chunk, embed, Chroma, ledger, BM25) against raw encoding.

SciFact abstracts (the first --docs of corpus.jsonl) are ingested into an empty data directory
through ``Indexer.apply``, what an ingest job runs. The same model encodes the same chunk texts
(``Embedder.embed_passages``, nothing else) just before and just after the pipeline; the mean of the
two is the reference. The machine is shared, so wall-clock rates swing with other processes' load:
the ratio is given on wall-clock time and on this process's CPU time (all its threads), which other
processes barely move. Then, on the same data: an ingest job changing 1% of the documents (the job
path: stored payload, checkpoints, BM25 rebuild) against a full refresh (a new generation,
golden-query validation, switch). Also, on --encoder-docs documents, the same ratio with the chunker's
breakpoints from full sentence embeddings (RAG_CHUNK_BREAKPOINT_VECTORS=encoder), as before this change.

    python bench/ingest_throughput.py [--docs 500] [--encoder-docs 100] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
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


@dataclass
class Span:
    wall: float = 0.0
    cpu: float = 0.0  # process time: every thread of this process

    def __add__(self, other: "Span") -> "Span":
        return Span(self.wall + other.wall, self.cpu + other.cpu)


class timer:
    def __enter__(self) -> "timer":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.span = Span(time.perf_counter() - self.wall, time.process_time() - self.cpu)


class Stopwatch:
    """Wraps methods to add up the time spent in them (a coarse profile of the pipeline)."""

    def __init__(self) -> None:
        self.spans: dict[str, Span] = {}

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            with timer() as clock:
                result = original(*args, **kwargs)
            self.spans[label] = self.spans.get(label, Span()) + clock.span
            return result

        setattr(owner, name, timed)


def raw_encode(embedder, texts: list[str]) -> Span:
    with timer() as clock:
        embedder.embed_passages(texts)
    return clock.span


def pipeline(settings: Settings, embedder, documents: list[Document]) -> dict:
    services = build_services(settings, load_generator=False, embedder=embedder)
    raw_encode(embedder, [d.text[:200] for d in documents[:32]])  # warm-up
    texts = [c.text for chunks in services.chunker.chunk_many(documents) for c in chunks]
    before = raw_encode(embedder, texts)
    watch = Stopwatch()
    indexer = services.indexer()
    watch.wrap(services.chunker, "chunk_many", "chunking (incl. breakpoint vectors)")
    watch.wrap(embedder, "embed_passages", "encoding chunks")
    watch.wrap(services.dense, "upsert", "Chroma upserts")
    watch.wrap(indexer, "rebuild_bm25", "BM25 rebuild")
    with timer() as clock:
        indexer.apply(documents)
    profile = dict(watch.spans)  # the jobs that follow reuse the wrapped objects
    del embedder.embed_passages  # the instance attribute; the class method is back
    after = raw_encode(embedder, texts)
    stored = sorted(c.text for c in services.ledger.iter_chunks(services.generation.generation))
    assert stored == sorted(texts), "the pipeline stored other chunks than the chunker gives"
    return {"services": services, "chunks": len(texts), "pipeline": clock.span, "raw": (before, after),
            "profile": profile}


def incremental_and_refresh(services, documents: list[Document]) -> dict:
    changed = [Document(d.document_id, d.text + " This abstract was revised.", title=d.title, source=d.source,
                        created_at=d.created_at) for d in documents[::100]]
    services.ledger.accept_job("ingest", ingest_payload(changed, []), respond=lambda job_id: {"job_id": job_id})
    with timer() as incremental:
        run_pending(services)
    submit_refresh(services)
    with timer() as refresh:
        results = run_pending(services)
    assert set(results.values()) == {"succeeded"}, results
    return {"changed": len(changed), "incremental": incremental.span, "refresh": refresh.span}


def measure(documents: list[Document], breakpoints: str, embedder, with_jobs: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(_env_file=None, data_dir=Path(tmp), load_generator=False, refresh_cron="",
                            chunk_breakpoint_vectors=breakpoints)
        out = pipeline(settings, embedder, documents)
        if with_jobs:
            out.update(incremental_and_refresh(out["services"], documents))
        out.pop("services").ledger.close()
    n, (before, after) = out["chunks"], out["raw"]
    out["documents"] = len(documents)
    out["pipeline_cps"] = n / out["pipeline"].wall
    out["raw_cps"] = (n / before.wall + n / after.wall) / 2
    out["ratio_wall"] = out["pipeline_cps"] / out["raw_cps"]
    out["ratio_cpu"] = (n / out["pipeline"].cpu) / ((n / before.cpu + n / after.cpu) / 2)
    return out


def table(main: dict, encoder: dict | None) -> str:
    n, (before, after) = main["chunks"], main["raw"]
    lines = [
        "| measure | value |", "|---|---|",
        f"| documents (the first {main['documents']} of SciFact's 5,183 abstracts) / chunks | "
        f"{main['documents']} / {n} |",
        f"| pipeline: chunk + embed + Chroma + ledger + BM25 | {main['pipeline_cps']:.1f} chunks/s "
        f"({main['pipeline'].wall:.0f} s) |",
        f"| raw encode, same model, same chunk texts | {main['raw_cps']:.1f} chunks/s "
        f"(before: {n / before.wall:.1f}, after: {n / after.wall:.1f}) |",
        f"| **pipeline / raw encode** (wall clock; CPU time) | **{100 * main['ratio_wall']:.0f}%; "
        f"{100 * main['ratio_cpu']:.0f}%** (target ≥ 85%) |",
    ]
    if encoder:
        lines.append(f"| same ratio with breakpoints from full sentence embeddings (before), {encoder['documents']} "
                     f"documents | {100 * encoder['ratio_wall']:.0f}%; {100 * encoder['ratio_cpu']:.0f}% |")
    lines += [
        f"| ingest job changing 1% of the documents ({main['changed']}) | {main['incremental'].wall:.1f} s |",
        f"| full refresh of the {main['documents']} documents (new generation, validation, switch) | "
        f"{main['refresh'].wall:.1f} s |",
    ]
    cpu = main["pipeline"].cpu
    profile = ", ".join(f"{name} {100 * span.cpu / cpu:.1f}%" for name, span in main["profile"].items())
    return "\n".join(lines) + f"\n\nWhere the pipeline's CPU time goes: {profile}; the rest is ledger writes " \
                              "and bookkeeping."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=500)
    parser.add_argument("--encoder-docs", type=int, default=100, help="0 skips the 'encoder' breakpoints run")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()

    embedder = build_embedder(Settings(_env_file=None))
    documents = scifact_documents(args.docs)
    main_run = measure(documents, "static", embedder, with_jobs=True)
    encoder_run = None
    if args.encoder_docs:
        encoder_run = measure(documents[:args.encoder_docs], "encoder", embedder, with_jobs=False)
    body = "## Ingest throughput\n\n" + table(main_run, encoder_run)
    print(body)
    if not args.no_write:
        update_section("ingest", body)


if __name__ == "__main__":
    main()
