"""The audit trail over the real service: queries by a named key, webhook ingests, refresh and rollback,
rejected keys, adapter activation from the CLI; rotation and retention; fail-open writes; a broken path."""

import hashlib
import json
import logging
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app.access import key_digest
from app.audit import AuditLog, AuditLogError, process_actor
from app.cli import cli
from app.container import build_services
from app.main import create_app
from app.signature import sign
from tests.app.conftest import MODEL_CACHE, SECRET, make_settings, synthetic_documents, wait_for_job, webhook_body

KEY = "k" * 32
ADMIN_KEY = "a" * 24
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
OLD_SECRET = "o" * 32


def events(path: Path, event: str | None = None) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    records = [json.loads(line) for line in lines]  # every line is one whole JSON object
    return [r for r in records if event is None or r["event"] == event]


@pytest.fixture(scope="module")
def query_app(tmp_path_factory, demo_services):
    """The demo service with one named key from a keys file, its audit trail in a folder of its own."""
    folder = tmp_path_factory.mktemp("audit-query")
    keys = folder / "keys.yaml"
    keys.write_text(f"keys:\n  - name: support-bot\n    sha256: {key_digest(KEY)}\n    scopes: [query]\n")
    settings = make_settings(folder / "data", keys_file=keys, audit_log=folder / "audit" / "audit.jsonl")
    with TestClient(create_app(settings, services=demo_services)) as client:
        yield client, settings.audit_path


def test_a_query_by_a_named_key_records_the_question_and_the_returned_documents(query_app):
    client, path = query_app
    question = "How much is the daily meal allowance while travelling?"
    response = client.post("/query", json={"question": question},
                           headers={"Authorization": f"Bearer {KEY}", "X-Request-ID": "req-audit-1"})
    assert response.status_code == 200, response.text
    answer = response.json()
    line = events(path, "query")[-1]
    assert line["actor"] == {"kind": "key", "name": "support-bot", "key_id": key_digest(KEY)[:12],
                             "client": "testclient"}
    assert line["request_id"] == response.headers.get("x-request-id", "req-audit-1")
    assert line["question"] == question and line["status"] == 200
    assert line["document_ids"] == [c["document_id"] for c in answer["citations"]] and line["document_ids"]
    assert line["chunk_ids"] == [c["chunk_id"] for c in answer["citations"]]
    assert line["abstained"] == answer["abstained"] and line["abstain_reason"] == answer["abstain_reason"]
    assert line["adapter"] == answer["provenance"]["adapter"]
    assert datetime.fromisoformat(line["time"]).utcoffset() == timedelta(0)


def test_streamed_and_refused_queries_are_recorded_with_their_status(query_app):
    client, path = query_app
    auth = {"Authorization": f"Bearer {KEY}"}
    question = {"question": "How often must the Orbit Scale be recalibrated?", "stream": True}
    with client.stream("POST", "/query", json=question, headers=auth) as stream:
        body = "".join(stream.iter_text())
    assert "event: answer" in body
    streamed = events(path, "query")[-1]
    assert streamed["streamed"] is True and streamed["status"] == 200 and streamed["chunk_ids"]

    response = client.post("/query", json={"question": "Anything?", "adapter": "no-such-adapter"}, headers=auth)
    assert response.status_code == 404
    refused = events(path, "query")[-1]
    assert (refused["status"], refused["adapter_requested"]) == (404, "no-such-adapter")
    assert "no-such-adapter" in refused["error"] and "document_ids" not in refused


def test_unknown_keys_are_recorded_as_rejected_without_the_key(query_app):
    client, path = query_app
    wrong = "w" * 32
    assert client.post("/query", json={"question": "hi"}, headers={"Authorization": f"Bearer {wrong}"}
                       ).status_code == 401
    line = events(path, "auth_rejected")[-1]
    assert (line["status"], line["path"], line["actor"]["kind"]) == (401, "/query", "anonymous")
    assert line["actor"]["key_id"] == key_digest(wrong)[:12]
    assert wrong not in path.read_text()


@pytest.fixture(scope="module")
def jobs_app(tmp_path_factory, embedder):
    """A retrieval-only service with two webhook secrets and an admin key: ingest, refresh, rollback."""
    folder = tmp_path_factory.mktemp("audit-jobs")
    settings = make_settings(folder / "data", webhook_secret=f"{OLD_SECRET},{SECRET}", admin_api_keys=ADMIN_KEY,
                             load_generator=False, refresh_cron="", ingest_batch_documents=4,
                             refresh_golden_sample=4)
    services = build_services(settings, embedder=embedder)
    services.indexer().apply(synthetic_documents(8))
    with TestClient(create_app(settings, services=services)) as client:
        yield client, services, settings.audit_path
    services.ledger.close()


def test_webhook_ingest_records_accepted_and_done_with_the_counts(jobs_app):
    client, _, path = jobs_app
    body = webhook_body(synthetic_documents(2, start=20), deletes=["doc-001"])
    response = client.post("/ingest", content=body, headers={"content-type": "application/json",
                                                             "x-signature": sign(body, SECRET)})
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert wait_for_job(client, job_id, headers=ADMIN)["status"] == "succeeded"

    accepted = [e for e in events(path, "ingest_accepted") if e["job_id"] == job_id]
    assert len(accepted) == 1
    assert accepted[0]["actor"] == {"kind": "webhook", "signed": True, "secret_index": 1, "client": "testclient"}
    assert accepted[0]["document_ids"] == ["doc-020", "doc-021"] and accepted[0]["delete_ids"] == ["doc-001"]
    done = [e for e in events(path, "ingest_done") if e["job_id"] == job_id]
    assert len(done) == 1
    assert done[0]["counts"]["added"] == 2 and done[0]["counts"]["deleted"] == 1
    assert done[0]["requested_by"]["actor"]["secret_index"] == 1
    assert done[0]["actor"]["kind"] == "service"


def test_a_bad_signature_is_recorded_as_a_rejected_ingest(jobs_app):
    client, _, path = jobs_app
    body = webhook_body(synthetic_documents(1, start=30))
    response = client.post("/ingest", content=body, headers={"content-type": "application/json",
                                                             "x-signature": sign(body, "x" * 32)})
    assert response.status_code == 401
    line = events(path, "ingest_rejected")[-1]
    assert line["status"] == 401 and line["actor"]["signed"] is False and "signature" in line["error"]


def test_refresh_and_rollback_record_who_asked_and_the_generations(jobs_app):
    client, services, path = jobs_app
    before = services.generation.generation
    admin = {"kind": "key", "name": f"admin-key-{key_digest(ADMIN_KEY)[:8]}", "key_id": key_digest(ADMIN_KEY)[:12],
             "client": "testclient"}
    for kind, url, generation, previous in (("refresh", "/refresh", before + 1, before),
                                            ("rollback", "/refresh/rollback", before, before + 1)):
        response = client.post(url, headers=ADMIN)
        assert response.status_code == 202, response.text
        job_id = response.json()["job_id"]
        assert wait_for_job(client, job_id, headers=ADMIN)["status"] == "succeeded"
        requested = [e for e in events(path, f"{kind}_requested") if e["job_id"] == job_id]
        assert len(requested) == 1 and requested[0]["actor"] == admin and requested[0]["outcome"] == "accepted"
        done = [e for e in events(path, f"{kind}_done") if e["job_id"] == job_id]
        assert len(done) == 1, events(path)[-3:]
        assert (done[0]["generation"], done[0]["previous_generation"]) == (generation, previous)
        assert done[0]["requested_by"]["actor"] == admin


def test_adapter_activation_from_the_cli_records_the_os_user(tmp_path):
    registry = tmp_path / "adapters"
    for version in ("v1", "v2"):
        (registry / "tiny" / version).mkdir(parents=True)
        (registry / "tiny" / version / "adapter_config.json").write_text("{}")
    audit = tmp_path / "audit.jsonl"
    env = {"RAG_AUDIT_LOG": str(audit), "RAG_DATA_DIR": str(tmp_path / "data")}
    runner = CliRunner()
    for args in (["activate", "tiny@v2"], ["activate", "tiny@v1"], ["rollback", "tiny"]):
        result = runner.invoke(cli, ["adapters", *args, "--registry", str(registry)], env=env)
        assert result.exit_code == 0, result.output
    lines = events(audit, "adapter_activated")
    assert [(e["adapter"], e["previous_version"], e["how"]) for e in lines] == [
        ("tiny@v2", None, "activate"), ("tiny@v1", "v2", "activate"), ("tiny@v2", "v1", "rollback")]
    assert lines[0]["actor"]["kind"] == "cli" and lines[0]["actor"]["user"] == process_actor("cli")["user"]

    tail = runner.invoke(cli, ["audit", "tail", "-n", "2", "--event", "adapter_activated"], env=env)
    assert tail.exit_code == 0, tail.output
    assert [json.loads(line)["how"] for line in tail.output.splitlines()] == ["activate", "rollback"]


def test_daily_rotation_keeps_the_retention_and_the_appenders_follow(tmp_path):
    path = tmp_path / "audit.jsonl"
    service = AuditLog(path, actor={"kind": "service"}, rotate=True, retention_days=3)
    cli_writer = AuditLog(path, actor={"kind": "cli"})  # another process's view: appends, never rotates
    today = datetime.now(timezone.utc).date()
    old = {days: tmp_path / f"audit.jsonl.{today - timedelta(days=days):%Y-%m-%d}" for days in (5, 4, 3, 2)}
    for file in old.values():
        file.write_text("{}\n")
    (tmp_path / "audit.jsonl.notes").write_text("not a rotated file\n")
    service.record("query", question="yesterday's")
    cli_writer.record("adapter_activated", adapter="a@v1")

    service._handler.rolloverAt = int(datetime.now(timezone.utc).timestamp()) - 1  # midnight has passed
    service.record("query", question="today's")
    cli_writer.record("adapter_activated", adapter="a@v2")

    yesterday = tmp_path / f"audit.jsonl.{today - timedelta(days=1):%Y-%m-%d}"
    assert [e.get("question", e.get("adapter")) for e in events(yesterday)] == ["yesterday's", "a@v1"]
    assert [e.get("question", e.get("adapter")) for e in events(path)] == ["today's", "a@v2"]
    assert not old[5].exists() and not old[4].exists()  # older than 3 days
    assert old[3].exists() and old[2].exists() and (tmp_path / "audit.jsonl.notes").exists()
    service.close()
    cli_writer.close()


def test_questions_can_be_hashed_or_left_out(tmp_path):
    question = "Who approves travel?"
    for mode, expected in (("sha256", {"question_sha256": hashlib.sha256(question.encode()).hexdigest(),
                                       "question_chars": len(question)}),
                           ("omit", {"question_chars": len(question)})):
        audit = AuditLog(tmp_path / f"{mode}.jsonl", actor={"kind": "test"}, questions=mode)
        audit.record("query", **audit.question(question))
        audit.close()
        line = events(tmp_path / f"{mode}.jsonl")[0]
        assert {k: v for k, v in line.items() if k.startswith("question")} == expected
        assert question not in (tmp_path / f"{mode}.jsonl").read_text()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_failing_audit_write_does_not_fail_the_query_but_is_logged(demo_services, caplog):
    settings = make_settings(demo_services.settings.data_dir, audit_log="/dev/full")  # every write: ENOSPC
    app = create_app(settings, services=demo_services)
    with TestClient(app) as client, caplog.at_level(logging.ERROR, logger="app.audit"):
        response = client.post("/query", json={"question": "How much is the daily meal allowance while travelling?"})
        assert response.status_code == 200, response.text
        assert app.state.audit.failures >= 1
    assert any("audit trail: could not write" in r.getMessage() and "/dev/full" in r.getMessage()
               for r in caplog.records)


def test_an_audit_path_that_cannot_be_written_stops_the_start_in_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    bad = blocker / "audit.jsonl"
    with pytest.raises(AuditLogError) as caught:
        create_app(make_settings(tmp_path / "data", audit_log=bad))
    message = str(caught.value)
    assert message.startswith(f"RAG_AUDIT_LOG {bad}:") and "\n" not in message

    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server must not start"))
    result = CliRunner().invoke(cli, ["serve"], env={
        "RAG_AUDIT_LOG": str(bad), "RAG_DATA_DIR": str(tmp_path / "data"), "RAG_LOAD_GENERATOR": "false",
        "RAG_MODEL_CACHE_DIR": str(MODEL_CACHE)})
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"error: {message}"]
