"""Index generations: which one is live, their states, and what a generation built beside the live one holds."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from ingestion.documents import utc_now_iso
from ingestion.ledger.documents import DocumentRow, document_row


@dataclass(frozen=True)
class GenerationRow:
    generation: int
    collection: str
    embedding_model: str
    dimension: int
    config: dict[str, Any]
    state: str
    created_at: str


# for the type checker the mixin extends JobsMixin (whose methods it uses); at run time Ledger mixes them
if TYPE_CHECKING:
    from ingestion.ledger.jobs import JobsMixin as _Base
else:
    _Base = object


class GenerationsMixin(_Base):
    """Generations and the meta table; mixed into Ledger (uses Store's ``transaction`` and ``_query``)."""

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

    def create_generation(self, collection_prefix: str, embedding_model: str, dimension: int, config: dict[str, Any],
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
        return [document_row(r) for r in rows]

    def count_documents_to_build(self, generation: int) -> int:
        rows = self._query(
            """SELECT COUNT(*) AS n FROM documents d LEFT JOIN generation_documents g
                 ON g.generation = ? AND g.document_id = d.document_id
               WHERE d.state = 'live' AND (g.version IS NULL OR g.version != d.version)""",
            (generation,),
        )
        return cast(int, rows[0]["n"])

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
        return cast(int, self._query("SELECT COUNT(*) AS n FROM generation_documents WHERE generation = ?",
                                     (generation,))[0]["n"])

    def record_built(self, db: sqlite3.Connection, generation: int, versions: Iterable[tuple[str, int]]) -> None:
        db.executemany("INSERT OR REPLACE INTO generation_documents VALUES (?, ?, ?)",
                       [(generation, document_id, version) for document_id, version in versions])

    def forget_built(self, db: sqlite3.Connection, generation: int, document_ids: Iterable[str]) -> None:
        db.executemany("DELETE FROM generation_documents WHERE generation = ? AND document_id = ?",
                       [(generation, document_id) for document_id in document_ids])


def _generation_row(row: sqlite3.Row) -> GenerationRow:
    return GenerationRow(
        generation=row["generation"], collection=row["collection"], embedding_model=row["embedding_model"],
        dimension=row["dimension"], config=json.loads(row["config_json"]), state=row["state"],
        created_at=row["created_at"],
    )
