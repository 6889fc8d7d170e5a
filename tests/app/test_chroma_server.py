"""The production vector store: a real Chroma server (`chroma run`) on a free loopback port, and the whole
lifecycle through RAG_CHROMA_HOST/PORT: `rag ingest`, /query with citations, webhook updates and deletes,
refresh (a new collection on the server, the retired one dropped), rollback, a restart of the app and the
server on the same data, and the server going away while the app runs (a 503 and failed jobs naming
RAG_CHROMA_HOST, and everything working again once it is back), or hanging (a 503 after RAG_CHROMA_TIMEOUT_S).

The tests run in order on one deployment: each starts from the state the previous one left.
"""

from __future__ import annotations

import json
import time

import chromadb
import pytest
from fastapi.testclient import TestClient

import app.container
from app.cli.service import ingest_paths
from app.main import create_app
from tests.app.conftest import (SECRET, found_documents, found_texts, make_settings, marker, signed_headers,
                                synthetic_documents, wait_for_job, webhook_body)

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": "Bearer " + "a" * 24}
N_DOCS = 6


class Deployment:
    """The service over a Chroma server, started and stopped like a process (the app's own lifespan:
    writer lock, build_services, reconcile, garbage collection, job workers)."""

    def __init__(self, settings, server) -> None:
        self.settings, self.server = settings, server
        self.client: TestClient | None = None

    @property
    def services(self):
        return self.client.app.state.services

    def serve(self) -> TestClient:
        self.client = TestClient(create_app(self.settings))
        self.client.__enter__()
        return self.client

    def stop(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.__exit__(None, None, None)

    def server_collections(self) -> dict[str, int]:
        """{collection name: vectors} as the server itself reports them (a client of its own)."""
        client = chromadb.HttpClient(host="127.0.0.1", port=self.server.port,
                                     settings=chromadb.config.Settings(anonymized_telemetry=False))
        return {c.name: client.get_collection(c.name).count() for c in client.list_collections()}


@pytest.fixture(scope="module")
def deployment(chroma_server, tmp_path_factory, embedder):
    data = tmp_path_factory.mktemp("chroma-server-app")
    settings = make_settings(data, chroma_host="127.0.0.1", chroma_port=chroma_server.port, webhook_secret=SECRET,
                             admin_api_keys="a" * 24, refresh_cron="", ingest_batch_documents=4,
                             refresh_golden_sample=4, max_new_tokens=32,
                             chroma_timeout_s=5)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(app.container, "build_embedder", lambda _settings: embedder)  # the session's, loaded once
        deployment = Deployment(settings, chroma_server)
        yield deployment
        deployment.stop()


def consistent(services) -> int:
    """Ledger, Chroma (through the service's client) and BM25 hold the same chunk ids; returns how many."""
    generation = services.live.generation.generation
    ledger_ids = services.ledger.chunk_ids(generation)
    assert ledger_ids == set(services.live.dense.iter_ids()) == set(services.live.retriever.bm25.ids.tolist())
    return len(ledger_ids)


def ingest(client, documents=(), deletes=()) -> dict:
    body = webhook_body(documents, deletes)
    response = client.post("/ingest", content=body, headers=signed_headers(body))
    assert response.status_code == 202, response.text
    return wait_for_job(client, response.json()["job_id"], headers=ADMIN)


def refresh(client, path: str = "/refresh") -> dict:
    response = client.post(path, headers=ADMIN)
    assert response.status_code == 202, response.text
    return wait_for_job(client, response.json()["job_id"], headers=ADMIN)


def ask(client, i: int, **extra):
    question = f"What do the field notes for {marker('doc', i, 0)} record?"
    return client.post("/query", json={"question": question, "top_k": 3, **extra}, headers=ADMIN)


def test_rag_ingest_then_query_cites_the_documents(deployment, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"document_id": d.document_id, "text": d.text, "title": d.title}) + "\n"
                              for d in synthetic_documents(N_DOCS)))
    counts = ingest_paths(deployment.settings, [corpus])  # what `rag ingest` does, without a service running
    assert counts["added"] == N_DOCS
    assert deployment.server_collections() == {"chunks_g1": N_DOCS}
    assert not deployment.settings.chroma_path.exists()  # nothing embedded, nothing path-based

    client = deployment.serve()
    response = ask(client, 2)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["citations"][0]["document_id"] == "doc-002"
    assert marker("doc", 2, 0) in answer["citations"][0]["text"]
    assert answer["provenance"]["index_collection"] == "chunks_g1"
    assert consistent(deployment.services) == N_DOCS


def test_webhook_update_and_delete_change_what_is_found(deployment):
    client, services = deployment.client, deployment.services
    job = ingest(client, synthetic_documents(1, version=1) + synthetic_documents(1, start=N_DOCS),
                 deletes=["doc-001"])
    assert job["status"] == "succeeded", job
    assert job["counts"]["updated"] == 1 and job["counts"]["added"] == 1 and job["counts"]["deleted"] == 1
    assert found_documents(services, marker("doc", 0, 1))[0] == "doc-000"
    assert not any(marker("doc", 0, 0) in text for text in found_texts(services, marker("doc", 0, 0), k=50))
    assert "doc-001" not in found_documents(services, marker("doc", 1, 0), k=50)
    assert found_documents(services, marker("doc", N_DOCS, 0))[0] == f"doc-{N_DOCS:03d}"
    assert consistent(services) == N_DOCS
    assert deployment.server_collections() == {"chunks_g1": N_DOCS}


def test_refresh_builds_a_new_collection_on_the_server_and_rollback_returns(deployment):
    client, services = deployment.client, deployment.services
    job = refresh(client)
    assert job["status"] == "succeeded", job
    assert services.live.generation.generation == 2
    assert deployment.server_collections() == {"chunks_g1": N_DOCS, "chunks_g2": N_DOCS}  # g1: previous
    job = refresh(client)
    assert job["status"] == "succeeded", job
    assert job["progress"]["dropped_generations"] == [1]
    assert deployment.server_collections() == {"chunks_g2": N_DOCS, "chunks_g3": N_DOCS}  # g1 retired, dropped

    assert ingest(client, synthetic_documents(1, start=3, version=2))["status"] == "succeeded"
    job = refresh(client, "/refresh/rollback")
    assert job["status"] == "succeeded", job
    assert services.live.generation.generation == 2
    assert services.ledger.generation(3).state == "previous"
    assert found_documents(services, marker("doc", 3, 2))[0] == "doc-003"  # a change made after g2 went out
    assert not any(marker("doc", 3, 0) in text for text in found_texts(services, marker("doc", 3, 0), k=50))
    assert consistent(services) == N_DOCS
    assert deployment.server_collections() == {"chunks_g2": N_DOCS, "chunks_g3": N_DOCS}
    assert not deployment.settings.chroma_path.exists()


def test_restart_of_app_and_server_finds_everything(deployment):
    services = deployment.services
    live = services.live.generation.generation
    ledger_ids = services.ledger.chunk_ids(live)
    collections = deployment.server_collections()
    documents = deployment.client.get("/health", headers=ADMIN).json()["documents"]

    deployment.stop()
    deployment.server.restart()
    client = deployment.serve()
    services = deployment.services
    assert services.live.generation.generation == live
    assert services.ledger.chunk_ids(live) == ledger_ids
    assert consistent(services) == len(ledger_ids) == N_DOCS
    assert deployment.server_collections() == collections
    health = client.get("/health", headers=ADMIN).json()
    assert health["documents"] == documents == N_DOCS and health["chunks"] == N_DOCS
    assert health["previous_generation"] == 3
    for i in (0, 2, 3, 4, 5, N_DOCS):
        version = {0: 1, 3: 2}.get(i, 0)
        assert found_documents(services, marker("doc", i, version))[0] == f"doc-{i:03d}"
    response = ask(client, 4)
    assert response.status_code == 200, response.text
    assert response.json()["citations"][0]["document_id"] == "doc-004"


def test_server_gone_is_a_503_and_failed_jobs_naming_the_setting_then_recovers(deployment):
    client, services = deployment.client, deployment.services
    deployment.server.stop()

    response = ask(client, 5)
    assert response.status_code == 503, response.text
    assert "RAG_CHROMA_HOST" in response.json()["detail"] and response.headers.get("retry-after")
    streamed = ask(client, 5, stream=True)  # the error comes as an event
    error = json.loads(streamed.text.split("event: error\ndata: ")[1].split("\n")[0])
    assert error["status"] == 503 and "RAG_CHROMA_HOST" in error["detail"], streamed.text
    job = ingest(client, synthetic_documents(1, start=7))
    assert job["status"] == "failed" and "RAG_CHROMA_HOST" in job["error"], job
    job = refresh(client)
    assert job["status"] == "failed" and "RAG_CHROMA_HOST" in job["error"], job
    assert services.live.generation.generation == 2
    assert client.get("/health").status_code == 200

    deployment.server.start()  # back on the same path and port: the running service needs no restart
    response = ask(client, 5)
    assert response.status_code == 200, response.text
    assert response.json()["citations"][0]["document_id"] == "doc-005"
    assert ingest(client, synthetic_documents(1, start=7))["status"] == "succeeded"
    assert found_documents(services, marker("doc", 7, 0))[0] == "doc-007"
    assert consistent(services) == N_DOCS + 1


def test_server_that_stops_answering_is_a_503_within_the_timeout_not_a_hang(deployment):
    client = deployment.client
    deployment.server.pause()
    try:
        started = time.monotonic()
        response = ask(client, 5)
        waited = time.monotonic() - started
    finally:
        deployment.server.resume()
    assert response.status_code == 503 and "RAG_CHROMA_HOST" in response.json()["detail"], response.text
    assert waited < deployment.settings.chroma_timeout_s + 10
    assert ask(client, 5).status_code == 200
