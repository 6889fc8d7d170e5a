"""Apply document adds, changes and deletes to one index generation: ledger, Chroma and BM25 together.

Order of writes, chosen so that a crash at any point leaves a state ``reconcile`` repairs exactly:
1. new chunks' vectors are upserted into Chroma (ids are deterministic, so a retry rewrites the same rows);
2. one ledger transaction records the documents and swaps their chunk rows (new rows in, old rows out);
3. the old chunks' vectors are deleted from Chroma;
4. the BM25 index is rebuilt from the ledger and switched in atomically.
A changed document's new chunks are therefore searchable before its old ones disappear. A document whose
acl changed keeps the chunks whose text is unchanged: step 1 updates their acl in Chroma instead.
``reconcile`` makes Chroma and BM25 hold exactly the ledger's chunk ids (deleting orphans, embedding
what is missing, rebuilding BM25), and is run at start-up and after any interrupted job.

A job resumes exactly: ``apply`` takes a ``checkpoint`` that runs inside each step's ledger transaction
(step 2 above) with that step's counts, so a job's progress and counts commit with the changes they
describe, and ``start`` skips the items a previous attempt committed.

A full disk (or one under ``min_free_bytes``, checked before every step) ends a write with
``StorageFull`` naming the store and its path; the step's ledger transaction is rolled back, so the state
left is one ``reconcile`` repairs, like a crash's.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ingestion.documents import Chunk, Document
from ingestion.ledger import GenerationRow, Ledger
from ingestion.storage_errors import raise_if_full, require_free
from retrieval.acl import bm25_acl
from retrieval.bm25 import BM25Index
from retrieval.dense import DenseIndex

log = logging.getLogger(__name__)

Checkpoint = Callable[[sqlite3.Connection, "IngestCounts", int], None]  # (open transaction, step counts, items done)

Progress = Callable[[int, int], None]  # (items done, items total); items are documents, then deletes
ChunksEmbedded = Callable[[int], None]  # (chunks just embedded): progress within a step
DELETE_STEP = 500  # deletes per ledger transaction


class PassageEmbedder(Protocol):
    """What a stage needs of an embedder (ingestion.embedder.Embedder is one): its vectors' dimension, and
    passages to unit vectors."""

    dimension: int

    def embed_passages(self, texts: Sequence[str], *,
                       on_batch: Callable[[int], None] | None = None) -> np.ndarray: ...


class Chunker(Protocol):
    """Anything that splits a document into chunks (ingestion.chunker.SemanticChunker is one); one that also
    has ``chunk_many(documents)`` is called once per batch."""

    def chunk(self, document: Document) -> list[Chunk]: ...


def write_chunks(ledger: Ledger, generation: int, dense: DenseIndex, embedder: PassageEmbedder,
                 planned: Sequence[tuple[list[Chunk], list[str]]], *,
                 record: Callable[[sqlite3.Connection, int, int], None],
                 on_embedded: ChunksEmbedded | None = None) -> None:
    """One write step (steps 1 to 3 of the module doc) for documents whose new chunks are planned:
    ``planned`` holds (new chunks, old chunk ids) per document. ``record(db, written, removed)`` writes
    what the caller keeps (document rows, build bookkeeping, a job checkpoint with the step's chunk
    counts) in the same ledger transaction. Shared by ingest jobs (Indexer) and refresh (GenerationBuilder)."""
    existing = {cid for _, old in planned for cid in old}
    fresh = [c for chunks, _ in planned for c in chunks if c.chunk_id not in existing]
    gone = [[cid for cid in old if cid not in {c.chunk_id for c in chunks}] for chunks, old in planned]
    if fresh:
        vectors = embedder.embed_passages([c.text for c in fresh], on_batch=on_embedded)
        dense.upsert([c.chunk_id for c in fresh], vectors, [c.metadata() for c in fresh])
    # A chunk kept by id (same document, position and text) whose document's acl changed: its vector
    # stays, its stored acl must follow, as the ledger's rows do below.
    kept = [c for chunks, _ in planned for c in chunks if c.chunk_id in existing]
    stored = ledger.get_chunks(generation, [c.chunk_id for c in kept]) if kept else {}
    regranted = [c for c in kept if c.chunk_id in stored and stored[c.chunk_id].acl != c.acl]
    if regranted:
        dense.update_metadata([c.chunk_id for c in regranted], [c.metadata() for c in regranted])
    with ledger.transaction() as db:
        record(db, len(fresh), sum(map(len, gone)))
        for (chunks, _), removed in zip(planned, gone):
            ledger.insert_chunks(db, generation, chunks)
            ledger.delete_chunks(db, generation, removed)
    dense.delete([cid for removed in gone for cid in removed])


@dataclass
class IngestCounts:
    """What a job did; per document: added, updated, unchanged or deleted."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    chunks_written: int = 0
    chunks_removed: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def changed(self) -> bool:
        """Whether any chunk row changed, so BM25 must be rebuilt: an acl change alone writes no chunk."""
        return bool(self.added or self.updated or self.deleted or self.chunks_written or self.chunks_removed)

    def add(self, other: "IngestCounts") -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


@dataclass
class Indexer:
    """Writes one generation. Build with the generation's Chroma collection and BM25 folder."""

    ledger: Ledger
    generation: GenerationRow
    dense: DenseIndex
    bm25_root: Path
    chunker: Chunker  # ingestion.chunker.SemanticChunker
    embedder: PassageEmbedder  # ingestion.embedder.Embedder
    bm25_language: str = "english"
    batch_documents: int = 64
    on_bm25_rebuilt: Callable[[BM25Index], None] | None = field(default=None, repr=False)
    chroma_path: Path | None = None  # embedded Chroma's folder (None: a Chroma server), for disk-full reports
    min_free_bytes: int = 0  # refuse a step when a store's disk has less free (0: no check)
    on_embedded: ChunksEmbedded | None = field(default=None, repr=False)  # progress per chunk embedded

    def apply(self, documents: Sequence[Document], deletes: Sequence[str] = (), *,
              progress: Progress | None = None, rebuild_bm25: bool = True, start: int = 0,
              checkpoint: Checkpoint | None = None) -> IngestCounts:
        """Upsert `documents`, then delete `deletes` (a delete after an add of the same id wins).

        Items (documents, then deletes) before `start` are skipped; `checkpoint(db, step_counts, done)`
        runs inside every step's ledger transaction. Returns the counts of the items processed here.
        """
        counts = IngestCounts()
        total = len(documents) + len(deletes)
        for begin in range(start, len(documents), self.batch_documents):
            end = min(begin + self.batch_documents, len(documents))
            with self._writes():
                self._require_free()
                counts.add(self._apply_batch(documents[begin:end], done=end, checkpoint=checkpoint))
            if progress:
                progress(end, total)
        for begin in range(max(start - len(documents), 0), len(deletes), DELETE_STEP):
            end = min(begin + DELETE_STEP, len(deletes))
            with self._writes():
                counts.add(self._delete(deletes[begin:end], done=len(documents) + end, checkpoint=checkpoint))
            if progress:
                progress(len(documents) + end, total)
        if rebuild_bm25 and (counts.changed or self._bm25_missing()):
            self.rebuild_bm25()
        return counts

    @contextmanager
    def _writes(self) -> Iterator[None]:
        """Re-raise a disk-full error of any store as StorageFull naming that store and its path."""
        try:
            yield
        except Exception as exc:
            path: Path | None
            if isinstance(exc, sqlite3.Error):
                store, path = "ledger", self.ledger.path
            elif type(exc).__module__.startswith("chromadb"):
                store, path = "chroma", self.chroma_path
            else:
                store, path = "bm25", self.bm25_root
            raise_if_full(exc, store, path)
            raise

    def _require_free(self) -> None:
        stores = [("ledger", self.ledger.path), ("bm25", self.bm25_root)]
        if self.chroma_path is not None:
            stores.append(("chroma", self.chroma_path))
        for store, path in stores:
            require_free(store, path, self.min_free_bytes)

    def _apply_batch(self, documents: Sequence[Document], *, done: int = 0,
                     checkpoint: Checkpoint | None = None) -> IngestCounts:
        counts = IngestCounts()
        gen = self.generation.generation
        planned: list[tuple[Document, list[str]]] = []  # (document, its old chunk ids)
        for document in documents:
            row = self.ledger.get_document(document.document_id)
            old_ids = self.ledger.document_chunk_ids(gen, document.document_id)
            if row and row.state == "live" and row.content_hash == document.content_hash and old_ids:
                counts.unchanged += 1
                continue
            if row and row.state == "live":
                counts.updated += 1
            else:
                counts.added += 1
            planned.append((document, old_ids))
        if not planned:
            if checkpoint:
                with self.ledger.transaction() as db:
                    checkpoint(db, counts, done)
            return counts
        chunked = self.chunk([document for document, _ in planned])

        def record(db: sqlite3.Connection, written: int, removed: int) -> None:
            counts.chunks_written += written
            counts.chunks_removed += removed
            for document, _ in planned:  # before its chunks: they reference it
                self.ledger.upsert_document(db, document)
            if checkpoint:
                checkpoint(db, counts, done)

        write_chunks(self.ledger, gen, self.dense, self.embedder,
                     [(chunks, old) for (_, old), chunks in zip(planned, chunked)],
                     record=record, on_embedded=self.on_embedded)
        return counts

    def chunk(self, documents: list[Document]) -> list[list[Chunk]]:
        chunk_many = getattr(self.chunker, "chunk_many", None)  # one batched call when the chunker has it
        if chunk_many:
            batched: list[list[Chunk]] = chunk_many(documents)
            return batched
        return [self.chunker.chunk(d) for d in documents]

    def _delete(self, document_ids: Sequence[str], *, done: int = 0,
                checkpoint: Checkpoint | None = None) -> IngestCounts:
        counts = IngestCounts()
        gen = self.generation.generation
        removed: list[str] = []
        with self.ledger.transaction() as db:
            for document_id in dict.fromkeys(document_ids):
                if self.ledger.mark_deleted(db, document_id):
                    counts.deleted += 1
                old_ids = self.ledger.document_chunk_ids(gen, document_id)
                self.ledger.delete_chunks(db, gen, old_ids)
                removed.extend(old_ids)
            counts.chunks_removed += len(removed)
            if checkpoint:
                checkpoint(db, counts, done)
        self.dense.delete(removed)
        return counts

    # --- derived indexes -----------------------------------------------------------------------
    def _bm25_missing(self) -> bool:
        return not (self.bm25_root / "CURRENT").exists()

    def rebuild_bm25(self, *, show_progress: bool = False) -> BM25Index:
        """Rebuild BM25 from the ledger's chunks of this generation and switch it in atomically."""
        with self._writes():
            return self._rebuild_bm25(show_progress)

    def _rebuild_bm25(self, show_progress: bool) -> BM25Index:
        ids, texts, document_ids, sources, sections, acls = [], [], [], [], [], []
        for chunk in self.ledger.iter_chunks(self.generation.generation):
            ids.append(chunk.chunk_id)
            texts.append(bm25_text(chunk))
            document_ids.append(chunk.document_id)
            sources.append(chunk.source)
            sections.append(chunk.section)
            acls.append(bm25_acl(chunk.acl))
        index = BM25Index.build(ids, texts, {"document_id": document_ids, "source": sources, "section": sections},
                                acl=acls, language=self.bm25_language, show_progress=show_progress)
        index.save(self.bm25_root)
        if self.on_bm25_rebuilt:
            self.on_bm25_rebuilt(index)
        return index

    def reconcile(self, *, bm25: bool = True) -> dict[str, int]:
        """Make Chroma (and, unless `bm25` is False, BM25) hold exactly the ledger's chunk ids for this generation."""
        with self._writes():
            return self._reconcile(bm25)

    def _reconcile(self, bm25: bool) -> dict[str, int]:
        gen = self.generation.generation
        wanted = self.ledger.chunk_ids(gen)
        present = set(self.dense.iter_ids())
        orphans = sorted(present - wanted)
        missing = sorted(wanted - present)
        self.dense.delete(orphans)
        for start in range(0, len(missing), 256):
            chunks = list(self.ledger.get_chunks(gen, missing[start:start + 256]).values())
            vectors = self.embedder.embed_passages([c.text for c in chunks])
            self.dense.upsert([c.chunk_id for c in chunks], vectors, [c.metadata() for c in chunks])
        rebuilt = False
        if bm25:
            index = BM25Index.load(self.bm25_root, language=self.bm25_language)
            # ids and acls: a job stopped between its ledger step and the BM25 rebuild may have changed acls only
            rebuilt = index is None or dict(zip(index.ids.tolist(), index.acl.tolist())) != self.ledger.chunk_acls(gen)
            if rebuilt:
                self._rebuild_bm25(False)
        report = {"orphans_removed": len(orphans), "missing_embedded": len(missing), "bm25_rebuilt": int(rebuilt)}
        if orphans or missing or rebuilt:
            log.info("reconciled generation %s: %s", gen, report)
        return report


def bm25_text(chunk: Chunk) -> str:
    """What BM25 indexes for a chunk: its section heading path and its text."""
    return f"{chunk.section}\n{chunk.text}" if chunk.section else chunk.text
