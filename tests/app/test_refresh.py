"""The full refresh in one process: queries keep working, webhook changes reach the new generation,
validation failures leave the live generation serving, rollback, retired generations are reclaimed."""

import dataclasses
import json
import random
import threading
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app.container import build_services, refresh_config
from app.main import create_app
from ingestion.jobs import run_ingest_job
from ingestion.refresh import RefreshFailed, run_refresh_job
from tests.app.conftest import (SECRET, found_documents, found_texts, make_settings, marker, signed_headers,
                                synthetic_documents, wait_for_job, webhook_body)

ADMIN = {"Authorization": "Bearer " + "a" * 24}
N_DOCS = 24


@pytest.fixture(scope="module")
def service(tmp_path_factory, embedder):
    settings = make_settings(tmp_path_factory.mktemp("refresh"), webhook_secret=SECRET, admin_api_keys="a" * 24,
                             load_generator=False, refresh_cron="", ingest_batch_documents=4,
                             refresh_golden_sample=8)
    services = build_services(settings, embedder=embedder)
    services.indexer().apply(synthetic_documents(N_DOCS))
    yield services
    services.ledger.close()


@contextmanager
def http(services):
    """The app over these services, its job workers running only inside the block (tests that run jobs
    directly must not have a worker pick the same job up)."""
    with TestClient(create_app(services.settings, services=services)) as client:
        yield client


def state(services, generation: int) -> tuple[set, set, set]:
    """(ledger, Chroma, BM25) chunk ids of a generation that is live."""
    assert services.generation.generation == generation
    return (services.ledger.chunk_ids(generation), set(services.dense.iter_ids()), set(services.bm25.ids.tolist()))


def collections(services) -> set[str]:
    return {c.name for c in services.chroma.list_collections()}


def queue(services, kind: str):
    _, response = services.ledger.accept_job(kind, {}, respond=lambda job_id: {"job_id": job_id})
    return services.ledger.start_job(response["job_id"])


def test_refresh_requires_admin_key(service):
    with http(service) as client:
        assert client.post("/refresh").status_code == 401
        assert client.post("/refresh/rollback", headers={"Authorization": "Bearer " + "x" * 24}).status_code == 401


def test_refresh_with_queries_and_webhook_changes_throughout(service):
    with http(service) as client:
        _refresh_with_queries_and_webhook_changes(client, service)


def _refresh_with_queries_and_webhook_changes(client, services):
    errors, empty, answered = [], [], []
    stop = threading.Event()

    def ask(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            i = rng.randrange(8, N_DOCS)  # documents the webhook leaves alone
            try:
                found = found_documents(services, marker("doc", i, 0), k=3)
            except Exception as exc:  # noqa: BLE001 - any failure counts
                errors.append(repr(exc))
                continue
            (answered if found and found[0] == f"doc-{i:03d}" else empty).append((i, found))

    readers = [threading.Thread(target=ask, args=(seed,)) for seed in range(2)]
    for reader in readers:
        reader.start()
    before = services.generation.generation
    response = client.post("/refresh", headers=ADMIN)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert client.post("/refresh", headers=ADMIN).status_code == 409  # one at a time
    assert client.get("/health", headers=ADMIN).json()["refresh_running"] is True
    # a webhook change while the refresh runs: it must be in the new generation when it goes live
    body = webhook_body(synthetic_documents(1, start=5, version=1), deletes=["doc-006"])
    change = client.post("/ingest", content=body, headers=signed_headers(body))
    job = wait_for_job(client, job_id, headers=ADMIN)
    assert wait_for_job(client, change.json()["job_id"], headers=ADMIN)["status"] == "succeeded"
    stop.set()
    for reader in readers:
        reader.join()

    assert job["status"] == "succeeded", job
    assert job["progress"]["validation"]["golden_recall"] >= 0.8
    assert not errors and not empty, (errors[:3], empty[:3])
    assert len(answered) > 10
    after = services.generation.generation
    assert after == before + 1
    ledger_ids, chroma_ids, bm25_ids = state(services, after)
    assert ledger_ids == chroma_ids == bm25_ids
    assert found_documents(services, marker("doc", 5, 1))[0] == "doc-005"
    assert "doc-006" not in found_documents(services, marker("doc", 6, 0), k=50)
    health = client.get("/health", headers=ADMIN).json()
    assert health["index_generation"] == after and health["previous_generation"] == before
    assert health["refresh_running"] is False and health["documents"] == N_DOCS - 1


def test_changes_made_during_the_build_reach_the_new_generation(service):
    """Deterministic version of the race: ingest jobs run between the build's steps, on documents the
    build has already written and on documents it has not reached yet."""
    services = service
    done_once = []
    changes = synthetic_documents(1, start=1, version=2) + synthetic_documents(1, start=22, version=2)

    def ingest_during_build(progress: dict) -> None:
        if progress.get("phase") == "building" and progress["done"] >= 8 and not done_once:
            done_once.append(True)
            _, response = services.ledger.accept_job(
                "ingest", {"documents": [dataclasses.asdict(d) for d in changes], "deletes": ["doc-023"]},
                respond=lambda job_id: {"job_id": job_id})
            ingest = services.ledger.start_job(response["job_id"])
            with services.ingest_turn():
                run_ingest_job(services.ledger, ingest, services.indexer())

    previous = services.generation.generation
    run_refresh_job(services.refresh_context(report=ingest_during_build), refresh_config(services.settings),
                    queue(services, "refresh"))
    assert done_once and services.generation.generation == previous + 1
    assert found_documents(services, marker("doc", 1, 2))[0] == "doc-001"
    assert found_documents(services, marker("doc", 22, 2))[0] == "doc-022"
    assert "doc-023" not in found_documents(services, marker("doc", 23, 0), k=50)
    texts = " ".join(c.text for c in services.ledger.iter_chunks(services.generation.generation))
    assert marker("doc", 1, 0) not in texts and marker("doc", 22, 0) not in texts
    ledger_ids, chroma_ids, bm25_ids = state(services, services.generation.generation)
    assert ledger_ids == chroma_ids == bm25_ids
    # three generations existed; the oldest is dropped, its collection, BM25 folder and rows with it
    states = {g.generation: g.state for g in services.ledger.generations()}
    assert states[previous] == "previous" and states[previous - 1] == "dropped"
    dropped = services.ledger.generation(previous - 1)
    assert dropped.collection not in collections(services)
    assert not (services.settings.bm25_path / f"g{previous - 1}").exists()
    assert services.ledger.count_chunks(previous - 1) == 0


def test_failed_validation_leaves_the_live_generation_serving(service, tmp_path):
    services = service
    live = services.generation.generation
    base = refresh_config(services.settings)
    golden = tmp_path / "golden.jsonl"
    golden.write_text(json.dumps({"query": "an unrelated question about bananas", "document_id": "doc-010"}) + "\n")
    failures = {
        "chunk count": dataclasses.replace(base, min_chunk_ratio=1.5, max_chunk_ratio=2.0),
        "golden query recall": dataclasses.replace(base, golden_queries=golden, golden_top_k=1, min_recall=1.0),
    }
    for reason, config in failures.items():
        job = queue(services, "refresh")
        with pytest.raises(RefreshFailed, match=reason):
            run_refresh_job(services.refresh_context(), config, job)
        failed = services.ledger.generation(services.ledger.get_job(job.job_id).progress["generation"])
        assert failed.state == "failed"
        assert failed.collection not in collections(services)
        assert services.ledger.count_chunks(failed.generation) == 0
        assert not (services.settings.bm25_path / f"g{failed.generation}").exists()
        services.ledger.finish_job(job.job_id, "failed", error=reason)
        assert services.generation.generation == live
        assert found_documents(services, marker("doc", 12, 0))[0] == "doc-012"


def test_rollback_returns_to_the_previous_generation_with_later_changes(tmp_path, embedder):
    """Standalone: its own data dir, documents and first refresh, so there is a previous generation to go back to."""
    settings = make_settings(tmp_path / "data", webhook_secret=SECRET, admin_api_keys="a" * 24, load_generator=False,
                             refresh_cron="", refresh_golden_sample=4)
    services = build_services(settings, embedder=embedder)
    try:
        services.indexer().apply(synthetic_documents(12))
        with http(services) as client:
            refresh = client.post("/refresh", headers=ADMIN)
            assert wait_for_job(client, refresh.json()["job_id"], headers=ADMIN)["status"] == "succeeded"
            _rollback(client, services)
    finally:
        services.ledger.close()


def _rollback(client, services):
    live = services.generation.generation
    previous = services.ledger.generations_in("previous")[-1].generation
    body = webhook_body(synthetic_documents(1, start=9, version=3))
    change = client.post("/ingest", content=body, headers=signed_headers(body))
    assert wait_for_job(client, change.json()["job_id"], headers=ADMIN)["status"] == "succeeded"

    response = client.post("/refresh/rollback", headers=ADMIN)
    assert response.status_code == 202
    assert wait_for_job(client, response.json()["job_id"], headers=ADMIN)["status"] == "succeeded"
    assert services.generation.generation == previous
    assert services.ledger.generation(live).state == "previous"
    assert found_documents(services, marker("doc", 9, 3))[0] == "doc-009"  # made after the previous went out
    assert not any(marker("doc", 9, 0) in text for text in found_texts(services, marker("doc", 9, 0), k=50))
    ledger_ids, chroma_ids, bm25_ids = state(services, previous)
    assert ledger_ids == chroma_ids == bm25_ids


def test_cli_refresh_in_process_and_lock(service, tmp_path, monkeypatch, embedder):
    """`rag refresh` with no service running: in this process, under the writer lock."""
    import app.container
    from app.cli import cli
    from ingestion.ledger import writer_lock
    data = tmp_path / "cli-data"
    settings = make_settings(data, load_generator=False)
    seeded = build_services(settings, embedder=embedder)
    seeded.indexer().apply(synthetic_documents(4))
    seeded.ledger.close()
    monkeypatch.setattr(app.container, "build_embedder", lambda settings: embedder)
    env = {"RAG_DATA_DIR": str(data), "RAG_PORT": "9", "RAG_LOAD_GENERATOR": "false",
           "RAG_REFRESH_GOLDEN_SAMPLE": "4", "RAG_API_KEYS": "", "RAG_ADMIN_API_KEYS": ""}
    runner = CliRunner()
    result = runner.invoke(cli, ["refresh"], env=env)
    assert result.exit_code == 0, result.output
    assert '"status": "succeeded"' in result.output
    with writer_lock(data):
        locked = runner.invoke(cli, ["refresh"], env=env)
    assert locked.exit_code == 1 and "already open for writing" in locked.output
