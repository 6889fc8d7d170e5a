"""The audit trail: who asked what and what came back, who changed the index or the adapters.

One JSON object per line (``RAG_AUDIT_LOG``, default ``<data_dir>/audit/audit.jsonl``)::

    {"time": "2026-12-01T16:40:02.113+00:00", "event": "query", "actor": {"kind": "key", "name": "support-bot",
     "key_id": "9f86d081884c", "client": "10.0.0.7"}, "request_id": "...", "question": "...", "status": 200,
     "document_ids": [...], "chunk_ids": [...], "abstained": false, ...}

Events: ``query``; ``auth_rejected``; ``ingest_accepted`` / ``ingest_rejected`` (webhook), ``ingest_done`` /
``ingest_failed`` (job end, or ``rag ingest``); ``refresh_requested`` / ``rollback_requested``, ``refresh_done``
/ ``refresh_failed``, ``rollback_done`` / ``rollback_failed``; ``adapter_activated`` (``rag adapters activate``,
``rag adapters rollback``, ``rag train``). Field by field: docs/audit.md.

Writers: the service rotates the file at UTC midnight and deletes daily files older than
``RAG_AUDIT_RETENTION_DAYS``; other processes (CLI, ``python -m app.worker``) append to the same file and never
rotate (``WatchedFileHandler`` reopens it after the service renamed it). Every event is one ``write()`` of one
line to a file opened with O_APPEND, so lines of different processes never interleave.

Failing writes fail open: the request or job goes on, the failure is logged at ERROR and counted
(``AuditLog.failures``). A path that cannot be opened at start stops the start, naming ``RAG_AUDIT_LOG``.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import logging.handlers
import os
import socket
import threading
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import Request

    from app.schemas import QueryResponse
    from app.settings import Settings
    from ingestion.ledger import JobRow

log = logging.getLogger(__name__)
ROTATED_SUFFIX = "%Y-%m-%d"  # TimedRotatingFileHandler's for when="midnight"


class AuditLogError(ValueError):
    """The audit log cannot be opened; the message names RAG_AUDIT_LOG and the path."""


class _Reporting:
    """Routes a handler's write errors to the AuditLog (logging's default prints a traceback to stderr)."""

    on_error: Any = None

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        import sys

        if self.on_error is not None:
            self.on_error(sys.exc_info()[1])


class _DailyFiles(_Reporting, logging.handlers.TimedRotatingFileHandler):
    """Rotates at UTC midnight to ``<file>.<YYYY-MM-DD>``; on rotation deletes the days before the retention."""

    def __init__(self, path: Path, retention_days: int) -> None:
        # backupCount > 0 is what makes doRollover call getFilesToDelete; 0 keeps every file
        super().__init__(path, when="midnight", utc=True, backupCount=retention_days, encoding="utf-8")

    def rotation_filename(self, default_name: str) -> str:
        """The dated name, made unique: logging's own rotation would replace a file of the same day."""
        name, n = default_name, 0
        while os.path.exists(name):
            n += 1
            name = f"{default_name}.{n}"
        return name

    def getFilesToDelete(self) -> list[str]:  # noqa: N802 (logging's name)
        """Rotated files dated before today minus the retention (by the date in their name, not by count,
        so days the service did not run do not stretch the retention)."""
        folder, base = os.path.split(self.baseFilename)
        cutoff = datetime.now(timezone.utc).date() - timedelta(days=self.backupCount)
        old = []
        for name in os.listdir(folder):
            if not name.startswith(base + "."):
                continue
            try:
                day = datetime.strptime(name[len(base) + 1:][:10], ROTATED_SUFFIX).date()  # YYYY-MM-DD[.n]
            except ValueError:
                continue
            if day < cutoff:
                old.append(os.path.join(folder, name))
        return old


class _Appending(_Reporting, logging.handlers.WatchedFileHandler):
    """Appends and never rotates; reopens the file when the service has rotated it away."""


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no passwd entry and no LOGNAME/USER (some containers)
        return str(os.getuid())


def process_actor(kind: str) -> dict[str, Any]:
    """The actor of events a process causes by itself: the CLI ("cli"), the service, ``python -m app.worker``."""
    return {"kind": kind, "user": _os_user(), "host": socket.gethostname(), "pid": os.getpid()}


class AuditLog:
    """Writes audit events as JSON lines; thread-safe (the handler's lock serializes writes)."""

    def __init__(self, path: Path | None, *, actor: Mapping[str, Any], rotate: bool = False,
                 retention_days: int = 0, questions: str = "full") -> None:
        self.path = path
        self.actor = dict(actor)  # of events that name no actor of their own
        self.questions = questions
        self.failures = 0
        self._count_lock = threading.Lock()
        self._handler: logging.FileHandler | None = None
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler: logging.FileHandler = _DailyFiles(path, retention_days) if rotate else _Appending(
                path, encoding="utf-8")
        except OSError as exc:
            raise AuditLogError(f"RAG_AUDIT_LOG {path}: cannot write the audit log there "
                                f"({exc.strerror or exc})") from None
        handler.on_error = self._failed  # type: ignore[attr-defined]
        self._handler = handler

    @classmethod
    def from_settings(cls, settings: "Settings", *, actor: Mapping[str, Any], rotate: bool = False) -> "AuditLog":
        return cls(settings.audit_path, actor=actor, rotate=rotate, retention_days=settings.audit_retention_days,
                   questions=settings.audit_questions)

    @classmethod
    def disabled(cls) -> "AuditLog":
        return cls(None, actor={"kind": "none"})

    @property
    def enabled(self) -> bool:
        return self._handler is not None

    def record(self, event: str, *, actor: Mapping[str, Any] | None = None, request_id: str | None = None,
               **details: Any) -> None:
        """Append one event. Never raises: a failed write is logged and counted (fail open)."""
        if self._handler is None:
            return
        try:
            line = json.dumps({"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                               "event": event, "actor": dict(actor) if actor is not None else self.actor,
                               "request_id": request_id, **details},
                              ensure_ascii=False, separators=(",", ":"), default=str)
            self._handler.handle(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))
        except Exception as exc:  # noqa: BLE001 - whatever broke, the request goes on (fail open)
            self._failed(exc)

    def question(self, text: str) -> dict[str, Any]:
        """The question as RAG_AUDIT_QUESTIONS says: in full, as its sha256, or only its length."""
        if self.questions == "full":
            return {"question": text}
        if self.questions == "sha256":
            return {"question_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "question_chars": len(text)}
        return {"question_chars": len(text)}

    def _failed(self, exc: BaseException | None) -> None:
        with self._count_lock:
            self.failures += 1
            failures = self.failures
        log.error("audit trail: could not write an event to %s (%s: %s); going on without it (%d failed so far)",
                  self.path, type(exc).__name__, exc, failures)

    def close(self) -> None:
        if self._handler is not None:
            try:
                self._handler.close()  # flushes: may fail as a write does
            except OSError as exc:
                self._failed(exc)


# --- what the HTTP layer records ----------------------------------------------------------------------


def audit_of(request: "Request") -> AuditLog:
    audit: AuditLog = request.app.state.audit
    return audit


def request_id(request: "Request") -> str | None:
    """The request's id (set on request.state by the request-id middleware), else the client's X-Request-ID."""
    return getattr(request.state, "request_id", None) or request.headers.get("x-request-id")


def client_address(request: "Request") -> str | None:
    return request.client.host if request.client else None


def caller_actor(request: "Request") -> dict[str, Any]:
    """The key a request acts as (request.state.caller), and where it came from."""
    caller = getattr(request.state, "caller", None)
    if caller is None:
        return {"kind": "anonymous", "client": client_address(request)}
    return {"kind": "key" if caller.key_id else "local", "name": caller.name, "key_id": caller.key_id,
            "client": client_address(request)}


def webhook_actor(request: "Request", secret_index: int | None) -> dict[str, Any]:
    """A webhook sender: which configured secret (RAG_WEBHOOK_SECRET, 0-based) signed it; None: none did."""
    return {"kind": "webhook", "signed": secret_index is not None, "secret_index": secret_index,
            "client": client_address(request)}


def requested_by(request: "Request", actor: Mapping[str, Any]) -> dict[str, Any]:
    """Stored in a job's payload, so the job's end names who asked for it."""
    return {"actor": dict(actor), "request_id": request_id(request)}


def query_details(audit: AuditLog, question: str, *, adapter: str | None, top_k: int | None,
                  filters: Any, response: "QueryResponse | None", status: int, error: str | None = None,
                  streamed: bool = False) -> dict[str, Any]:
    """What a query event holds: the question (per RAG_AUDIT_QUESTIONS), what was asked for, what came back."""
    details: dict[str, Any] = {**audit.question(question), "adapter_requested": adapter, "top_k": top_k,
                               "filters": filters, "streamed": streamed, "status": status}
    if response is not None:
        details.update(
            document_ids=[c.document_id for c in response.citations],
            chunk_ids=[c.chunk_id for c in response.citations],
            cited=response.cited, abstained=response.abstained, abstain_reason=response.abstain_reason,
            grounded=response.grounded, adapter=response.provenance.adapter,
            index_generation=response.provenance.index_generation)
    if error is not None:
        details["error"] = error
    return details


def record_query(request: "Request", body: Any, response: "QueryResponse | None" = None, status: int = 200,
                 error: str | None = None, *, streamed: bool = False) -> None:
    """The ``query`` event of a /query request (body: its QueryRequest)."""
    audit = audit_of(request)
    audit.record("query", actor=caller_actor(request), request_id=request_id(request),
                 **query_details(audit, body.question, adapter=body.adapter, top_k=body.top_k,
                                 filters=body.filters.as_dict() if body.filters else None, response=response,
                                 status=status, error=error, streamed=streamed))


def record_rejected_key(request: "Request", status: int, reason: str) -> None:
    """``auth_rejected``: a missing or unknown key (401) or one without the route's scope (403)."""
    from app.access import key_digest

    presented = request.headers.get("authorization", "").partition(" ")[2].strip()
    actor = caller_actor(request)
    if presented and actor["kind"] == "anonymous":
        actor["key_id"] = key_digest(presented)[:12]  # of the key presented: matches no configured key
    audit_of(request).record("auth_rejected", actor=actor, request_id=request_id(request), status=status,
                             method=request.method, path=request.url.path, reason=reason)


# --- what jobs record ---------------------------------------------------------------------------------


def record_job_end(audit: AuditLog, job: "JobRow", requested: Mapping[str, Any] | None) -> None:
    """``<kind>_done`` or ``<kind>_failed`` for a finished job (ingest, refresh, rollback)."""
    details: dict[str, Any] = {"job_id": job.job_id, "requested_by": dict(requested) if requested else None}
    if job.kind == "ingest":
        details["counts"] = job.counts
    else:
        details.update(generation=job.progress.get("generation"),
                       previous_generation=job.progress.get("previous_generation"))
    if job.error:
        details["error"] = job.error
    audit.record(f"{job.kind}_{'done' if job.status == 'succeeded' else 'failed'}",
                 request_id=(requested or {}).get("request_id"), **details)
