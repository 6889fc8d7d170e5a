"""Disk-full errors: recognized from every store, reported with disk and path; failed writes give their state back.

The full disk is simulated here by raising, at the write boundary, the error each store raises on a full
disk (found by filling a small tmpfs, see tests/app/test_disk_full.py): these tests need no root.
"""

import errno
import sqlite3

import numpy as np
import pytest

from ingestion.documents import Document
from ingestion.ledger import Ledger
from ingestion.storage_errors import StorageFull, disk_full, free_space, is_disk_full, require_free
from retrieval import bm25 as bm25_module
from retrieval.bm25 import BM25Index

CHROMA_FULL = "Query error: Database error: error returned from database: (code: 13) database or disk is full"


class ChromaInternalError(Exception):
    """Stands in for chromadb.errors.InternalError (the module is what the classifier looks at)."""


ChromaInternalError.__module__ = "chromadb.errors"


def test_disk_full_errors_of_every_store_are_recognized_and_others_are_not(tmp_path):
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(sqlite3.OperationalError("database or disk is full"))
    assert is_disk_full(ChromaInternalError(CHROMA_FULL))
    wrapped = RuntimeError("step failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(wrapped)
    assert not is_disk_full(sqlite3.OperationalError("database is locked"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    # Chroma's compactor says only this on a full disk: disk full only when the disk is nearly full
    compaction = ChromaInternalError("Error in compaction: Failed to apply logs to the hnsw segment writer")
    assert not is_disk_full(compaction, tmp_path)  # this disk has far more than 64 MiB free
    assert not is_disk_full(compaction)


def test_the_message_names_the_path_the_store_the_disk_and_what_to_do(tmp_path):
    full = disk_full(sqlite3.OperationalError("database or disk is full"), "ledger", tmp_path / "ledger.sqlite3")
    assert isinstance(full, StorageFull) and full.store == "ledger"
    text = str(full)
    free, device = free_space(tmp_path)
    assert text.startswith(f"disk full: {tmp_path / 'ledger.sqlite3'} (ledger) — ")
    assert device in text and "mounted at" in device and "free on" in text and text.endswith("free space and retry")
    assert disk_full(sqlite3.OperationalError("database is locked"), "ledger", tmp_path) is None
    with pytest.raises(StorageFull, match="under the .* margin"):
        require_free("chroma", tmp_path, free + 1024**3)
    require_free("chroma", tmp_path, 0)


class FailingCommit:
    """The ledger's connection, with COMMIT failing as it does on a full disk."""

    def __init__(self, db):
        self.db = db

    def execute(self, sql, *args):
        if sql == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)


def test_a_commit_that_fails_leaves_no_transaction_open(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    real = ledger._db
    ledger._db = FailingCommit(real)
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        with ledger.transaction() as db:
            ledger.upsert_document(db, Document("a", "text a"))
    ledger._db = real
    assert not real.in_transaction
    with ledger.transaction() as db:  # the next write works (no "cannot start a transaction within a transaction")
        ledger.upsert_document(db, Document("b", "text b"))
    assert ledger.count_documents() == 1
    ledger.close()


def test_a_bm25_save_that_runs_out_of_space_removes_its_partial_build(tmp_path, monkeypatch):
    root = tmp_path / "bm25"
    BM25Index.build(["a"], ["alpha text"], {}).save(root)
    before = sorted(p.name for p in root.iterdir())
    calls, real_save = [], np.save

    def save_then_fail(path, array, **kwargs):  # the disk fills up after the first array
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(path, array, **kwargs)

    monkeypatch.setattr(bm25_module.np, "save", save_then_fail)
    with pytest.raises(OSError):
        BM25Index.build(["a", "b"], ["alpha text", "beta text"], {}).save(root)
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == before
    assert len(BM25Index.load(root)) == 1
