"""Running jobs: worker threads inside the service, or one pass in a process of its own.

Two workers run in the service: one for ingest jobs, one for refreshes and rollbacks, so webhook
changes keep flowing while a refresh builds. Each takes the oldest unfinished job of its kinds; a job
found 'running' was interrupted (the process died or stopped) and resumes where it stopped.

``python -m app.worker`` opens the data directory for writing (the single-writer lock), reconciles the
live generation, resumes every unfinished job, and exits: what a restart does, without the HTTP server
or the generator (the crash tests kill and restart it).

A job that hits a full disk fails at once with an error naming the disk and path (no retries: nothing
changes until space is freed), after the stores are reconciled (``Services.recover_from_full_disk``).
When the full ledger refuses even that failure, it is kept in memory and written before anything else
runs; the job is not run again.

Every log line of a job carries its id (``job=...``; app/logs.py), each run is a span ``job <kind>``,
and the service's workers report each ended run to its metrics (``on_end``).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence

from opentelemetry import trace

from app.audit import AuditLog, process_actor, record_job_end
from app.container import Services, refresh_config
from app.logs import configure_logging, job_id_var, log_context
from ingestion.jobs import JobInterrupted, run_ingest_job
from ingestion.ledger import JobRow
from ingestion.refresh import REFRESH_KINDS, RefreshFailed, run_refresh_job
from ingestion.storage_errors import StorageFull, disk_full, raise_if_full

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

INGEST_KINDS = ("ingest",)
ALL_KINDS = INGEST_KINDS + REFRESH_KINDS
Report = Callable[[JobRow, dict], None]  # (job, its progress) after every committed step
JobEnded = Callable[[JobRow, str, float], None]  # (the job as the ledger holds it now, final status, seconds run)


def run_job(services: Services, job: JobRow, *, should_stop: Callable[[], bool] = lambda: False,
            report: Report | None = None, on_end: JobEnded | None = None) -> str:
    """Run or resume one job to its end; returns its final status ('running' if interrupted). A finished
    job's end goes to the audit trail, naming who asked for it (``requested_by`` in its payload), and to
    ``on_end`` (metrics)."""
    started = time.monotonic()
    with log_context(job_id_var, job.job_id), tracer.start_as_current_span(
            f"job {job.kind}", attributes={"rag.job_id": job.job_id, "rag.job_kind": job.kind}) as span:
        status = _run_job(services, job, should_stop=should_stop, report=report)
        span.set_attribute("rag.job_status", status)
        try:
            ended = services.ledger.get_job(job.job_id) or job
        except Exception as exc:  # noqa: BLE001 - a full ledger: the job's end stays unreported
            log.warning("job %s: its end not reported to metrics or the audit trail (%s)", job.job_id, exc)
            return status
        if status in ("succeeded", "failed"):
            record_job_end(services.audit, ended, job.payload.get("requested_by"))
        if on_end is not None:
            on_end(ended, status, time.monotonic() - started)
    return status


def _run_job(services: Services, job: JobRow, *, should_stop: Callable[[], bool],
             report: Report | None) -> str:
    ledger = services.ledger
    if job.job_id in services.unrecorded_failures:
        return _fail(services, job.job_id, services.unrecorded_failures[job.job_id])
    try:
        job = ledger.start_job(job.job_id)
    except Exception as exc:  # a ledger too full to start the job: it stays queued, the worker tries again later
        raise_if_full(exc, "ledger", ledger.path)
        raise
    if services.storage_dirty:  # an earlier write hit a full disk and the stores are not reconciled yet
        note = services.recover_from_full_disk()
        if services.storage_dirty:
            return _fail_full(services, job.job_id, StorageFull("data", services.settings.data_dir), note)
    if job.progress["attempts"] > services.settings.job_max_attempts:
        ledger.finish_job(job.job_id, "failed", error=f"interrupted {job.progress['attempts'] - 1} times; gave up "
                          "(RAG_JOB_MAX_ATTEMPTS)")
        return "failed"
    on_progress = (lambda progress: report(job, progress)) if report else None
    try:
        if job.kind in INGEST_KINDS:
            with services.ingest_turn():  # a refresh switches generations only between ingest jobs
                run_ingest_job(ledger, job, services.indexer(), should_stop=should_stop, report=on_progress)
        else:
            context = services.refresh_context(should_stop=should_stop, report=on_progress)
            run_refresh_job(context, refresh_config(services.settings), job)
    except JobInterrupted:
        log.info("job %s interrupted; it resumes at the next start", job.job_id)
        return "running"
    except Exception as exc:
        if should_stop():
            log.warning("job %s stopped by shutdown (%s); it resumes at the next start", job.job_id, exc)
            return "running"
        full = disk_full(exc, "data", services.settings.data_dir)
        if full is not None:
            return _fail_full(services, job.job_id, full, services.recover_from_full_disk())
        if not isinstance(exc, RefreshFailed):
            log.exception("job %s failed", job.job_id)
        return _fail(services, job.job_id, f"{type(exc).__name__}: {exc}"
                     if not isinstance(exc, RefreshFailed) else str(exc))
    ledger.finish_job(job.job_id, "succeeded")
    log.info("job %s (%s) succeeded", job.job_id, job.kind)
    return "succeeded"


def _fail(services: Services, job_id: str, error: str) -> str:
    """Record the job as failed; when the ledger refuses (full: StorageFull), the error is kept in memory."""
    try:
        services.ledger.finish_job(job_id, "failed", error=error)
    except Exception as exc:
        services.unrecorded_failures[job_id] = error  # written before the job could run again
        raise_if_full(exc, "ledger", services.ledger.path)
        raise
    services.unrecorded_failures.pop(job_id, None)
    return "failed"


def _fail_full(services: Services, job_id: str, full: StorageFull, note: str) -> str:
    error = f"{full} ({note})"
    log.error("job %s failed: %s", job_id, error)
    return _fail(services, job_id, error)


def run_pending(services: Services, kinds: Sequence[str] = ALL_KINDS, *,
                report: Report | None = None) -> dict[str, str]:
    """Run unfinished jobs of these kinds, oldest first, until none is left; returns {job_id: final status}."""
    results: dict[str, str] = {}
    while True:
        jobs = [j for j in services.ledger.unfinished_jobs(kinds, with_payload=True) if j.job_id not in results]
        if not jobs:
            return results
        results[jobs[0].job_id] = run_job(services, jobs[0], report=report)


class JobWorker:
    """A daemon thread that runs the unfinished jobs of some kinds, one at a time."""

    def __init__(self, services: Services, kinds: Sequence[str], name: str, poll_s: float = 5.0,
                 on_end: JobEnded | None = None) -> None:
        self.services = services
        self.kinds = tuple(kinds)
        self.poll_s = poll_s
        self.on_end = on_end
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._recovery_tried = 0.0

    def start(self) -> "JobWorker":
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the current job to stop after its current step (it stays resumable) and wait for it."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _recovery_due(self, every_s: float = 60.0) -> bool:
        if not (self.services.storage_dirty and self.kinds == INGEST_KINDS):
            return False
        if time.monotonic() - self._recovery_tried < every_s:
            return False
        self._recovery_tried = time.monotonic()
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                jobs = self.services.ledger.unfinished_jobs(self.kinds, with_payload=True)
                if jobs:
                    run_job(self.services, jobs[0], should_stop=self._stop.is_set, on_end=self.on_end)
                    continue
                if self._recovery_due():  # reconcile once space is back, without waiting for a job
                    self.services.recover_from_full_disk()
            except Exception as exc:  # the ledger itself failed (full?): keep the thread alive, try again later
                full = disk_full(exc, "ledger", self.services.ledger.path)
                if full is not None:
                    log.error("job worker %s: %s", self._thread.name, full)
                else:
                    log.exception("job worker %s", self._thread.name)
            self._wake.wait(self.poll_s)


def requested_embedding_model(services: Services, ref: str) -> str:
    """``ref`` pinned (a registry model's active version made explicit), checked to exist; ValueError naming
    it and what to do otherwise."""
    from app.container import pinned_embedding_model
    from ingestion.embedder import resolve_embedding_model

    settings = services.settings.model_copy(update={"embedding_model": ref})
    try:
        pinned = pinned_embedding_model(settings)
        resolve_embedding_model(pinned, settings.embedders_dir)
    except (LookupError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"embedding model {ref!r} is not available: {exc}") from None
    return pinned


def submit_refresh(services: Services, kind: str = "refresh", *, actor: dict | None = None,
                   request_id: str | None = None, embedding_model: str | None = None) -> tuple[str, dict]:
    """Queue a refresh or rollback: ("accepted", response), or ("active", {"job_id": the unfinished one})
    when one is already queued or running. Wakes the workers. `actor` (default: this process) asked for it.
    `embedding_model` (a refresh only): build the new generation with this model instead of RAG_EMBEDDING_MODEL
    (checked and pinned here, recorded in the job: a resumed job keeps it)."""
    def respond(job_id: str) -> dict:
        return {"job_id": job_id, "kind": kind, "status": "queued", "status_url": f"/jobs/{job_id}"}

    requested = {"actor": actor or services.audit.actor, "request_id": request_id}
    params: dict = {"requested_by": requested}
    if embedding_model and kind == "refresh":
        params["embedding_model"] = requested_embedding_model(services, embedding_model)
    outcome, response = services.ledger.accept_job(kind, params, respond=respond, unless_active=REFRESH_KINDS)
    services.audit.record(f"{kind}_requested", actor=requested["actor"], request_id=request_id,
                          job_id=response["job_id"], outcome="accepted" if outcome == "accepted" else "already_active")
    if outcome == "accepted":
        services.wake_workers()
    return outcome, response


def start_workers(services: Services, on_end: JobEnded | None = None) -> list[JobWorker]:
    workers = [JobWorker(services, INGEST_KINDS, "ingest-worker", on_end=on_end).start(),
               JobWorker(services, REFRESH_KINDS, "refresh-worker", on_end=on_end).start()]

    def wake_all() -> None:
        for worker in workers:
            worker.wake()

    services.wake_workers = wake_all
    return workers


def start_scheduler(services: Services):
    """The weekly refresh (RAG_REFRESH_CRON in RAG_REFRESH_TIMEZONE) as an APScheduler background job;
    None when the cron expression is empty. A refresh already queued or running makes a tick a no-op."""
    cron = services.settings.refresh_cron
    if not cron:
        return None
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.cron import CronTrigger

    def tick() -> None:
        outcome, response = submit_refresh(services, "refresh", actor={"kind": "schedule", "cron": cron})
        log.info("scheduled refresh: %s (job %s)", outcome, response.get("job_id"))

    timezone = services.settings.refresh_timezone
    scheduler = BackgroundScheduler(timezone=timezone)
    scheduler.add_job(tick, CronTrigger.from_crontab(cron, timezone=timezone), id="weekly-refresh",
                      max_instances=1, coalesce=True, misfire_grace_time=3600)
    scheduler.start()
    return scheduler


def resume_all(settings, *, during: Callable[[Services], Callable[[], None]] | None = None) -> dict[str, str]:
    """What a restart does for jobs: open the data directory for writing, reconcile, reclaim, run every
    unfinished job. `during(services)` may start something alongside (it returns its stop function)."""
    from app.container import build_services
    from ingestion.ledger import writer_lock

    with writer_lock(settings.data_dir):
        audit = AuditLog.from_settings(settings, actor=process_actor("worker"))
        services = build_services(settings, load_generator=False, reconcile=True)
        services.audit = audit
        services.collect_garbage()
        stop = during(services) if during else None
        try:
            return run_pending(services)
        finally:
            if stop:
                stop()
            services.ledger.close()
            services.audit.close()


def main() -> int:
    """Open the data directory (RAG_ settings), resume every unfinished job, exit 0 (2: the audit log cannot
    be written, 3: data dir locked, 4: disk full)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from app.audit import AuditLogError
    from app.settings import Settings
    from ingestion.ledger import DataDirLocked

    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    try:
        results = resume_all(settings)
    except AuditLogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DataDirLocked as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except StorageFull as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    log.info("jobs: %s", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
