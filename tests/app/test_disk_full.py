"""A full disk during ingestion: `rag ingest` and webhook jobs fail at once with the disk and path named, leave
ledger = Chroma = BM25, and the next job after space comes back succeeds without freezing the process.

The fast tests simulate the full disk: the write boundary (Chroma's upsert, the ledger's chunk insert, the
ledger's job update) raises what that store raises on a real full disk, part-way through a job, so they
need no root. The slow test fills a real 16 MiB tmpfs (root and a private mount namespace: `unshare -m`;
skipped where mounting is refused) and is the one that shows the freeze: chromadb 1.5.9's embedded client,
once a write of it hit the full disk, hangs on a later write while holding the GIL.
"""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app.container import build_services
from app.main import create_app
from app.worker import run_job
from ingestion.jobs import ingest_payload
from ingestion.storage_errors import StorageFull
from retrieval.bm25 import BM25Index
from retrieval.dense import DenseIndex, chroma_client
from tests.app.conftest import (REPO, SECRET, make_settings, signed_headers, synthetic_documents, wait_for_job,
                                webhook_body)

CHROMA_FULL = "Query error: Database error: error returned from database: (code: 13) database or disk is full"


def store_counts(services) -> tuple[int, int, int]:
    """(ledger, Chroma, BM25) chunk counts of the live generation, each read from its own store."""
    generation = services.ledger.live_generation()
    dense = DenseIndex(chroma_client(path=services.settings.chroma_path), generation.collection,
                       embedding_model=services.settings.embedding_model, dimension=services.embedder.dimension)
    bm25 = BM25Index.load(services.settings.bm25_path / f"g{generation.generation}")
    return services.ledger.count_chunks(generation.generation), dense.count(), len(bm25) if bm25 else 0


def fail_chroma_upsert(monkeypatch, *, after_calls: int = 1) -> None:
    """Chroma's upsert fills the disk on call `after_calls + 1`, having written half of that batch."""
    from chromadb.errors import InternalError

    real, calls = DenseIndex.upsert, []

    def upsert(self, ids, vectors, metadatas, **kwargs):
        calls.append(len(ids))
        if len(calls) > after_calls:
            half = max(len(ids) // 2, 1)
            real(self, ids[:half], vectors[:half], metadatas[:half])
            raise InternalError(CHROMA_FULL)
        return real(self, ids, vectors, metadatas, **kwargs)

    monkeypatch.setattr(DenseIndex, "upsert", upsert)


def accept(services, documents) -> str:
    """Queue an ingest job of `documents` as the webhook does; returns its id."""
    return services.ledger.accept_job("ingest", ingest_payload(documents, []),
                                      respond=lambda job_id: {"job_id": job_id})[1]["job_id"]


@pytest.fixture
def services(tmp_path, embedder):
    services = build_services(make_settings(tmp_path / "data", load_generator=False, refresh_cron="",
                                            ingest_batch_documents=4, webhook_secret=SECRET), embedder=embedder)
    yield services
    services.ledger.close()


def test_rag_ingest_on_a_full_disk_prints_one_line_naming_the_path_and_reconciles(tmp_path, embedder, monkeypatch):
    import app.container
    from app.cli import cli

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"document_id": d.document_id, "text": d.text}) + "\n"
                              for d in synthetic_documents(12)))
    data = tmp_path / "data"
    for name, value in {"RAG_DATA_DIR": str(data), "RAG_LOAD_GENERATOR": "false", "RAG_INGEST_BATCH_DOCUMENTS": "4",
                        "RAG_MODEL_CACHE_DIR": str(REPO / ".cache" / "models")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(app.container, "build_embedder", lambda settings: embedder)
    fail_chroma_upsert(monkeypatch, after_calls=1)  # the first batch of 4 lands, the second fills the disk

    result = CliRunner().invoke(cli, ["ingest", str(corpus)])
    output = result.output  # stdout and stderr
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    assert lines[0].startswith(f"error: disk full: {data / 'chroma'} (chroma) — ") and "free on " in lines[0]
    assert "free space and retry" in lines[0] and "reconciled: 4 chunks each" in lines[0]

    monkeypatch.undo()  # space came back
    settings = make_settings(data, load_generator=False)
    after = build_services(settings, embedder=embedder)
    assert store_counts(after) == (4, 4, 4)  # consistent before any later start reconciles
    after.ledger.close()


def test_a_job_on_a_full_disk_fails_at_once_naming_the_disk_and_the_next_job_succeeds(services, monkeypatch):
    real_insert = services.ledger.insert_chunks
    inserts = []

    def insert_chunks(db, generation, chunks):  # one call a document; the second step (after its Chroma upsert)
        inserts.append(1)                        # fills the ledger
        if len(inserts) > 4:
            raise sqlite3.OperationalError("database or disk is full")
        return real_insert(db, generation, chunks)

    monkeypatch.setattr(services.ledger, "insert_chunks", insert_chunks)
    old_client = services.chroma
    with TestClient(create_app(services.settings, services=services)) as client:
        body = webhook_body(synthetic_documents(12))
        response = client.post("/ingest", content=body, headers=signed_headers(body))
        assert response.status_code == 202, response.text
        started = time.monotonic()
        job = wait_for_job(client, response.json()["job_id"], timeout_s=60)
        assert time.monotonic() - started < 30  # no retry loop
        assert job["status"] == "failed", job
        assert job["error"].startswith(f"disk full: {services.settings.ledger_path} (ledger) — ")
        assert "free space and retry" in job["error"] and "reconciled: 4 chunks each" in job["error"]
        assert services.ledger.get_job(job["job_id"]).progress["attempts"] == 1
        assert store_counts(services) == (4, 4, 4)  # the second step's vectors (orphans) removed at once
        assert services.chroma is not old_client  # the client that saw the full disk is not written again
        assert client.get("/health").status_code == 200

        monkeypatch.undo()  # space came back
        body = webhook_body(synthetic_documents(12, prefix="next"))
        response = client.post("/ingest", content=body, headers=signed_headers(body))
        job = wait_for_job(client, response.json()["job_id"], timeout_s=120)
        assert job["status"] == "succeeded", job
        assert store_counts(services) == (16, 16, 16)
        assert client.get("/health").json()["chunks"] == 16


def test_a_failure_the_full_ledger_cannot_record_is_kept_and_the_job_not_run_again(services, monkeypatch):
    fail_chroma_upsert(monkeypatch, after_calls=0)
    job_id = accept(services, synthetic_documents(4))
    real_finish = services.ledger.finish_job

    def finish_job(*args, **kwargs):  # the full ledger refuses to record the failure once
        monkeypatch.setattr(services.ledger, "finish_job", real_finish)
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(services.ledger, "finish_job", finish_job)
    with pytest.raises(StorageFull, match=r"\(ledger\)"):
        run_job(services, services.ledger.get_job(job_id, with_payload=True))
    assert services.ledger.get_job(job_id).status == "running" and job_id in services.unrecorded_failures

    assert run_job(services, services.ledger.get_job(job_id, with_payload=True)) == "failed"
    job = services.ledger.get_job(job_id)
    assert job.progress["attempts"] == 1  # recorded, not run again
    assert job.error.startswith(f"disk full: {services.settings.chroma_path} (chroma) — ")
    assert not services.unrecorded_failures and store_counts(services) == (0, 0, 0)


def test_a_step_is_refused_below_the_free_space_margin_before_anything_is_written(services):
    services.settings.min_free_disk_mb = 1 << 40  # more than any disk here has
    job_id = accept(services, synthetic_documents(4))
    assert run_job(services, services.ledger.get_job(job_id, with_payload=True)) == "failed"
    error = services.ledger.get_job(job_id).error
    assert error.startswith(f"disk full: {services.settings.ledger_path} (ledger) — ") and "margin" in error
    assert store_counts(services) == (0, 0, 0)


def full_disk_probe(data_dir: str) -> None:
    """Runs in a subprocess with `data_dir` on a fresh 16 MiB tmpfs; prints one JSON line of what happened."""
    import faulthandler

    faulthandler.dump_traceback_later(240, exit=True)  # a hang fails the test with the stuck stack
    settings = make_settings(Path(data_dir), load_generator=False, refresh_cron="", ingest_batch_documents=4,
                             min_free_disk_mb=0)  # no margin: let the stores hit the full disk themselves
    services = build_services(settings, embedder=None)

    def job(job_id: str) -> tuple[str, str | None, int]:
        for _ in range(3):
            try:
                status = run_job(services, services.ledger.get_job(job_id, with_payload=True))
                break
            except StorageFull:  # the ledger could not record the failure yet
                time.sleep(0.1)
        row = services.ledger.get_job(job_id)
        return status, row.error, row.progress.get("attempts")

    result = {"first": job(accept(services, synthetic_documents(8)))}
    big = accept(services, synthetic_documents(60, prefix="full"))  # accepted while there was room
    stat = os.statvfs(data_dir)
    with open(Path(data_dir) / "filler", "wb") as filler:
        filler.write(b"\0" * max(stat.f_bavail * stat.f_frsize - 300 * 1024, 0))
    result["full"] = job(big)
    os.remove(Path(data_dir) / "filler")  # space came back
    result["next"] = job(accept(services, synthetic_documents(8, prefix="next")))
    result["next_again"] = job(accept(services, synthetic_documents(8, prefix="again")))
    result["counts_next"] = store_counts(services)
    print("RESULT " + json.dumps(result), flush=True)


@pytest.mark.slow
def test_a_real_full_disk_fails_the_job_clearly_and_the_next_jobs_do_not_freeze(tmp_path):
    if not shutil.which("unshare") or os.geteuid() != 0:
        pytest.skip("needs root and unshare to mount a small tmpfs")
    data = tmp_path / "data"
    data.mkdir()
    script = ("mount -t tmpfs -o size=16m tmpfs \"$1\" || exit 97; exec \"$2\" -c "
              "'import sys; from tests.app.test_disk_full import full_disk_probe; full_disk_probe(sys.argv[1])' \"$1\"")
    try:
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(data),
                               sys.executable], cwd=REPO, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the probe hung: {exc.stderr}")
    if done.returncode == 97 or "unshare failed" in done.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()[-200:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    result = json.loads(lines[0][len("RESULT "):])
    assert result["first"][0] == "succeeded"
    status, error, attempts = result["full"]
    assert status == "failed" and attempts == 1, result
    assert error.startswith("disk full: ") and " free on tmpfs (mounted at " in error
    assert "free space and retry" in error
    assert result["next"][0] == "succeeded" and result["next_again"][0] == "succeeded", result
    ledger, chroma, bm25 = result["counts_next"]
    assert ledger == chroma == bm25 >= 24, result
