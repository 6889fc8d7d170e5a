"""Request ids and log lines over a real app: an id on request.state, the X-Request-ID header and every log
line of the request (worker threads included), job ids on the job worker's lines, text or JSON, set up
from RAG_LOG_FORMAT and RAG_LOG_LEVEL."""

import io
import json
import logging
import re

import pytest
from fastapi import Request
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.cli.common import load_settings
from app.container import build_services
from app.logs import JsonFormatter, configure_logging
from app.main import create_app
from tests.app.conftest import SECRET, make_settings, signed_headers, synthetic_documents, wait_for_job, webhook_body

log = logging.getLogger("tests.request_id")
GENERATED = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
def lines():
    """Log lines as the service writes them (JSON), from a StringIO; the root logger restored afterwards."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    stream = io.StringIO()
    configure_logging("json", "INFO", stream=stream)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    root.handlers[:] = saved
    root.setLevel(level)


@pytest.fixture(scope="module")
def service(tmp_path_factory, embedder):
    settings = make_settings(tmp_path_factory.mktemp("request-id"), webhook_secret=SECRET, load_generator=False,
                             refresh_cron="", max_body_bytes=2048)
    services = build_services(settings, embedder=embedder)
    app = create_app(settings, services=services)

    @app.get("/test/state")
    def state(request: Request) -> dict:  # a sync route: it runs in a worker thread
        log.info("in the worker thread")
        return {"request_id": request.state.request_id}

    @app.get("/test/crash")
    def crash() -> dict:
        raise RuntimeError("the disk caught fire")

    with TestClient(app) as client:
        yield client, services
    services.ledger.close()


def test_a_well_formed_incoming_id_is_kept_on_state_header_and_log_lines(service, lines):
    client, _ = service
    response = client.get("/test/state", headers={"X-Request-ID": "edge-7f3a:42"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "edge-7f3a:42"
    assert response.json() == {"request_id": "edge-7f3a:42"}
    logged = lines()
    thread_line = next(line for line in logged if line["message"] == "in the worker thread")
    assert thread_line["request_id"] == "edge-7f3a:42"
    access = next(line for line in logged if line["logger"] == "app.access")
    assert access["request_id"] == "edge-7f3a:42"
    assert access["route"] == "/test/state" and access["status"] == 200 and access["method"] == "GET"
    assert access["duration_ms"] >= 0 and access["level"] == "INFO"


@pytest.mark.parametrize("incoming", ["has spaces", "x" * 129, "quote\"d", "", "semi;colon"])
def test_a_malformed_or_missing_id_is_replaced_by_a_fresh_one(service, incoming):
    client, _ = service
    response = client.get("/test/state", headers={"X-Request-ID": incoming} if incoming else {})
    assert response.status_code == 200
    assert GENERATED.fullmatch(response.headers["x-request-id"]), response.headers["x-request-id"]
    assert response.json()["request_id"] == response.headers["x-request-id"]


def test_every_request_gets_its_own_id(service):
    client, _ = service
    ids = {client.get("/health").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3 and all(GENERATED.fullmatch(i) for i in ids)


def test_errors_before_and_outside_routing_carry_the_id(service):
    client, _ = service
    big = b'{"question": "' + b"x" * 4000 + b'"}'
    too_big = client.post("/query", content=big, headers={"content-type": "application/json", "x-request-id": "r-413"})
    assert too_big.status_code == 413 and too_big.headers["x-request-id"] == "r-413"
    missing = client.get("/no/such/route", headers={"x-request-id": "r-404"})
    assert missing.status_code == 404 and missing.headers["x-request-id"] == "r-404"
    invalid = client.post("/query", json={"question": ""}, headers={"x-request-id": "r-422"})
    assert invalid.status_code == 422 and invalid.headers["x-request-id"] == "r-422"


def test_an_unhandled_error_is_a_500_naming_the_id_and_logged_with_it(service, lines):
    client, _ = service
    response = client.get("/test/crash", headers={"x-request-id": "r-500"})
    assert response.status_code == 500 and response.headers["x-request-id"] == "r-500"
    assert "r-500" in response.json()["detail"] and "fire" not in response.json()["detail"]
    logged = [line for line in lines() if line.get("request_id") == "r-500"]
    error = next(line for line in logged if line["level"] == "ERROR")
    assert "RuntimeError: the disk caught fire" in error["exception"]
    assert any(line["logger"] == "app.access" and line["status"] == 500 for line in logged)


def test_job_worker_lines_carry_the_job_id(service, lines):
    client, _ = service
    body = webhook_body(synthetic_documents(1, prefix="logged"))
    accepted = client.post("/ingest", content=body, headers=signed_headers(body, **{"x-request-id": "r-ingest"}))
    assert accepted.status_code == 202
    job_id = accepted.json()["job_id"]
    assert wait_for_job(client, job_id)["status"] == "succeeded"
    logged = lines()
    assert any(line.get("job_id") == job_id and "succeeded" in line["message"] for line in logged), logged
    assert not any(line.get("job_id") == job_id and line.get("request_id") for line in logged)  # not the request's
    assert any(line.get("request_id") == "r-ingest" and line["logger"] == "app.access" for line in logged)


def test_text_lines_show_the_request_id(service):
    client, _ = service
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        configure_logging("text", "INFO", stream=stream)
        client.get("/test/state", headers={"x-request-id": "r-text"})
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
    line = next(line for line in stream.getvalue().splitlines() if "in the worker thread" in line)
    assert re.fullmatch(r"\S+ \S+ INFO tests\.request_id \[req=r-text\] in the worker thread", line), line


def test_log_settings_are_checked_and_configure_the_cli(monkeypatch, tmp_path):
    with pytest.raises(ValidationError, match="log_format"):
        make_settings(tmp_path, log_format="xml")
    assert make_settings(tmp_path, log_level="debug").log_level == "DEBUG"
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        monkeypatch.setenv("RAG_LOG_FORMAT", "json")
        monkeypatch.setenv("RAG_LOG_LEVEL", "warning")
        load_settings()
        assert root.level == logging.WARNING
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
        assert logging.getLogger("uvicorn.error").propagate and not logging.getLogger("uvicorn.error").handlers
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
