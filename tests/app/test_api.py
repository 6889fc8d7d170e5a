"""The HTTP API against a real service: answers with citations, and clear 4xx for bad requests."""

import json

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.app.conftest import make_settings

API_KEY = "k" * 24


@pytest.fixture(scope="module")
def client(demo_services):
    with TestClient(create_app(demo_services.settings, services=demo_services)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def keyed_client(demo_services, tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("unused"), api_keys=API_KEY, max_body_bytes=2048)
    with TestClient(create_app(settings, services=demo_services)) as test_client:
        yield test_client


def test_query_returns_cited_answer_from_ingested_chunks(client, demo_services):
    response = client.post("/query", json={"question": "How many vacation days do full-time employees get?"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["answer"].strip()
    assert body["citations"], "the generator must have been given chunks"
    assert [c["ref"] for c in body["citations"]] == list(range(1, len(body["citations"]) + 1))
    stored = demo_services.ledger.get_chunks(demo_services.generation.generation,
                                             [c["chunk_id"] for c in body["citations"]])
    for citation in body["citations"]:
        assert stored[citation["chunk_id"]].text == citation["text"]
        assert stored[citation["chunk_id"]].document_id == citation["document_id"]
    assert body["citations"][0]["document_id"] == "vacation-and-leave.md"
    assert body["provenance"]["embedding_model"] == "bundled:all-MiniLM-L6-v2"
    assert body["provenance"]["index_generation"] == demo_services.generation.generation
    assert body["provenance"]["prompt_template_version"]
    assert set(body["timings_ms"]) == {"retrieval", "generation", "total"}


def test_query_top_k_and_filters(client):
    response = client.post("/query", json={"question": "How long is the warranty?", "top_k": 2,
                                           "filters": {"document_id": ["product-overview.html"]}})
    assert response.status_code == 200, response.text
    citations = response.json()["citations"]
    assert 1 <= len(citations) <= 2
    assert {c["document_id"] for c in citations} == {"product-overview.html"}


def test_health_reports_counts_and_models(client):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["documents"] == 5 and body["chunks"] >= 5
    assert body["embedding_model"] == "bundled:all-MiniLM-L6-v2"


@pytest.mark.parametrize(
    ("payload", "status", "mentions"),
    [
        ({"question": ""}, 422, "question"),
        ({"question": "   "}, 422, "question"),
        ({"question": "hi", "colour": "red"}, 422, "colour"),
        ({"question": 42}, 422, "question"),
        ({"question": "hi", "top_k": 0}, 422, "top_k"),
        ({"question": "hi", "top_k": 51}, 422, "top_k"),
        ({"question": "hi", "alpha": 1.5}, 422, "alpha"),
        ({"question": "hi", "filters": {"author": "x"}}, 422, "author"),
        ({}, 422, "question"),
    ],
)
def test_bad_requests_get_4xx_naming_the_field(client, payload, status, mentions):
    response = client.post("/query", json=payload)
    assert response.status_code == status, response.text
    assert mentions in response.json()["detail"]


def test_malformed_json_is_400(client):
    response = client.post("/query", content=b'{"question": "hi"', headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "malformed JSON" in response.json()["detail"]


def test_question_over_configured_length_is_422(client, demo_services):
    limit = demo_services.settings.max_question_chars
    response = client.post("/query", json={"question": "x" * (limit + 1)})
    assert response.status_code == 422 and "question" in response.json()["detail"]


def test_api_key_required_when_configured(keyed_client):
    question = {"question": "What is the hotel limit in London?"}
    assert keyed_client.post("/query", json=question).status_code == 401
    wrong = keyed_client.post("/query", json=question, headers={"Authorization": "Bearer " + "x" * 24})
    assert wrong.status_code == 401 and "API key" in wrong.json()["detail"]
    ok = keyed_client.post("/query", json=question, headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200, ok.text


def test_oversize_body_is_413_by_bytes_received(keyed_client):
    big = json.dumps({"question": "x" * 4000}).encode()
    headers = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    assert keyed_client.post("/query", content=big, headers=headers).status_code == 413

    def chunked():  # no Content-Length: the limit is counted on the bytes as they arrive
        for start in range(0, len(big), 512):
            yield big[start:start + 512]

    response = keyed_client.post("/query", content=chunked(), headers=headers)
    assert response.status_code == 413
    assert "2048 bytes" in response.json()["detail"]
