"""Ingest jobs: one webhook request's documents and deletes, applied to the live generation, resumable.

The payload is stored when the request is accepted. Progress (items done) and counts are written inside
each step's ledger transaction (``Indexer.apply``'s checkpoint), so a job interrupted anywhere resumes
after its last committed step and ends with the same documents, chunks and counts as an uninterrupted run.

Decisions:
- Within a request, documents are applied first, then deletes; a document whose id is also deleted is
  not indexed at all (the delete wins) and counts as deleted when it was live.
- Documents carry the ``created_at`` given at acceptance, so a resumed job writes the same chunks.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from ingestion.documents import Document
from ingestion.indexer import IngestCounts, Indexer
from ingestion.ledger import JobRow, Ledger

Report = Callable[[dict[str, Any]], None]  # receives the job's progress after every committed step


class JobInterrupted(Exception):
    """The process is stopping: the job stays 'running' and resumes at the next start."""


def ingest_payload(documents: Sequence[Document], deletes: Sequence[str]) -> dict[str, Any]:
    """What an ingest job stores at acceptance (everything needed to run it, JSON only)."""
    return {
        "documents": [
            {"document_id": d.document_id, "text": d.text, "title": d.title, "source": d.source,
             "metadata": d.metadata, "created_at": d.created_at, "acl": list(d.acl)}
            for d in documents
        ],
        "deletes": list(deletes),
    }


def payload_work(payload: dict[str, Any]) -> tuple[list[Document], list[str]]:
    """(documents to upsert, ids to delete) of a stored payload; documents deleted later are dropped."""
    deletes = list(dict.fromkeys(payload.get("deletes", [])))
    deleted = set(deletes)
    documents = [Document(**record) for record in payload.get("documents", []) if record["document_id"] not in deleted]
    return documents, deletes


def run_ingest_job(ledger: Ledger, job: JobRow, indexer: Indexer, *, should_stop: Callable[[], bool] = lambda: False,
                   report: Report | None = None) -> IngestCounts:
    """Apply the job's payload from where its last attempt stopped; returns the job's total counts."""
    documents, deletes = payload_work(job.payload)
    total = len(documents) + len(deletes)
    counts = IngestCounts(**job.counts) if job.counts else IngestCounts()
    start = int(job.progress.get("done", 0))
    progress = {**job.progress, "phase": "indexing", "done": start, "total": total}

    def checkpoint(db: sqlite3.Connection, step: IngestCounts, done: int) -> None:
        counts.add(step)
        progress["done"] = done
        ledger.save_job_progress(db, job.job_id, progress, counts.as_dict())

    def after_step(done: int, _total: int) -> None:
        if report:
            report(dict(progress))
        if should_stop() and done < total:
            raise JobInterrupted(job.job_id)

    indexer.apply(documents, deletes, start=start, checkpoint=checkpoint, progress=after_step, rebuild_bm25=False)
    # BM25 is rebuilt once per job; a resumed job rebuilds too (its earlier attempt may have died before)
    if counts.changed or job.progress.get("attempts", 1) > 1:
        indexer.rebuild_bm25()
    progress["phase"] = "done"
    ledger.set_job_progress(job.job_id, progress, counts.as_dict())
    if report:
        report(dict(progress))
    return counts
