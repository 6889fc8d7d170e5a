"""Ledger jobs and idempotency claims: one transaction, replay, conflict, expiry; build bookkeeping."""

import time

from ingestion.documents import Document
from ingestion.ledger import Ledger


def respond(job_id: str) -> dict:
    return {"job_id": job_id}


def test_claims_replay_conflict_and_expire(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    claim = ("key:abc", "hash-1", 3600.0)
    outcome, first = ledger.accept_job("ingest", {"n": 1}, claims=[claim], respond=respond)
    assert outcome == "accepted"
    assert ledger.accept_job("ingest", {"n": 1}, claims=[claim], respond=respond) == ("replayed", first)
    assert ledger.accept_job("ingest", {"n": 2}, claims=[("key:abc", "hash-2", 3600.0)],
                             respond=respond) == ("conflict", {})
    assert len(ledger.unfinished_jobs(("ingest",))) == 1
    time.sleep(0.01)
    outcome, again = ledger.accept_job("ingest", {"n": 2}, claims=[("key:abc", "hash-2", 0.001)], respond=respond)
    assert outcome == "accepted" and again != first  # the old claim expired
    job = ledger.start_job(first["job_id"])
    assert job.status == "running" and job.progress["attempts"] == 1 and job.payload == {"n": 1}
    assert ledger.start_job(first["job_id"]).progress["attempts"] == 2
    ledger.finish_job(first["job_id"], "succeeded")
    finished = ledger.get_job(first["job_id"], with_payload=True)
    assert finished.status == "succeeded" and finished.payload == {} and finished.finished_at
    ledger.close()


def test_only_one_refresh_at_a_time(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    kinds = ("refresh", "rollback")
    outcome, first = ledger.accept_job("refresh", {}, respond=respond, unless_active=kinds)
    assert outcome == "accepted"
    assert ledger.accept_job("rollback", {}, respond=respond, unless_active=kinds) == ("active", first)
    ledger.finish_job(first["job_id"], "failed", error="x")
    assert ledger.accept_job("rollback", {}, respond=respond, unless_active=kinds)[0] == "accepted"
    ledger.close()


def test_documents_to_build_follow_versions_and_states(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    with ledger.transaction() as db:
        for name in ("a", "b", "c"):
            ledger.upsert_document(db, Document(name, f"text {name}"))
    assert [r.document.document_id for r in ledger.documents_to_build(7, 10)] == ["a", "b", "c"]
    with ledger.transaction() as db:
        ledger.record_built(db, 7, [("a", 1), ("b", 1), ("c", 1)])
    assert ledger.documents_to_build(7, 10) == [] and ledger.count_built(7) == 3
    with ledger.transaction() as db:
        ledger.upsert_document(db, Document("b", "text b changed"))  # version 2
        ledger.mark_deleted(db, "c")
        ledger.upsert_document(db, Document("d", "new"))
    assert [r.document.document_id for r in ledger.documents_to_build(7, 10)] == ["b", "d"]
    assert ledger.documents_to_unbuild(7, 10) == ["c"]
    assert ledger.count_documents_to_build(7) == 2
    ledger.close()
