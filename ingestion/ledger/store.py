"""The ledger's database: schema, one connection behind a lock, transactions; the data directory's writer lock."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
    updated_at    TEXT NOT NULL,
    acl_json      TEXT NOT NULL DEFAULT '[]'
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
    acl_json          TEXT NOT NULL DEFAULT '[]',
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
# Columns added after a table's first release: (table, column, definition). A ledger written before
# gets them at open (existing rows take the default), so it keeps working unchanged.
MIGRATIONS = (
    ("documents", "acl_json", "TEXT NOT NULL DEFAULT '[]'"),  # document access control: every old row public
    ("chunks", "acl_json", "TEXT NOT NULL DEFAULT '[]'"),
)


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


class Store:
    """Thread-safe handle on the ledger database (one connection, serialized by a lock); the role
    mixins (generations, jobs, documents) run their SQL through ``transaction`` and ``_query``."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        def missing(db: sqlite3.Connection) -> list[tuple[str, str, str]]:
            return [(table, column, definition) for table, column, definition in MIGRATIONS
                    if column not in {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}]

        if not missing(self._db):
            return
        with self.transaction() as db:  # another process may have migrated meanwhile: look again inside
            for table, column, definition in missing(db):
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")

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

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()
