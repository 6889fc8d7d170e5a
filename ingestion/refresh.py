"""The full refresh: a new index generation built beside the live one, validated, then switched in.

A refresh job
1. creates a 'building' generation (a new Chroma collection and BM25 folder), recorded in the job;
2. builds it from the ledger's live documents with the current chunker and embedder, one checkpointed
   step per batch: ``generation_documents`` records the version of every document it holds;
3. validates it: Chroma, BM25 and ledger hold the same number of chunks; the chunk count is within the
   configured ratio of the live one; golden queries reach the configured recall;
4. under the service's write lock (no ingest job runs meanwhile) catches up the documents that changed
   since they were built (their ledger version differs, or they are no longer live), then switches the
   live pointer in one transaction and hands the new indexes to the service;
5. drops the generations that the switch retired (Chroma collection, BM25 folder, ledger rows).
Webhook changes during the build go to the live generation as usual and reach the new one in step 2's
later passes or in step 4: nothing is lost, and no ingest job waits for the build.

A rollback makes the previous generation live again after the same catch-up (its document versions
were snapshotted when it was switched out), so it also holds every change made since.

The embedding model: a generation is built, caught up, validated and served with the model it records
(``GenerationRow.embedding_model``). A new refresh builds with ``RefreshConfig.embedding_model`` (or the
model its job names, ``payload["embedding_model"]``: ``rag refresh --embedding-model``); a resumed job
continues with the model its generation records; a rollback returns to the model of the generation it
makes live. ``on_switch`` receives the generation row, so the service swaps query embedder and indexes
in one step (app/container.py).

Crash safety: every step writes Chroma before the ledger transaction that records it (orphans, never
missing vectors), so a resumed job first removes the building generation's orphans, then continues
with the documents still pending. A failed validation or error marks the building generation failed
and drops it; the live generation keeps serving.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import sqlite3
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingestion.chunker import split_sentences
from ingestion.indexer import DELETE_STEP, Chunker, Indexer, PassageEmbedder, write_chunks
from ingestion.jobs import JobInterrupted, Report
from ingestion.ledger import DocumentRow, GenerationRow, JobRow, Ledger
from ingestion.storage_errors import is_disk_full
from retrieval.bm25 import BM25Index
from retrieval.dense import DenseIndex, EmbeddingModelMismatch, drop_collection

log = logging.getLogger(__name__)

REFRESH_KINDS = ("refresh", "rollback")
Step = Callable[[sqlite3.Connection, int, int], None]  # (open transaction, documents, chunks written)


class RefreshFailed(RuntimeError):
    """The new generation was not switched in (validation failed, nothing to roll back to ...)."""


@dataclass(frozen=True)
class RefreshConfig:
    collection_prefix: str
    embedding_model: str
    chunker_config: dict[str, Any]
    bm25_language: str = "english"
    batch_documents: int = 64
    min_chunk_ratio: float = 0.8
    max_chunk_ratio: float = 1.25
    golden_queries: Path | None = None
    golden_sample: int = 20
    golden_top_k: int = 10
    min_recall: float = 0.8


@dataclass
class RefreshContext:
    """What a refresh needs from the composition root."""

    ledger: Ledger
    chroma: Any  # a chromadb client
    embedder: PassageEmbedder  # ingestion.embedder.Embedder of RefreshConfig.embedding_model
    chunker: Chunker  # ingestion.chunker.SemanticChunker
    bm25_root: Callable[[GenerationRow], Path]
    make_retriever: Callable[[DenseIndex, BM25Index, PassageEmbedder], Any]  # -> retrieval.hybrid.HybridRetriever
    # another recorded embedding model's embedder and chunker (None: every generation uses `embedder`)
    embedder_for: Callable[[str], PassageEmbedder] | None = None
    chunker_for: Callable[[PassageEmbedder], Chunker] | None = None
    on_switch: Callable[[GenerationRow, DenseIndex, BM25Index], None] = lambda *_: None
    switch_lock: AbstractContextManager[object] = field(default_factory=nullcontext)
    chroma_path: Path | None = None  # embedded Chroma: where dropped collections' files are reclaimed
    should_stop: Callable[[], bool] = lambda: False
    report: Report | None = None


def _models(ctx: RefreshContext, model: str) -> tuple[PassageEmbedder, Chunker]:
    """(embedder, chunker) of the embedding model ``model``; without ``embedder_for``, the context's own."""
    if ctx.embedder_for is None:
        return ctx.embedder, ctx.chunker
    embedder = ctx.embedder_for(model)
    return embedder, ctx.chunker_for(embedder) if ctx.chunker_for else ctx.chunker


# --- building one generation ---------------------------------------------------------------------


@dataclass
class GenerationBuilder:
    """Brings a generation that is not live to the ledger's live documents (chunks, vectors, BM25)."""

    ledger: Ledger
    generation: GenerationRow
    dense: DenseIndex
    indexer: Indexer  # of the same generation: chunker, embedder, BM25 rebuild, reconcile
    batch_documents: int = 64

    def pending(self) -> int:
        return self.ledger.count_documents_to_build(self.generation.generation)

    def sync(self, on_step: Step | None = None, after_step: Callable[[], None] | None = None) -> int:
        """Catch up until nothing is pending; returns the documents rebuilt or removed.
        `on_step(db, documents, chunks)` runs inside each step's transaction, `after_step()` after it."""
        changed = 0
        gen = self.generation.generation
        while rows := self.ledger.documents_to_build(gen, self.batch_documents):
            changed += self._build(rows, on_step)
            if after_step:
                after_step()
        while ids := self.ledger.documents_to_unbuild(gen, DELETE_STEP):
            changed += self._unbuild(ids, on_step)
            if after_step:
                after_step()
        return changed

    def _build(self, rows: Sequence[DocumentRow], on_step: Step | None) -> int:
        gen = self.generation.generation
        chunked = self.indexer.chunk([row.document for row in rows])
        planned = [(chunks, self.ledger.document_chunk_ids(gen, row.document.document_id))
                   for row, chunks in zip(rows, chunked)]

        def record(db: sqlite3.Connection, written: int, removed: int) -> None:
            self.ledger.record_built(db, gen, [(row.document.document_id, row.version) for row in rows])
            if on_step:
                on_step(db, len(rows), written)

        write_chunks(self.ledger, gen, self.dense, self.indexer.embedder, planned, record=record,
                     on_embedded=self.indexer.on_embedded)
        return len(rows)

    def _unbuild(self, document_ids: Sequence[str], on_step: Step | None) -> int:
        gen = self.generation.generation
        removed: list[str] = []
        with self.ledger.transaction() as db:
            for document_id in document_ids:
                ids = self.ledger.document_chunk_ids(gen, document_id)
                self.ledger.delete_chunks(db, gen, ids)
                removed.extend(ids)
            self.ledger.forget_built(db, gen, document_ids)
            if on_step:
                on_step(db, len(document_ids), 0)
        self.dense.delete(removed)
        return len(document_ids)


# --- validation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GoldenQuery:
    """Passes when a top-k chunk belongs to one of `document_ids`, or (sampled queries: the query is a
    sentence of the corpus, which boilerplate may repeat in many documents) contains `verbatim`."""

    query: str
    document_ids: tuple[str, ...]
    verbatim: str | None = None


def check_integrity(ledger: Ledger, generation: int, dense: DenseIndex, bm25: BM25Index) -> dict[str, int]:
    counts = {"ledger_chunks": ledger.count_chunks(generation), "chroma_chunks": dense.count(),
              "bm25_chunks": len(bm25)}
    if len(set(counts.values())) != 1:
        raise RefreshFailed(f"generation {generation} is inconsistent: {counts}")
    return counts


def check_chunk_ratio(new_chunks: int, live_chunks: int, config: RefreshConfig) -> float | None:
    """new / live chunk count (None when the live generation is empty: nothing to compare with)."""
    if live_chunks == 0:
        return None
    ratio = new_chunks / live_chunks
    if not config.min_chunk_ratio <= ratio <= config.max_chunk_ratio:
        raise RefreshFailed(
            f"chunk count {new_chunks} is {ratio:.3f} x the live generation's {live_chunks}, outside "
            f"[{config.min_chunk_ratio}, {config.max_chunk_ratio}] (RAG_REFRESH_MIN/MAX_CHUNK_RATIO)"
        )
    return ratio


def load_golden_queries(path: Path) -> list[GoldenQuery]:
    """JSONL: {"query": str, "document_id": str} or {"query": str, "document_ids": [str, ...]} per line."""
    queries: list[GoldenQuery] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RefreshFailed(f"golden queries {path}: not readable ({exc})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            ids = record.get("document_ids") or [record["document_id"]]
            if not isinstance(record["query"], str) or not all(isinstance(i, str) for i in ids):
                raise TypeError("query and document ids must be strings")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RefreshFailed(f"golden queries {path}:{number}: {exc!r}") from None
        queries.append(GoldenQuery(record["query"], tuple(ids)))
    return queries


def sample_golden_queries(ledger: Ledger, n: int, seed: int) -> list[GoldenQuery]:
    """A sentence of each of `n` live documents, chosen at random (seeded), must find its document."""
    total = ledger.count_documents()
    rng = random.Random(seed)
    queries = []
    for offset in sorted(rng.sample(range(total), min(n, total))):
        row = ledger.live_document_at(offset)
        if row is None:
            continue
        sentences = [s for s in split_sentences(row.text) if 6 <= len(s.split()) <= 60]
        query = rng.choice(sentences) if sentences else " ".join(row.text.split()[:40])
        queries.append(GoldenQuery(query, (row.document_id,), verbatim=query if sentences else None))
    return queries


def golden_recall(queries: Sequence[GoldenQuery], retriever: Any, ledger: Ledger, generation: int,
                  top_k: int) -> tuple[float | None, list[str]]:
    """(share of queries whose document is in the top k, the queries that missed); None when no query
    names a live document."""
    hits, asked, missed = 0, 0, []
    for golden in queries:
        wanted = {d for d in golden.document_ids if (row := ledger.get_document(d)) and row.state == "live"}
        if not wanted:
            continue  # its documents were deleted since: nothing to find
        asked += 1
        found = retriever.search(golden.query, top_k)
        chunks = ledger.get_chunks(generation, [h.chunk_id for h in found]).values()
        if wanted & {c.document_id for c in chunks} or (golden.verbatim and any(golden.verbatim in c.text
                                                                                 for c in chunks)):
            hits += 1
        else:
            missed.append(golden.query[:80])
    return (hits / asked if asked else None), missed


def validate(ctx: RefreshContext, config: RefreshConfig, generation: GenerationRow, dense: DenseIndex,
             bm25: BM25Index, embedder: PassageEmbedder) -> dict[str, Any]:
    """The validation report; raises RefreshFailed with the reason when the generation must not go live."""
    ledger = ctx.ledger
    report: dict[str, Any] = check_integrity(ledger, generation.generation, dense, bm25)
    live = ledger.live_generation()
    live_chunks = ledger.count_chunks(live.generation) if live else 0
    report["chunk_ratio"] = check_chunk_ratio(report["ledger_chunks"], live_chunks, config)
    if config.golden_queries is not None:
        queries = load_golden_queries(config.golden_queries)
    else:
        queries = sample_golden_queries(ledger, config.golden_sample, seed=generation.generation)
    recall, missed = golden_recall(queries, ctx.make_retriever(dense, bm25, embedder), ledger, generation.generation,
                                   config.golden_top_k)
    report.update(golden_queries=len(queries), golden_recall=recall)
    if recall is not None and recall < config.min_recall:
        raise RefreshFailed(f"golden query recall@{config.golden_top_k} {recall:.3f} is below "
                            f"{config.min_recall} (RAG_REFRESH_MIN_RECALL); missed: {missed[:5]}")
    return report


# --- the jobs ----------------------------------------------------------------------------------


def run_refresh_job(ctx: RefreshContext, config: RefreshConfig, job: JobRow) -> dict[str, Any]:
    """Run (or resume) a refresh or rollback job; returns its result. On failure the live generation
    is untouched and a generation this job was building is marked failed and dropped."""
    try:
        if job.kind == "rollback":
            return _rollback(ctx, config, job)
        return _refresh(ctx, config, job)
    except JobInterrupted:
        raise
    except Exception as exc:
        current = ctx.ledger.get_job(job.job_id)
        number = (current.progress if current else job.progress).get("generation")
        building = ctx.ledger.generation(number) if number is not None else None
        if building is not None and building.state == "building":
            ctx.ledger.set_generation_state(building.generation, "failed")
            if not is_disk_full(exc, ctx.chroma_path):  # a client that hit a full disk may hang: dropped later
                drop_retired_generations(ctx)
        raise


def _refresh(ctx: RefreshContext, config: RefreshConfig, job: JobRow) -> dict[str, Any]:
    ledger = ctx.ledger
    progress = dict(job.progress)
    generation = ledger.generation(progress["generation"]) if "generation" in progress else None
    if generation is None:
        model = (job.payload or {}).get("embedding_model") or config.embedding_model  # pinned when asked for
        embedder, _ = _models(ctx, model)
        generation = ledger.create_generation(config.collection_prefix, model, embedder.dimension,
                                              {**config.chunker_config, "embedding_model": model}, job_id=job.job_id)
        progress["generation"] = generation.generation
    if generation.state == "live":  # the switch committed before the process died
        return _after_switch(ctx, job, progress)
    if generation.state != "building":
        raise RefreshFailed(f"generation {generation.generation} is {generation.state}, not building")
    embedder, chunker = _models(ctx, generation.embedding_model)  # a resumed job: the model it began with
    dense = DenseIndex(ctx.chroma, generation.collection, embedding_model=generation.embedding_model,
                       dimension=embedder.dimension, create=True)
    builder = _builder(ctx, config, generation, dense, embedder, chunker)
    if progress.get("attempts", 1) > 1:
        builder.indexer.reconcile(bm25=False)  # vectors of a step that never committed
    bm25 = _build(ctx, builder, job, progress)
    _report(ctx, job, progress, phase="validating")
    progress["validation"] = validate(ctx, config, generation, dense, bm25, embedder)
    _switch(ctx, builder, job, progress, bm25)
    return _after_switch(ctx, job, progress)


def _rollback(ctx: RefreshContext, config: RefreshConfig, job: JobRow) -> dict[str, Any]:
    ledger = ctx.ledger
    progress = dict(job.progress)
    if "generation" not in progress:
        previous = ledger.generations_in("previous")
        if not previous:
            raise RefreshFailed("there is no previous generation to roll back to")
        progress["generation"] = previous[-1].generation
        ledger.set_job_progress(job.job_id, progress)
    generation = ledger.generation(progress["generation"])
    assert generation is not None
    if generation.state == "live":
        return _after_switch(ctx, job, progress)
    if generation.state != "previous":
        raise RefreshFailed(f"generation {generation.generation} is {generation.state}; "
                            "only the previous generation can be rolled back to")
    try:
        embedder, chunker = _models(ctx, generation.embedding_model)  # back to the model it was built with
        dense = DenseIndex(ctx.chroma, generation.collection, embedding_model=generation.embedding_model,
                           dimension=embedder.dimension)
    except (EmbeddingModelMismatch, LookupError, OSError) as exc:
        raise RefreshFailed(f"cannot roll back to generation {generation.generation} "
                            f"({generation.embedding_model}): {exc}") from None
    builder = _builder(ctx, config, generation, dense, embedder, chunker)
    builder.indexer.reconcile(bm25=False)
    bm25 = _build(ctx, builder, job, progress)
    progress["validation"] = check_integrity(ledger, generation.generation, dense, bm25)
    _switch(ctx, builder, job, progress, bm25)
    return _after_switch(ctx, job, progress)


def _builder(ctx: RefreshContext, config: RefreshConfig, generation: GenerationRow, dense: DenseIndex,
             embedder: PassageEmbedder, chunker: Chunker) -> GenerationBuilder:
    indexer = Indexer(ledger=ctx.ledger, generation=generation, dense=dense, bm25_root=ctx.bm25_root(generation),
                      chunker=chunker, embedder=embedder, bm25_language=config.bm25_language,
                      chroma_path=ctx.chroma_path)
    return GenerationBuilder(ctx.ledger, generation, dense, indexer, batch_documents=config.batch_documents)


def _build(ctx: RefreshContext, builder: GenerationBuilder, job: JobRow, progress: dict[str, Any]) -> BM25Index:
    """Phase 'building': every pending document, one checkpointed step per batch; then BM25."""
    progress.setdefault("done", 0)
    progress.setdefault("chunks_written", 0)
    progress.update(phase="building", total=progress["done"] + builder.pending())

    def on_step(db: sqlite3.Connection, documents: int, chunks: int) -> None:
        progress["done"] += documents
        progress["chunks_written"] += chunks
        progress["total"] = max(progress["total"], progress["done"])
        ctx.ledger.save_job_progress(db, job.job_id, progress)

    def after_step() -> None:
        if ctx.report:
            ctx.report(dict(progress))
        if ctx.should_stop():
            raise JobInterrupted(job.job_id)

    def on_embedded(chunks: int) -> None:  # within a step: progress per chunk (saved with the next step)
        progress["chunks_embedded"] = progress.get("chunks_embedded", 0) + chunks
        if ctx.report:
            ctx.report(dict(progress))

    builder.indexer.on_embedded = on_embedded
    builder.sync(on_step=on_step, after_step=after_step)
    return builder.indexer.rebuild_bm25()


def _switch(ctx: RefreshContext, builder: GenerationBuilder, job: JobRow, progress: dict[str, Any],
            bm25: BM25Index) -> None:
    """Phase 'switching': under the write lock, the last changes, then one pointer in the ledger."""
    _report(ctx, job, progress, phase="switching")
    with ctx.switch_lock:
        if builder.sync(on_step=lambda db, n, c: ctx.ledger.save_job_progress(db, job.job_id, progress)):
            bm25 = builder.indexer.rebuild_bm25()
            check_integrity(ctx.ledger, builder.generation.generation, builder.dense, bm25)
        previous = ctx.ledger.switch_live(builder.generation.generation)
        live = ctx.ledger.generation(builder.generation.generation)
        assert live is not None
        ctx.on_switch(live, builder.dense, bm25)
    progress["previous_generation"] = previous
    log.info("generation %s is live (was %s)", live.generation, previous)


def _after_switch(ctx: RefreshContext, job: JobRow, progress: dict[str, Any]) -> dict[str, Any]:
    progress.setdefault("dropped_generations", [])
    progress["dropped_generations"] += drop_retired_generations(ctx)
    _report(ctx, job, progress, phase="done")
    return progress


def _report(ctx: RefreshContext, job: JobRow, progress: dict[str, Any], *, phase: str) -> None:
    progress["phase"] = phase
    ctx.ledger.set_job_progress(job.job_id, progress)
    if ctx.report:
        ctx.report(dict(progress))


# --- garbage collection ------------------------------------------------------------------------


def drop_retired_generations(ctx: RefreshContext) -> list[int]:
    """Delete what 'dropped' and 'failed' generations left (idempotent; run after a switch and at start).
    A 'building' generation that no unfinished job works on is failed first."""
    ledger = ctx.ledger
    for orphan in ledger.generations_in("building"):
        if not _claimed(ledger, orphan.generation):
            ledger.set_generation_state(orphan.generation, "failed")
    dropped = []
    for generation in ledger.generations_in("dropped", "failed"):
        drop_collection(ctx.chroma, generation.collection, ctx.chroma_path)
        shutil.rmtree(ctx.bm25_root(generation), ignore_errors=True)
        if ledger.count_chunks(generation.generation) or ledger.count_built(generation.generation):
            ledger.drop_generation_chunks(generation.generation)
            dropped.append(generation.generation)
    return dropped


def _claimed(ledger: Ledger, generation: int) -> bool:
    """Does an unfinished refresh job record this generation as the one it builds?"""
    return any(job.progress.get("generation") == generation for job in ledger.unfinished_jobs(REFRESH_KINDS))
