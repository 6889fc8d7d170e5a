"""The ledger: SQLite source of truth for documents, chunks, index generations, jobs and idempotency keys.

Every index (Chroma collection, BM25 index) is derived from the ledger and can be rebuilt from it.
Invariants:
- a document row holds its raw text and metadata, content hash, version and state (live/deleted);
- the chunks of generation G are exactly the rows of ``chunks`` with ``generation = G``; the Chroma
  collection and BM25 index of G are reconciled to that set (see ``ingestion.indexer``);
- exactly one generation is live: the ``live_generation`` row of ``meta``, switched in one transaction;
- ``generation_documents`` says which version of each document a generation holds, for the generations
  the live path does not maintain: one being built, and the previous one (snapshotted at the switch).
  A refresh or rollback catches such a generation up exactly: live documents whose version differs
  are re-chunked, documents no longer live are removed;
- a job's payload is stored with its idempotency claims in one transaction; its progress and counts
  are written in the same transaction as the ledger changes they describe.

One process writes a data directory (``writer_lock``); SQLite runs in WAL mode so readers never block.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ingestion.documents import Chunk, Document, utc_now_iso

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    document_id   TEXT PRIMARY KEY,
    title         TEXT NOT NULL,
    text          TEXT NOT NULL,
    source        TEXT NOT NULL,
    metadata_json TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    content_hash  TEXT NOT NULL,
    version       INTEGER NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('live', 'deleted')),
    updated_at    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    generation        INTEGER NOT NULL,
    chunk_id          TEXT NOT NULL,
    document_id       TEXT NOT NULL,
    chunk_index       INTEGER NOT NULL,
    section           TEXT NOT NULL,
    text              TEXT NOT NULL,
    chunk_size_tokens INTEGER NOT NULL,
    created_at        TEXT NOT NULL,
    source            TEXT NOT NULL,
    content_hash      TEXT NOT NULL,
    PRIMARY KEY (generation, chunk_id)
);
CREATE INDEX IF NOT EXISTS chunks_by_document ON chunks (generation, document_id);
CREATE TABLE IF NOT EXISTS generations (
    generation      INTEGER PRIMARY KEY,
    collection      TEXT NOT NULL,
    embedding_model TEXT NOT NULL,
    dimension       INTEGER NOT NULL,
    config_json     TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('building', 'live', 'previous', 'failed', 'dropped')),
    created_at      TEXT NOT NULL,
    switched_at     TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    job_id      TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
    payload_json TEXT NOT NULL,
    progress_json TEXT NOT NULL DEFAULT '{}',
    counts_json TEXT NOT NULL DEFAULT '{}',
    error       TEXT,
    created_at  TEXT NOT NULL,
    started_at  TEXT,
    finished_at TEXT
);
CREATE TABLE IF NOT EXISTS generation_documents (
    generation  INTEGER NOT NULL,
    document_id TEXT NOT NULL,
    version     INTEGER NOT NULL,
    PRIMARY KEY (generation, document_id)
);
CREATE TABLE IF NOT EXISTS idempotency (
    key           TEXT PRIMARY KEY,
    body_hash     TEXT NOT NULL,
    response_json TEXT NOT NULL,
    created_at    REAL NOT NULL
);
"""


class DataDirLocked(RuntimeError):
    """Another process already writes this data directory."""


@contextmanager
def writer_lock(data_dir: Path) -> Iterator[None]:
    """Hold the data directory's single-writer lock for the duration of the block (fails fast)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / ".writer.lock"
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise DataDirLocked(
            f"data directory {data_dir} is already open for writing by {holder}; "
            "stop it, or send the work to the running service (POST /ingest, rag refresh)"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


@dataclass(frozen=True)
class DocumentRow:
    document: Document
    content_hash: str
    version: int
    state: str


@dataclass(frozen=True)
class GenerationRow:
    generation: int
    collection: str
    embedding_model: str
    dimension: int
    config: dict
    state: str
    created_at: str


@dataclass(frozen=True)
class JobRow:
    job_id: str
    kind: str
    status: str
    payload: dict
    progress: dict
    counts: dict
    error: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None


JOB_STATUS_COLUMNS = ("job_id", "kind", "status", "progress_json", "counts_json", "error", "created_at",
                      "started_at", "finished_at")
# (key, body hash, seconds it stays valid): a claim another request with the same key replays
IdempotencyClaim = tuple[str, str, float]


class Ledger:
    """Thread-safe handle on the ledger database (one connection, serialized by a lock)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write: everything inside commits together or not at all."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # a COMMIT that failed (a full disk) may leave it open
                    self._db.execute("ROLLBACK")
                raise

    def _query(self, sql: str, params: Sequence = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # --- meta / generations ----------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def set_meta(self, db: sqlite3.Connection, key: str, value: str) -> None:
        db.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                   (key, value))

    def live_generation(self) -> GenerationRow | None:
        value = self.get_meta("live_generation")
        return self.generation(int(value)) if value is not None else None

    def generation(self, generation: int) -> GenerationRow | None:
        rows = self._query("SELECT * FROM generations WHERE generation = ?", (generation,))
        return _generation_row(rows[0]) if rows else None

    def generations(self) -> list[GenerationRow]:
        return [_generation_row(r) for r in self._query("SELECT * FROM generations ORDER BY generation")]

    def create_generation(self, collection_prefix: str, embedding_model: str, dimension: int, config: dict,
                          *, job_id: str | None = None) -> GenerationRow:
        """A new 'building' generation; with `job_id`, recorded in that job's progress in the same transaction."""
        with self.transaction() as db:
            (last,) = db.execute("SELECT COALESCE(MAX(generation), 0) FROM generations").fetchone()
            generation = last + 1
            db.execute(
                "INSERT INTO generations VALUES (?, ?, ?, ?, ?, 'building', ?, NULL)",
                (generation, f"{collection_prefix}_g{generation}", embedding_model, dimension,
                 json.dumps(config, sort_keys=True), utc_now_iso()),
            )
            if job_id is not None:
                row = db.execute("SELECT progress_json FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
                progress = {**json.loads(row["progress_json"]), "generation": generation}
                self.save_job_progress(db, job_id, progress)
        row = self.generation(generation)
        assert row is not None
        return row

    def set_generation_state(self, generation: int, state: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE generations SET state = ? WHERE generation = ?", (state, generation))

    def switch_live(self, generation: int) -> int | None:
        """Make `generation` live in one transaction; the old live one becomes 'previous' (with a snapshot
        of the document versions it holds, for a later rollback), an older 'previous' one 'dropped'."""
        with self.transaction() as db:
            old = db.execute("SELECT value FROM meta WHERE key = 'live_generation'").fetchone()
            old_generation = int(old["value"]) if old else None
            db.execute("UPDATE generations SET state = 'dropped' WHERE state = 'previous'")
            db.execute("DELETE FROM generation_documents WHERE generation = ?", (generation,))
            if old_generation is not None and old_generation != generation:
                db.execute("UPDATE generations SET state = 'previous' WHERE generation = ?", (old_generation,))
                db.execute("DELETE FROM generation_documents WHERE generation = ?", (old_generation,))
                db.execute("INSERT INTO generation_documents SELECT ?, document_id, version FROM documents "
                           "WHERE state = 'live'", (old_generation,))
            db.execute("UPDATE generations SET state = 'live', switched_at = ? WHERE generation = ?",
                       (utc_now_iso(), generation))
            self.set_meta(db, "live_generation", str(generation))
        return old_generation

    def drop_generation_chunks(self, generation: int) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM chunks WHERE generation = ?", (generation,))
            db.execute("DELETE FROM generation_documents WHERE generation = ?", (generation,))

    def generations_in(self, *states: str) -> list[GenerationRow]:
        marks = ",".join("?" * len(states))
        rows = self._query(f"SELECT * FROM generations WHERE state IN ({marks}) ORDER BY generation", states)
        return [_generation_row(r) for r in rows]

    # --- building a generation beside the live one -----------------------------------------
    def documents_to_build(self, generation: int, limit: int) -> list[DocumentRow]:
        """Live documents the generation does not hold at their current version, in id order."""
        rows = self._query(
            """SELECT d.* FROM documents d LEFT JOIN generation_documents g
                 ON g.generation = ? AND g.document_id = d.document_id
               WHERE d.state = 'live' AND (g.version IS NULL OR g.version != d.version)
               ORDER BY d.document_id LIMIT ?""",
            (generation, limit),
        )
        return [_document_row(r) for r in rows]

    def count_documents_to_build(self, generation: int) -> int:
        rows = self._query(
            """SELECT COUNT(*) AS n FROM documents d LEFT JOIN generation_documents g
                 ON g.generation = ? AND g.document_id = d.document_id
               WHERE d.state = 'live' AND (g.version IS NULL OR g.version != d.version)""",
            (generation,),
        )
        return rows[0]["n"]

    def documents_to_unbuild(self, generation: int, limit: int) -> list[str]:
        """Documents the generation holds that are no longer live, in id order."""
        rows = self._query(
            """SELECT g.document_id FROM generation_documents g LEFT JOIN documents d
                 ON d.document_id = g.document_id
               WHERE g.generation = ? AND (d.state IS NULL OR d.state != 'live')
               ORDER BY g.document_id LIMIT ?""",
            (generation, limit),
        )
        return [r["document_id"] for r in rows]

    def count_built(self, generation: int) -> int:
        return self._query("SELECT COUNT(*) AS n FROM generation_documents WHERE generation = ?", (generation,))[0]["n"]

    def record_built(self, db: sqlite3.Connection, generation: int, versions: Iterable[tuple[str, int]]) -> None:
        db.executemany("INSERT OR REPLACE INTO generation_documents VALUES (?, ?, ?)",
                       [(generation, document_id, version) for document_id, version in versions])

    def forget_built(self, db: sqlite3.Connection, generation: int, document_ids: Iterable[str]) -> None:
        db.executemany("DELETE FROM generation_documents WHERE generation = ? AND document_id = ?",
                       [(generation, document_id) for document_id in document_ids])

    # --- jobs and idempotency ----------------------------------------------------------------
    def accept_job(self, kind: str, payload: dict, *, claims: Sequence[IdempotencyClaim] = (),
                   respond: Callable[[str], dict], unless_active: Sequence[str] = ()) -> tuple[str, dict]:
        """Queue a job and record its claims in one transaction; returns (outcome, response).

        A claim still valid with the same body hash: ("replayed", the stored response), nothing written;
        with another body hash: ("conflict", {}). An unfinished job of a kind in `unless_active`:
        ("active", {"job_id": its id}). Otherwise ("accepted", respond(job_id)).
        """
        now = time.time()
        with self.transaction() as db:
            if unless_active:
                marks = ",".join("?" * len(unless_active))
                active = db.execute(f"SELECT job_id FROM jobs WHERE kind IN ({marks}) AND status IN ('queued', "
                                    "'running') ORDER BY rowid LIMIT 1", tuple(unless_active)).fetchone()
                if active is not None:
                    return "active", {"job_id": active["job_id"]}
            for key, _, ttl in claims:
                db.execute("DELETE FROM idempotency WHERE substr(key, 1, 4) = ? AND created_at < ?",
                           (key[:4], now - ttl))
            for key, body_hash, _ in claims:
                row = db.execute("SELECT body_hash, response_json FROM idempotency WHERE key = ?", (key,)).fetchone()
                if row is not None:
                    if row["body_hash"] != body_hash:
                        return "conflict", {}
                    return "replayed", json.loads(row["response_json"])
            job_id = uuid.uuid4().hex
            response = respond(job_id)
            db.execute("INSERT INTO jobs (job_id, kind, status, payload_json, created_at) "
                       "VALUES (?, ?, 'queued', ?, ?)",
                       (job_id, kind, json.dumps(payload), utc_now_iso()))
            db.executemany("INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?)",
                           [(key, body_hash, json.dumps(response), now) for key, body_hash, _ in claims])
        return "accepted", response

    def get_job(self, job_id: str, *, with_payload: bool = False) -> JobRow | None:
        columns = "*" if with_payload else ", ".join(JOB_STATUS_COLUMNS)
        rows = self._query(f"SELECT {columns} FROM jobs WHERE job_id = ?", (job_id,))
        return _job_row(rows[0]) if rows else None

    def unfinished_jobs(self, kinds: Sequence[str], *, with_payload: bool = False) -> list[JobRow]:
        """Queued and interrupted ('running') jobs of these kinds, oldest first."""
        marks = ",".join("?" * len(kinds))
        columns = "*" if with_payload else ", ".join(JOB_STATUS_COLUMNS)
        rows = self._query(f"SELECT {columns} FROM jobs WHERE kind IN ({marks}) AND status IN ('queued', 'running') "
                           "ORDER BY rowid", tuple(kinds))
        return [_job_row(r) for r in rows]

    def start_job(self, job_id: str) -> JobRow:
        """Mark the job running and count the attempt (a resumed job starts again here)."""
        with self.transaction() as db:
            row = db.execute("SELECT progress_json FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            progress = json.loads(row["progress_json"])
            progress["attempts"] = progress.get("attempts", 0) + 1
            db.execute("UPDATE jobs SET status = 'running', started_at = COALESCE(started_at, ?), progress_json = ? "
                       "WHERE job_id = ?", (utc_now_iso(), json.dumps(progress), job_id))
        job = self.get_job(job_id, with_payload=True)
        assert job is not None
        return job

    def save_job_progress(self, db: sqlite3.Connection, job_id: str, progress: dict,
                          counts: dict | None = None) -> None:
        """Inside the caller's transaction, so progress commits with the changes it describes."""
        if counts is None:
            db.execute("UPDATE jobs SET progress_json = ? WHERE job_id = ?", (json.dumps(progress), job_id))
        else:
            db.execute("UPDATE jobs SET progress_json = ?, counts_json = ? WHERE job_id = ?",
                       (json.dumps(progress), json.dumps(counts), job_id))

    def set_job_progress(self, job_id: str, progress: dict, counts: dict | None = None) -> None:
        with self.transaction() as db:
            self.save_job_progress(db, job_id, progress, counts)

    def finish_job(self, job_id: str, status: str, *, error: str | None = None) -> None:
        """Final status; the payload is no longer needed and is dropped (its idempotency record stays)."""
        with self.transaction() as db:
            db.execute("UPDATE jobs SET status = ?, error = ?, finished_at = ?, payload_json = '{}' WHERE job_id = ?",
                       (status, error, utc_now_iso(), job_id))

    # --- documents ---------------------------------------------------------------------------
    def get_document(self, document_id: str) -> DocumentRow | None:
        rows = self._query("SELECT * FROM documents WHERE document_id = ?", (document_id,))
        return _document_row(rows[0]) if rows else None

    def live_documents(self, batch_size: int = 1000) -> Iterator[Document]:
        """All live documents in id order, read in batches (constant memory)."""
        last = ""
        while True:
            rows = self._query(
                "SELECT * FROM documents WHERE state = 'live' AND document_id > ? ORDER BY document_id LIMIT ?",
                (last, batch_size),
            )
            if not rows:
                return
            for row in rows:
                yield _document_row(row).document
            last = rows[-1]["document_id"]

    def live_document_at(self, offset: int) -> Document | None:
        """The live document at `offset` in id order (for sampling)."""
        rows = self._query("SELECT * FROM documents WHERE state = 'live' ORDER BY document_id LIMIT 1 OFFSET ?",
                           (offset,))
        return _document_row(rows[0]).document if rows else None

    def count_documents(self, state: str = "live") -> int:
        return self._query("SELECT COUNT(*) AS n FROM documents WHERE state = ?", (state,))[0]["n"]

    def upsert_document(self, db: sqlite3.Connection, document: Document) -> int:
        """Store the document as live, bumping its version; returns the new version."""
        row = db.execute("SELECT version FROM documents WHERE document_id = ?", (document.document_id,)).fetchone()
        version = (row["version"] + 1) if row else 1
        db.execute(
            """INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'live', ?)
               ON CONFLICT(document_id) DO UPDATE SET title = excluded.title, text = excluded.text,
                 source = excluded.source, metadata_json = excluded.metadata_json,
                 created_at = excluded.created_at, content_hash = excluded.content_hash,
                 version = excluded.version, state = 'live', updated_at = excluded.updated_at""",
            (document.document_id, document.title, document.text, document.source,
             json.dumps(document.metadata, sort_keys=True), document.created_at, document.content_hash,
             version, utc_now_iso()),
        )
        return version

    def mark_deleted(self, db: sqlite3.Connection, document_id: str) -> bool:
        cursor = db.execute(
            "UPDATE documents SET state = 'deleted', version = version + 1, updated_at = ? "
            "WHERE document_id = ? AND state = 'live'",
            (utc_now_iso(), document_id),
        )
        return cursor.rowcount > 0

    # --- chunks --------------------------------------------------------------------------------
    def insert_chunks(self, db: sqlite3.Connection, generation: int, chunks: Iterable[Chunk]) -> None:
        db.executemany(
            "INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(generation, c.chunk_id, c.document_id, c.chunk_index, c.section, c.text, c.chunk_size_tokens,
              c.created_at, c.source, c.content_hash) for c in chunks],
        )

    def delete_chunks(self, db: sqlite3.Connection, generation: int, chunk_ids: Iterable[str]) -> None:
        db.executemany("DELETE FROM chunks WHERE generation = ? AND chunk_id = ?",
                       [(generation, cid) for cid in chunk_ids])

    def document_chunk_ids(self, generation: int, document_id: str) -> list[str]:
        rows = self._query(
            "SELECT chunk_id FROM chunks WHERE generation = ? AND document_id = ? ORDER BY chunk_index",
            (generation, document_id),
        )
        return [r["chunk_id"] for r in rows]

    def chunk_ids(self, generation: int) -> set[str]:
        return {r["chunk_id"] for r in self._query("SELECT chunk_id FROM chunks WHERE generation = ?", (generation,))}

    def count_chunks(self, generation: int) -> int:
        return self._query("SELECT COUNT(*) AS n FROM chunks WHERE generation = ?", (generation,))[0]["n"]

    def get_chunks(self, generation: int, chunk_ids: Sequence[str]) -> dict[str, Chunk]:
        """Chunks by id (ids missing from the generation are simply absent from the result)."""
        found: dict[str, Chunk] = {}
        for start in range(0, len(chunk_ids), 500):
            part = list(chunk_ids[start:start + 500])
            marks = ",".join("?" * len(part))
            for row in self._query(
                f"SELECT * FROM chunks WHERE generation = ? AND chunk_id IN ({marks})", (generation, *part)
            ):
                found[row["chunk_id"]] = _chunk(row)
        return found

    def iter_chunks(self, generation: int, batch_size: int = 5000) -> Iterator[Chunk]:
        """Every chunk of a generation in chunk-id order, read in batches."""
        last = ""
        while True:
            rows = self._query(
                "SELECT * FROM chunks WHERE generation = ? AND chunk_id > ? ORDER BY chunk_id LIMIT ?",
                (generation, last, batch_size),
            )
            if not rows:
                return
            yield from (_chunk(r) for r in rows)
            last = rows[-1]["chunk_id"]


def _chunk(row: sqlite3.Row) -> Chunk:
    return Chunk(
        chunk_id=row["chunk_id"], document_id=row["document_id"], text=row["text"], section=row["section"],
        chunk_index=row["chunk_index"], chunk_size_tokens=row["chunk_size_tokens"],
        created_at=row["created_at"], source=row["source"], content_hash=row["content_hash"],
    )


def _document_row(row: sqlite3.Row) -> DocumentRow:
    document = Document(
        document_id=row["document_id"], text=row["text"], title=row["title"], source=row["source"],
        metadata=json.loads(row["metadata_json"]), created_at=row["created_at"],
    )
    return DocumentRow(document=document, content_hash=row["content_hash"], version=row["version"], state=row["state"])


def _job_row(row: sqlite3.Row) -> JobRow:
    return JobRow(
        job_id=row["job_id"], kind=row["kind"], status=row["status"],
        payload=json.loads(row["payload_json"]) if "payload_json" in row.keys() else {},
        progress=json.loads(row["progress_json"]), counts=json.loads(row["counts_json"]), error=row["error"],
        created_at=row["created_at"], started_at=row["started_at"], finished_at=row["finished_at"],
    )


def _generation_row(row: sqlite3.Row) -> GenerationRow:
    return GenerationRow(
        generation=row["generation"], collection=row["collection"], embedding_model=row["embedding_model"],
        dimension=row["dimension"], config=json.loads(row["config_json"]), state=row["state"],
        created_at=row["created_at"],
    )
