"""POST /ingest end to end in one process: signatures, idempotency, validation, jobs, update/delete semantics."""

import time

import pytest
from fastapi.testclient import TestClient

from app.container import build_services
from app.main import create_app
from app.signature import sign
from tests.app.conftest import (SECRET, found_documents, found_texts, make_settings, marker, signed_headers,
                                synthetic_documents, wait_for_job, webhook_body)

OLD_SECRET = "o" * 32


@pytest.fixture(scope="module")
def service(tmp_path_factory, embedder):
    settings = make_settings(tmp_path_factory.mktemp("webhook"), webhook_secret=f"{SECRET},{OLD_SECRET}",
                             load_generator=False, refresh_cron="", ingest_batch_documents=4)
    services = build_services(settings, embedder=embedder)
    with TestClient(create_app(settings, services=services)) as client:
        body = webhook_body(synthetic_documents(6))
        response = client.post("/ingest", content=body, headers=signed_headers(body))
        assert response.status_code == 202, response.text
        assert wait_for_job(client, response.json()["job_id"])["status"] == "succeeded"
        yield client, services
    services.ledger.close()


def jobs_and_documents(services) -> tuple[int, int]:
    return len(services.ledger._query("SELECT job_id FROM jobs")), services.ledger.count_documents()


def post(client, body: bytes, **headers):
    return client.post("/ingest", content=body, headers={"content-type": "application/json", **headers})


def test_unsigned_tampered_expired_and_future_requests_are_401_and_store_nothing(service):
    client, services = service
    before = jobs_and_documents(services)
    body = webhook_body(synthetic_documents(1, prefix="nope"))
    now = int(time.time())
    cases = {
        "unsigned": {},
        "tampered": {"x-signature": sign(body.replace(b"survey", b"survez"), SECRET)},
        "wrong secret": {"x-signature": sign(body, "w" * 32)},
        "expired": {"x-signature": sign(body, SECRET, now - 301)},
        "future": {"x-signature": sign(body, SECRET, now + 301)},
        "malformed": {"x-signature": "v1=abc"},
    }
    for name, headers in cases.items():
        response = post(client, body, **headers)
        assert response.status_code == 401, (name, response.text)
        assert "signature" in response.json()["detail"], name
    assert jobs_and_documents(services) == before


def test_rotated_secret_and_several_v1_values_pass(service):
    client, _ = service
    body = webhook_body(deletes=["never-existed-1"])
    assert post(client, body, **{"x-signature": sign(body, OLD_SECRET)}).status_code == 202
    body = webhook_body(deletes=["never-existed-2"])
    both = sign(body, "w" * 32) + "," + sign(body, SECRET).split(",")[1]
    assert post(client, body, **{"x-signature": both}).status_code == 202


def test_replayed_signed_request_gets_the_same_answer_and_no_second_job(service):
    client, services = service
    body = webhook_body(deletes=["never-existed-3"])
    headers = signed_headers(body)
    first = post(client, body, **headers)
    jobs = jobs_and_documents(services)[0]
    again = post(client, body, **headers)
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert jobs_and_documents(services)[0] == jobs
    # the same body signed again later is a new request (that is what Idempotency-Key is for)
    resent = post(client, body, **signed_headers(body, timestamp=int(time.time()) - 5))
    assert resent.status_code == 202 and resent.json()["job_id"] != first.json()["job_id"]


def test_idempotency_key_same_body_replays_different_body_conflicts(service):
    client, services = service
    body = webhook_body(deletes=["never-existed-4"])
    first = post(client, body, **signed_headers(body, **{"idempotency-key": "batch-2024-01-01"}))
    assert first.status_code == 202
    jobs = jobs_and_documents(services)[0]
    later = post(client, body, **signed_headers(body, timestamp=int(time.time()) + 3,
                                                **{"idempotency-key": "batch-2024-01-01"}))
    assert later.status_code == 202 and later.json() == first.json()
    other = webhook_body(deletes=["never-existed-5"])
    conflict = post(client, other, **signed_headers(other, **{"idempotency-key": "batch-2024-01-01"}))
    assert conflict.status_code == 409 and "Idempotency-Key" in conflict.json()["detail"]
    assert jobs_and_documents(services)[0] == jobs
    too_long = post(client, other, **signed_headers(other, **{"idempotency-key": "k" * 256}))
    assert too_long.status_code == 400


def test_invalid_bodies_are_4xx_naming_document_and_field_and_store_nothing(service):
    client, services = service
    before = jobs_and_documents(services)
    cases = [
        (b'{"documents": [', 400, "malformed JSON"),
        (b'{"documents": [{"document_id": "x1", "text": "ok"}, {"text": "no id"}]}', 422, "documents[1]"),
        (b'{"documents": [{"document_id": "x2", "text": ""}]}', 422, "(document_id 'x2'): text"),
        (b'{"documents": [{"document_id": "x3", "text": "caf\xe9"}]}', 422,
         "(document_id 'x3'): text: not valid UTF-8"),
        (b'{"documents": [{"document_id": "x4", "text": "ok", "author": "me"}]}', 422, "author: unknown field"),
    ]
    for body, status, mention in cases:
        response = post(client, body, **signed_headers(body))
        assert response.status_code == status, response.text
        assert mention in response.json()["detail"]
    assert jobs_and_documents(services) == before


def test_job_reports_counts_then_updates_and_deletes_change_what_retrieval_finds(service):
    client, services = service
    # doc-000 changes, doc-001 is deleted, doc-002 is sent unchanged, doc-006 is new,
    # doc-003 is sent changed and deleted in the same request: the delete wins
    changed = synthetic_documents(1, version=1)
    unchanged = synthetic_documents(1, start=2)
    new = synthetic_documents(1, start=6)
    both = synthetic_documents(1, start=3, version=1)
    body = webhook_body(changed + unchanged + new + both, deletes=["doc-001", "doc-003"])
    response = post(client, body, **signed_headers(body))
    assert response.status_code == 202 and response.headers["location"] == f"/jobs/{response.json()['job_id']}"
    job = wait_for_job(client, response.json()["job_id"])
    assert job["status"] == "succeeded", job
    assert job["counts"] == {"added": 1, "updated": 1, "unchanged": 1, "deleted": 2,
                             "chunks_written": 2, "chunks_removed": 3}
    assert job["progress"]["done"] == job["progress"]["total"] == 5  # 3 documents (doc-003 dropped) + 2 deletes

    assert found_documents(services, marker("doc", 0, 1))[0] == "doc-000"
    old_text = found_texts(services, marker("doc", 0, 0), k=50)
    assert old_text and not any(marker("doc", 0, 0) in text for text in old_text)
    for gone in ("doc-001", "doc-003"):
        assert gone not in found_documents(services, marker("doc", int(gone[-1]), 0), k=50)
        assert services.ledger.get_document(gone).state == "deleted"
    assert found_documents(services, marker("doc", 6, 0))[0] == "doc-006"
    generation = services.generation.generation
    ids = services.ledger.chunk_ids(generation)
    assert set(services.dense.iter_ids()) == ids == set(services.bm25.ids.tolist())
    texts = " ".join(c.text for c in services.ledger.iter_chunks(generation))
    assert marker("doc", 0, 0) not in texts and marker("doc", 1, 0) not in texts


def test_unknown_job_is_404_and_disabled_webhook_is_503(service, tmp_path):
    client, services = service
    assert client.get("/jobs/nope").status_code == 404
    settings = make_settings(tmp_path, load_generator=False, refresh_cron="")
    with TestClient(create_app(settings, services=services)) as unsigned:
        body = webhook_body(deletes=["x"])
        response = unsigned.post("/ingest", content=body, headers=signed_headers(body))
        assert response.status_code == 503 and "RAG_WEBHOOK_SECRET" in response.json()["detail"]


def test_oversize_body_is_413(service, tmp_path):
    _, services = service
    settings = make_settings(tmp_path, webhook_secret=SECRET, ingest_max_body_bytes=2048,
                             load_generator=False, refresh_cron="")
    with TestClient(create_app(settings, services=services)) as small:
        body = webhook_body(synthetic_documents(30))
        assert small.post("/ingest", content=body, headers=signed_headers(body)).status_code == 413
