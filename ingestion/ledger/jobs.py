"""The job queue and idempotency claims: a job's payload is stored with its claims in one transaction."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ingestion.documents import utc_now_iso


@dataclass(frozen=True)
class JobRow:
    job_id: str
    kind: str
    status: str
    payload: dict[str, Any]
    progress: dict[str, Any]
    counts: dict[str, Any]
    error: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None


JOB_STATUS_COLUMNS = ("job_id", "kind", "status", "progress_json", "counts_json", "error", "created_at",
                      "started_at", "finished_at")
# (key, body hash, seconds it stays valid): a claim another request with the same key replays
IdempotencyClaim = tuple[str, str, float]


# for the type checker the mixin extends Store (whose methods it uses); at run time Ledger mixes them
if TYPE_CHECKING:
    from ingestion.ledger.store import Store as _Base
else:
    _Base = object


class JobsMixin(_Base):
    """Jobs and idempotency claims; mixed into Ledger (uses Store's ``transaction`` and ``_query``)."""

    def accept_job(self, kind: str, payload: dict[str, Any], *, claims: Sequence[IdempotencyClaim] = (),
                   respond: Callable[[str], dict[str, Any]],
                   unless_active: Sequence[str] = ()) -> tuple[str, dict[str, Any]]:
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

    def save_job_progress(self, db: sqlite3.Connection, job_id: str, progress: dict[str, Any],
                          counts: dict[str, Any] | None = None) -> None:
        """Inside the caller's transaction, so progress commits with the changes it describes."""
        if counts is None:
            db.execute("UPDATE jobs SET progress_json = ? WHERE job_id = ?", (json.dumps(progress), job_id))
        else:
            db.execute("UPDATE jobs SET progress_json = ?, counts_json = ? WHERE job_id = ?",
                       (json.dumps(progress), json.dumps(counts), job_id))

    def set_job_progress(self, job_id: str, progress: dict[str, Any], counts: dict[str, Any] | None = None) -> None:
        with self.transaction() as db:
            self.save_job_progress(db, job_id, progress, counts)

    def finish_job(self, job_id: str, status: str, *, error: str | None = None) -> None:
        """Final status; the payload is no longer needed and is dropped (its idempotency record stays)."""
        with self.transaction() as db:
            db.execute("UPDATE jobs SET status = ?, error = ?, finished_at = ?, payload_json = '{}' WHERE job_id = ?",
                       (status, error, utc_now_iso(), job_id))


def _job_row(row: sqlite3.Row) -> JobRow:
    return JobRow(
        job_id=row["job_id"], kind=row["kind"], status=row["status"],
        payload=json.loads(row["payload_json"]) if "payload_json" in row.keys() else {},
        progress=json.loads(row["progress_json"]), counts=json.loads(row["counts_json"]), error=row["error"],
        created_at=row["created_at"], started_at=row["started_at"], finished_at=row["finished_at"],
    )


