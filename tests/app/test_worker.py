"""The job worker: a job interrupted more than RAG_JOB_MAX_ATTEMPTS times is given up, not run again."""

from app.container import build_services
from app.worker import run_job
from ingestion.jobs import ingest_payload
from tests.app.conftest import make_settings, synthetic_documents


def test_a_job_started_more_than_the_limit_is_failed_and_not_run(tmp_path, embedder):
    """Attempts within the limit run the job; the attempt past it fails it with the "gave up" message."""
    services = build_services(make_settings(tmp_path, load_generator=False, job_max_attempts=2), embedder=embedder)
    try:
        def queued(start: int) -> str:
            documents = synthetic_documents(2, start=start)
            return services.ledger.accept_job("ingest", ingest_payload(documents, []),
                                              respond=lambda job_id: {"job_id": job_id})[1]["job_id"]

        def run_after(interruptions: int, job_id: str) -> str:
            for _ in range(interruptions):  # each start of an earlier worker that died mid-job
                services.ledger.start_job(job_id)
            return run_job(services, services.ledger.get_job(job_id, with_payload=True))

        within = queued(0)
        assert run_after(1, within) == "succeeded"  # attempt 2 of 2
        beyond = queued(2)
        assert run_after(2, beyond) == "failed"  # attempt 3 of 2
        job = services.ledger.get_job(beyond)
        assert job.error == "interrupted 2 times; gave up (RAG_JOB_MAX_ATTEMPTS)"
        assert job.progress["attempts"] == 3 and services.ledger.get_job(within).progress["attempts"] == 2
        assert services.ledger.get_document("doc-001") and services.ledger.get_document("doc-002") is None
    finally:
        services.ledger.close()
