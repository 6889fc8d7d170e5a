"""GET /metrics over a real service (demo corpus, real MiniLM, Chroma, BM25, the bundled SmolLM2): scraped
before and after a query, an ingest job through the signed webhook and a refresh, the counters move by
exactly what those did."""

import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.cli.common import DEMO_CORPUS
from app.container import build_services
from app.main import create_app
from generation.prompt import pack_prompt
from generation.rag import retrieve_context
from ingestion.loaders import load_documents
from tests.app.conftest import SECRET, make_settings, signed_headers, synthetic_documents, wait_for_job, webhook_body

REPO = Path(__file__).resolve().parents[2]
QUERY_KEY, ADMIN_KEY = "q" * 24, "a" * 24
QUERY = {"Authorization": f"Bearer {QUERY_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
QUESTION = "How many vacation days do full-time employees get?"


@pytest.fixture(scope="module")
def service(tmp_path_factory, embedder, demo_services):
    """Its own data dir (the ingest job and refresh below change it), the demo services' loaded generator."""
    settings = make_settings(tmp_path_factory.mktemp("metrics"), webhook_secret=SECRET, api_keys=QUERY_KEY,
                             admin_api_keys=ADMIN_KEY, refresh_cron="", refresh_golden_sample=4, max_new_tokens=48,
                             max_body_bytes=2048)
    services = build_services(settings, load_generator=False, embedder=embedder)
    services.generator = demo_services.generator
    services.indexer().apply(load_documents([DEMO_CORPUS]))
    with TestClient(create_app(settings, services=services)) as client:
        yield client, services
    services.ledger.close()


def scrape(client) -> dict[tuple, float]:
    response = client.get("/metrics", headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def scrape_until(client, done, timeout_s: float = 30) -> dict:
    """Scrapes until `done(samples)`: a job's end reaches the metrics just after the ledger records it."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(client)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def test_metrics_need_the_admin_scope(service):
    client, _ = service
    assert client.get("/metrics").status_code == 401
    refused = client.get("/metrics", headers=QUERY)
    assert refused.status_code == 403 and "admin" in refused.json()["detail"]
    assert client.get("/metrics", headers=ADMIN).status_code == 200


def test_a_query_moves_requests_latency_tokens_and_answers(service):
    client, services = service
    before = scrape(client)
    response = client.post("/query", json={"question": QUESTION}, headers=QUERY)
    assert response.status_code == 200, response.text
    body = response.json()
    after = scrape(client)

    assert moved(before, after, "rag_http_requests_total", route="/query", method="POST", status="200") == 1
    assert moved(before, after, "rag_http_requests_total", route="/metrics", method="GET", status="200") == 1
    assert moved(before, after, "rag_http_request_duration_seconds_count", route="/query", method="POST") == 1
    for stage in ("retrieval", "generation", "total"):
        assert moved(before, after, "rag_query_duration_seconds_count", stage=stage) == 1
        assert moved(before, after, "rag_query_duration_seconds_sum", stage=stage) == pytest.approx(
            body["timings_ms"][stage] / 1000, abs=1e-6)
    adapter = body["provenance"]["adapter"] or "none"
    assert moved(before, after, "rag_answers_total", adapter=adapter, abstained=str(body["abstained"]).lower(),
                 grounded=str(body["grounded"]).lower()) == 1
    assert sum(v for (name, _), v in after.items() if name == "rag_answers_total") - \
        sum(v for (name, _), v in before.items() if name == "rag_answers_total") == 1

    # tokens in: the prompt the service packs for this question, rebuilt here by the same public code
    assert body["finish_reason"] is not None, "the generator must have run"
    generator, live = services.generator, services.live
    chunks = retrieve_context(live.retriever, services.ledger, live.generation.generation, QUESTION,
                              services.settings.top_k)
    packed = pack_prompt(generator.tokenizer, QUESTION, chunks, context_window=generator.context_window,
                         max_new_tokens=services.settings.max_new_tokens,
                         template_version=generator.prompt_template_version)
    assert moved(before, after, "rag_prompt_tokens_total") == packed.n_tokens
    written = moved(before, after, "rag_completion_tokens_total")
    assert 1 <= written <= services.settings.max_new_tokens
    if body["finish_reason"] == "length":
        assert written == services.settings.max_new_tokens

    info = [labels for (name, labels) in after if name == "rag_serving_info"]
    assert len(info) == 1 and dict(info[0])["adapter"] == adapter
    assert dict(info[0])["embedding_model"] == "bundled:all-MiniLM-L6-v2"


def outcome(body: dict) -> tuple[str, str, str]:
    return body["provenance"]["adapter"] or "none", str(body["abstained"]).lower(), str(body["grounded"]).lower()


def test_a_streamed_query_and_an_abstention_are_counted(service):
    client, _ = service
    before = scrape(client)
    with client.stream("POST", "/query", json={"question": QUESTION, "stream": True}, headers=QUERY) as streamed:
        assert streamed.status_code == 200
        events = "".join(streamed.iter_text())
    answer = json.loads(events.split("event: answer\ndata: ", 1)[1].split("\n", 1)[0])
    outside = client.post("/query", json={"question": "What is the capital of France?"}, headers=QUERY).json()
    assert outside["abstain_reason"] == "no_relevant_context"
    after = scrape(client)
    assert moved(before, after, "rag_http_requests_total", route="/query", method="POST", status="200") == 2
    assert moved(before, after, "rag_query_duration_seconds_count", stage="total") == 2
    assert moved(before, after, "rag_abstentions_total", reason="no_relevant_context") == 1
    expected = Counter([outcome(answer), outcome(outside)])
    for (adapter, abstained, grounded), n in expected.items():
        assert moved(before, after, "rag_answers_total", adapter=adapter, abstained=abstained, grounded=grounded) == n
    assert moved(before, after, "rag_completion_tokens_total") >= 1  # the streamed one generated; the other did not


def test_a_full_generation_gate_counts_a_rejection(service):
    client, services = service
    gate = services.gate
    client.post("/query", json={"question": "What is the capital of France?"}, headers=QUERY)  # binds the loop
    before = scrape(client)
    gate.admitted += gate.concurrent + gate.queue  # as if every slot and queue place were taken
    try:
        refused = client.post("/query", json={"question": QUESTION}, headers=QUERY)
        during = scrape(client)
    finally:
        gate.admitted -= gate.concurrent + gate.queue
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert moved(before, during, "rag_generation_rejections_total", reason="queue_full") == 1
    assert moved(before, during, "rag_generation_rejections_total", reason="wait_timeout") == 0
    assert moved(before, during, "rag_http_requests_total", route="/query", method="POST", status="503") == 1
    assert value(during, "rag_generation_queue_depth") == gate.concurrent + gate.queue  # admitted, none running
    assert value(during, "rag_generation_slots") == services.settings.max_concurrent_generations


def test_an_ingest_job_moves_jobs_documents_and_chunks_by_its_counts(service):
    client, services = service
    before = scrape(client)
    body = webhook_body(synthetic_documents(3, prefix="metrics"), deletes=["security-basics.txt"])
    accepted = client.post("/ingest", content=body, headers=signed_headers(body))
    assert accepted.status_code == 202, accepted.text
    job = wait_for_job(client, accepted.json()["job_id"], headers=ADMIN)
    assert job["status"] == "succeeded", job
    counts = job["counts"]
    assert counts["added"] == 3 and counts["deleted"] == 1 and counts["chunks_removed"] > 0
    after = scrape_until(client, lambda s: moved(before, s, "rag_jobs_total", kind="ingest", status="succeeded"))

    assert moved(before, after, "rag_jobs_total", kind="ingest", status="succeeded") == 1
    assert moved(before, after, "rag_jobs_total", kind="ingest", status="failed") == 0
    for action in ("added", "updated", "unchanged", "deleted"):
        assert moved(before, after, "rag_ingest_documents_total", action=action) == counts[action], action
    assert moved(before, after, "rag_ingest_chunks_total", action="written") == counts["chunks_written"]
    assert moved(before, after, "rag_ingest_chunks_total", action="removed") == counts["chunks_removed"]
    assert moved(before, after, "rag_index_chunks") == counts["chunks_written"] - counts["chunks_removed"]
    assert value(after, "rag_index_chunks") == services.ledger.count_chunks(services.generation.generation)
    assert moved(before, after, "rag_index_documents") == 3 - 1
    assert moved(before, after, "rag_http_requests_total", route="/ingest", method="POST", status="202") == 1
    assert moved(before, after, "rag_http_requests_total", route="/jobs/{job_id}", method="GET", status="200") >= 1
    assert value(after, "rag_jobs_unfinished", kind="ingest") == 0


def test_a_refresh_moves_the_generation_and_records_duration_and_outcome(service):
    client, services = service
    before = scrape(client)
    started = time.time()
    accepted = client.post("/refresh", headers=ADMIN)
    assert accepted.status_code == 202, accepted.text
    job = wait_for_job(client, accepted.json()["job_id"], headers=ADMIN)
    assert job["status"] == "succeeded", job
    after = scrape_until(client, lambda s: moved(before, s, "rag_jobs_total", kind="refresh", status="succeeded"))

    assert moved(before, after, "rag_jobs_total", kind="refresh", status="succeeded") == 1
    assert moved(before, after, "rag_refresh_duration_seconds_count", kind="refresh", outcome="succeeded") == 1
    assert 0 < moved(before, after, "rag_refresh_duration_seconds_sum", kind="refresh",
                     outcome="succeeded") <= time.time() - started
    assert moved(before, after, "rag_index_generation") == 1
    assert value(after, "rag_index_generation") == services.generation.generation
    new_chunks = services.ledger.count_chunks(services.generation.generation)
    assert moved(before, after, "rag_refresh_chunks_written_total") == job["progress"]["chunks_written"] == new_chunks
    assert value(after, "rag_index_chunks") == new_chunks
    assert value(after, "rag_refresh_last_success_timestamp_seconds", kind="refresh") >= started
    assert moved(before, after, "rag_jobs_total", kind="ingest", status="succeeded") == 0


def test_route_labels_are_templates_not_paths(service):
    client, _ = service
    before = scrape(client)
    for job_id in ("nope-1", "nope-2"):
        assert client.get(f"/jobs/{job_id}", headers=ADMIN).status_code == 404
    assert client.get("/no/such/path/42").status_code == 404
    big = b'{"question": "' + b"x" * 4000 + b'"}'
    assert client.post("/query", content=big, headers={**QUERY, "content-type": "application/json"}).status_code == 413
    after = scrape(client)
    assert moved(before, after, "rag_http_requests_total", route="/jobs/{job_id}", method="GET", status="404") == 2
    assert moved(before, after, "rag_http_requests_total", route="<unmatched>", method="GET", status="404") == 1
    assert moved(before, after, "rag_http_requests_total", route="/query", method="POST", status="413") == 1
    routes = {dict(labels)["route"] for (name, labels) in after if name == "rag_http_requests_total"}
    assert not any("nope" in route or "42" in route for route in routes), routes


def test_each_app_has_its_own_registry(service, tmp_path):
    client, services = service
    settings = make_settings(tmp_path, load_generator=False, refresh_cron="")
    with TestClient(create_app(settings, services=services)) as other:
        first = other.get("/metrics").text  # no keys configured: the local operator
        assert 'rag_http_requests_total{method="GET",route="/metrics",status="200"}' not in first
        second = other.get("/metrics").text
        assert 'rag_http_requests_total{method="GET",route="/metrics",status="200"} 1.0' in second
    assert value(scrape(client), "rag_http_requests_total", route="/metrics", method="GET", status="200") > 1


def test_every_metric_the_grafana_dashboard_queries_is_exposed(service):
    client, _ = service
    dashboard = json.loads((REPO / "docs" / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    text = client.get("/metrics", headers=ADMIN).text
    exposed = set()
    for family in text_string_to_metric_families(text):
        exposed |= {family.name, *(family.name + suffix for suffix in ("_total", "_bucket", "_sum", "_count", "_info"))}
    queried = {name for expr in exprs for name in re.findall(r"\brag_\w+", expr)}
    assert len(queried) >= 15 and queried <= exposed, queried - exposed


def test_audit_write_failures_are_counted(service):
    client, services = service
    audit = client.app.state.audit
    before = value(scrape(client), "rag_audit_write_failures_total")
    audit.failures += 2  # what AuditLog.record does when a line cannot be written (tests/app/test_audit.py)
    try:
        assert value(scrape(client), "rag_audit_write_failures_total") == before + 2
    finally:
        audit.failures -= 2
