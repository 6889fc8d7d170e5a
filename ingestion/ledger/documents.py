"""Documents (raw text, version, state) and the chunk rows of each generation."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from ingestion.documents import Chunk, Document, utc_now_iso
from retrieval.acl import bm25_acl


@dataclass(frozen=True)
class DocumentRow:
    document: Document
    content_hash: str
    version: int
    state: str


# for the type checker the mixin extends Store (whose methods it uses); at run time Ledger mixes them
if TYPE_CHECKING:
    from ingestion.ledger.store import Store as _Base
else:
    _Base = object


class DocumentsMixin(_Base):
    """Documents and chunks; mixed into Ledger (uses Store's ``transaction`` and ``_query``)."""

    def get_document(self, document_id: str) -> DocumentRow | None:
        rows = self._query("SELECT * FROM documents WHERE document_id = ?", (document_id,))
        return document_row(rows[0]) if rows else None

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
                yield document_row(row).document
            last = rows[-1]["document_id"]

    def live_document_at(self, offset: int) -> Document | None:
        """The live document at `offset` in id order (for sampling)."""
        rows = self._query("SELECT * FROM documents WHERE state = 'live' ORDER BY document_id LIMIT 1 OFFSET ?",
                           (offset,))
        return document_row(rows[0]).document if rows else None

    def count_documents(self, state: str = "live") -> int:
        return cast(int, self._query("SELECT COUNT(*) AS n FROM documents WHERE state = ?", (state,))[0]["n"])

    def upsert_document(self, db: sqlite3.Connection, document: Document) -> int:
        """Store the document as live, bumping its version; returns the new version."""
        row = db.execute("SELECT version FROM documents WHERE document_id = ?", (document.document_id,)).fetchone()
        version = (row["version"] + 1) if row else 1
        db.execute(
            """INSERT INTO documents (document_id, title, text, source, metadata_json, created_at, content_hash,
                                      version, state, updated_at, acl_json)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'live', ?, ?)
               ON CONFLICT(document_id) DO UPDATE SET title = excluded.title, text = excluded.text,
                 source = excluded.source, metadata_json = excluded.metadata_json,
                 created_at = excluded.created_at, content_hash = excluded.content_hash,
                 version = excluded.version, state = 'live', updated_at = excluded.updated_at,
                 acl_json = excluded.acl_json""",
            (document.document_id, document.title, document.text, document.source,
             json.dumps(document.metadata, sort_keys=True), document.created_at, document.content_hash,
             version, utc_now_iso(), json.dumps(list(document.acl))),
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
            "INSERT OR REPLACE INTO chunks (generation, chunk_id, document_id, chunk_index, section, text, "
            "chunk_size_tokens, created_at, source, content_hash, acl_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(generation, c.chunk_id, c.document_id, c.chunk_index, c.section, c.text, c.chunk_size_tokens,
              c.created_at, c.source, c.content_hash, json.dumps(list(c.acl))) for c in chunks],
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

    def chunk_acls(self, generation: int) -> dict[str, str]:
        """Every chunk id of a generation with its acl as the BM25 index stores it (retrieval.acl.bm25_acl)."""
        rows = self._query("SELECT chunk_id, acl_json FROM chunks WHERE generation = ?", (generation,))
        return {r["chunk_id"]: bm25_acl(json.loads(r["acl_json"])) for r in rows}

    def count_chunks(self, generation: int) -> int:
        return cast(int, self._query("SELECT COUNT(*) AS n FROM chunks WHERE generation = ?", (generation,))[0]["n"])

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
        acl=tuple(json.loads(row["acl_json"])),
    )


def document_row(row: sqlite3.Row) -> DocumentRow:
    document = Document(
        document_id=row["document_id"], text=row["text"], title=row["title"], source=row["source"],
        metadata=json.loads(row["metadata_json"]), created_at=row["created_at"], acl=tuple(json.loads(row["acl_json"])),
    )
    return DocumentRow(document=document, content_hash=row["content_hash"], version=row["version"], state=row["state"])


