"""End to end against a real `rag serve` process: signed ingest, kill -9 in the middle of the job,
restart, the job finishes, and /query cites the new text and never the deleted or replaced text.
Then `rag refresh` goes through the running service."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import MODEL_CACHE, SECRET, marker, signed_headers, synthetic_documents, webhook_body
from tests.net import free_port

RAG = Path(sys.executable).with_name("rag")


def start(env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(RAG), "serve"], env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def wait_healthy(client: httpx.Client, process: subprocess.Popen, log: Path, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            return client.get("/health", timeout=2).raise_for_status().json()
        except httpx.HTTPError:
            time.sleep(0.5)
    raise AssertionError("the service did not come up:\n" + log.read_text()[-3000:])


def job_row(data: Path, job_id: str) -> tuple[str, dict]:
    db = sqlite3.connect(f"file:{data / 'ledger.sqlite3'}?mode=ro", uri=True)
    try:
        status, progress = db.execute("SELECT status, progress_json FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    finally:
        db.close()
    return status, json.loads(progress)


def wait_job(client: httpx.Client, job_id: str, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish")


def ingest(client: httpx.Client, documents=(), deletes=()) -> str:
    body = webhook_body(documents, deletes)
    response = client.post("/ingest", content=body, headers=signed_headers(body))
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def cited(client: httpx.Client, question: str) -> list[dict]:
    response = client.post("/query", json={"question": question, "top_k": 3}, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()["citations"]


@pytest.mark.slow
def test_signed_ingest_survives_kill_9_and_restart(tmp_path):
    data, log, port = tmp_path / "data", tmp_path / "serve.log", free_port()
    env = {**os.environ, "RAG_DATA_DIR": str(data), "RAG_MODEL_CACHE_DIR": str(MODEL_CACHE), "RAG_HOST": "127.0.0.1",
           "RAG_PORT": str(port), "RAG_WEBHOOK_SECRET": SECRET, "RAG_REFRESH_CRON": "", "RAG_MAX_NEW_TOKENS": "8",
           "RAG_INGEST_BATCH_DOCUMENTS": "2", "RAG_REFRESH_GOLDEN_SAMPLE": "8", "RAG_API_KEYS": "",
           "RAG_ADMIN_API_KEYS": ""}
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    server = start(env, log)
    try:
        wait_healthy(client, server, log)
        assert wait_job(client, ingest(client, synthetic_documents(6)))["status"] == "succeeded"

        # doc-000 replaced, doc-001 deleted, 30 new documents: 16 checkpointed steps to die in the middle of
        job_id = ingest(client, synthetic_documents(1, version=1) + synthetic_documents(30, start=6),
                        deletes=["doc-001"])
        while True:
            status, progress = job_row(data, job_id)
            if status == "running" and progress.get("done", 0) >= 4:
                break
            assert status in ("queued", "running"), "the job ended before the kill"
            time.sleep(0.05)
        server.send_signal(signal.SIGKILL)
        server.wait(30)
        status, progress = job_row(data, job_id)
        assert status == "running" and progress["done"] < progress["total"]

        server = start(env, log)
        wait_healthy(client, server, log)
        job = wait_job(client, job_id)
        assert job["status"] == "succeeded", job
        assert job["counts"] == {"added": 30, "updated": 1, "unchanged": 0, "deleted": 1,
                                 "chunks_written": 31, "chunks_removed": 2}
        assert job["progress"]["attempts"] == 2

        new = cited(client, f"What did survey {marker('doc', 0, 1)} measure?")
        assert any(c["document_id"] == "doc-000" and marker("doc", 0, 1) in c["text"] for c in new)
        old = cited(client, f"What did survey {marker('doc', 0, 0)} measure?")
        assert not any(marker("doc", 0, 0) in c["text"] for c in old)
        deleted = cited(client, f"What did survey {marker('doc', 1, 0)} measure?")
        assert not any(c["document_id"] == "doc-001" for c in deleted)
        late = cited(client, f"What did survey {marker('doc', 35, 0)} measure?")
        assert late[0]["document_id"] == "doc-035"

        # the on-demand refresh goes through the running service (one writer), with progress
        result = subprocess.run([str(RAG), "refresh"], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "through the running service" in result.stdout and '"status": "succeeded"' in result.stdout
        health = client.get("/health").json()
        assert health["index_generation"] == 2 and health["previous_generation"] == 1
        assert health["documents"] == 35 and not health["refresh_running"]
        assert cited(client, f"What did survey {marker('doc', 0, 1)} measure?")[0]["document_id"] == "doc-000"
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
        client.close()
