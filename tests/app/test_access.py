"""Keys, scopes and what is public (app/access.py, app/deps.py, app/routes/health.py, app/routes/docs.py),
against the demo services over the real app: the keys file, RAG_API_KEYS / RAG_ADMIN_API_KEYS, rotation
while the app runs, `rag keys`, /health and the docs with and without a key.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from typer.testing import CliRunner

from app.access import KeyEntry, KeyRing, KeysFileError, key_digest, read_keys_file, write_keys_file
from app.cli import cli
from app.main import create_app
from tests.app.conftest import make_settings

GATED = "Who won the 2018 FIFA World Cup?"  # answered at once (nothing relevant, the generator does not run)
KEYS = {"asker": "asker-" + "q" * 24, "watcher": "watcher-" + "w" * 24, "operator": "operator-" + "o" * 24}
PLAIN, ADMIN = "p" * 24, "a" * 24


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def entry(name: str, key: str, scopes: list, **extra) -> KeyEntry:
    return KeyEntry(name=name, sha256=key_digest(key), scopes=scopes, **extra)


@pytest.fixture
def keys_file(tmp_path) -> Path:
    path = tmp_path / "keys.yaml"
    write_keys_file(path, [entry("asker", KEYS["asker"], ["query"]),
                           entry("watcher", KEYS["watcher"], ["ingest-status"]),
                           entry("operator", KEYS["operator"], ["query", "ingest-status", "admin"], groups=["*"])])
    return path


def client_for(demo_services, tmp_path, **settings) -> TestClient:
    settings.setdefault("refresh_cron", "")
    return TestClient(create_app(make_settings(tmp_path / "unused", **settings), services=demo_services))


# --- the keys file --------------------------------------------------------------------------------------

SHA = "a" * 64


@pytest.mark.parametrize(("text", "suffix", "mentions"), [
    ("keys: [", ".yaml", "not valid YAML"),
    ('{"keys": [', ".json", "not valid JSON"),
    (f"keys:\n  - name: bot\n    sha256: {SHA}\n    scopes: [query, write]\n", ".yaml", "keys[0] (bot).scopes.1"),
    ("keys:\n  - name: bot\n    sha256: abc\n    scopes: [query]\n", ".yaml", "keys[0] (bot).sha256"),
    (f"keys:\n  - name: bot\n    sha256: {SHA}\n    scopes: []\n", ".yaml", "keys[0] (bot).scopes"),
    (f"keys:\n  - name: bot\n    sha256: {SHA}\n    scopes: [query]\n    colour: red\n", ".yaml",
     "keys[0] (bot).colour"),
    (f"keys:\n  - name: bot\n    sha256: {SHA}\n    scopes: [query]\n    groups: ['a b']\n", ".yaml",
     "group 'a b'"),
    (f"keys:\n  - name: bot\n    sha256: {SHA}\n    scopes: [query]\n    requests_per_minute: -1\n", ".yaml",
     "keys[0] (bot).requests_per_minute"),
    (f"keys:\n  - {{name: a, sha256: {SHA}, scopes: [query]}}\n  - {{name: a, sha256: {'b' * 64}, scopes: [query]}}\n",
     ".yaml", "key names must be unique; repeated: a"),
    (f"keys:\n  - {{name: a, sha256: {SHA}, scopes: [query]}}\n  - {{name: b, sha256: {SHA}, scopes: [query]}}\n",
     ".yaml", "key sha256 values must be unique"),
    ("signing: {}\n", ".yaml", "signing: Extra inputs"),
])
def test_keys_file_errors_name_the_file_and_the_field(tmp_path, text, suffix, mentions) -> None:
    path = tmp_path / f"keys{suffix}"
    path.write_text(text)
    with pytest.raises(KeysFileError) as error:
        read_keys_file(path)
    message = str(error.value)
    assert message.startswith(f"RAG_KEYS_FILE {path}: ") and mentions in message, message
    assert "\n" not in message


def test_a_missing_or_broken_keys_file_stops_the_app_from_starting(tmp_path) -> None:
    with pytest.raises(KeysFileError, match=f"RAG_KEYS_FILE {tmp_path / 'nope.yaml'}: cannot read it"):
        create_app(make_settings(tmp_path, keys_file=tmp_path / "nope.yaml"))


def test_an_empty_keys_file_means_no_key_passes(tmp_path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n")
    ring = KeyRing(keys_file=path)
    assert ring.configured and ring.callers() == [] and ring.identify("anything-at-all-here") is None


# --- scopes ---------------------------------------------------------------------------------------------

def test_scopes_401_without_or_with_an_unknown_key_403_without_the_scope(demo_services, keys_file, tmp_path):
    with client_for(demo_services, tmp_path, keys_file=keys_file) as client:
        missing = client.post("/query", json={"question": GATED})
        unknown = client.post("/query", json={"question": GATED}, headers=bearer("x" * 30))
        wrong_scheme = client.post("/query", json={"question": GATED}, headers={"Authorization": KEYS["asker"]})
        no_query = client.post("/query", json={"question": GATED}, headers=bearer(KEYS["watcher"]))
        asked = client.post("/query", json={"question": GATED}, headers=bearer(KEYS["asker"]))
        job_by_asker = client.get("/jobs/nosuch", headers=bearer(KEYS["asker"]))
        job_by_watcher = client.get("/jobs/nosuch", headers=bearer(KEYS["watcher"]))
        refresh_by_watcher = client.post("/refresh", headers=bearer(KEYS["watcher"]))
        job_by_operator = client.get("/jobs/nosuch", headers=bearer(KEYS["operator"]))
    for response in (missing, unknown, wrong_scheme):
        assert response.status_code == 401 and "API key" in response.json()["detail"]
        assert response.headers["www-authenticate"] == "Bearer"
    assert no_query.status_code == 403
    assert no_query.json()["detail"] == "key 'watcher' lacks the 'query' scope (it has: ingest-status)"
    assert asked.status_code == 200 and asked.json()["abstain_reason"] == "no_relevant_context"
    assert job_by_asker.status_code == 403 and "'ingest-status'" in job_by_asker.json()["detail"]
    assert job_by_watcher.status_code == 404 and "nosuch" in job_by_watcher.json()["detail"]
    assert refresh_by_watcher.status_code == 403 and "'admin'" in refresh_by_watcher.json()["detail"]
    assert job_by_operator.status_code == 404


def test_legacy_keys_and_the_admin_finding(demo_services, tmp_path):
    """Old main: "With no admin keys configured, ordinary API keys pass the admin routes". Now a RAG_API_KEYS
    key is query + ingest-status only: 403 on POST /refresh and /refresh/rollback, with or without admin keys."""
    with client_for(demo_services, tmp_path, api_keys=PLAIN) as client:
        refresh = client.post("/refresh", headers=bearer(PLAIN))
        rollback = client.post("/refresh/rollback", headers=bearer(PLAIN))
        asked = client.post("/query", json={"question": GATED}, headers=bearer(PLAIN))
        job = client.get("/jobs/nosuch", headers=bearer(PLAIN))
    assert refresh.status_code == 403 and "lacks the 'admin' scope" in refresh.json()["detail"]
    assert rollback.status_code == 403
    assert asked.status_code == 200 and job.status_code == 404

    with client_for(demo_services, tmp_path, api_keys=PLAIN, admin_api_keys=ADMIN) as client:
        assert client.post("/refresh", headers=bearer(PLAIN)).status_code == 403
        assert client.post("/query", json={"question": GATED}, headers=bearer(ADMIN)).status_code == 200
        assert client.get("/jobs/nosuch", headers=bearer(ADMIN)).status_code == 404
        assert client.post("/refresh", headers=bearer("q" * 24)).status_code == 401


def test_legacy_and_file_keys_together(demo_services, keys_file, tmp_path):
    with client_for(demo_services, tmp_path, api_keys=PLAIN, keys_file=keys_file) as client:
        for key in (PLAIN, KEYS["asker"]):
            assert client.post("/query", json={"question": GATED}, headers=bearer(key)).status_code == 200


# --- rotation without a restart ----------------------------------------------------------------------------

def eventually(check, timeout_s: float = 5.0):
    """Polls `check()` until it is truthy (the keys file is looked at once a second)."""
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        assert time.monotonic() < deadline, "not within the reload interval"
        time.sleep(0.1)
    return result


def test_rotating_keys_in_the_file_while_the_app_runs(demo_services, keys_file, tmp_path, caplog):
    new_key = "asker-next-" + "n" * 24

    def status(key: str) -> int:
        return client.post("/query", json={"question": GATED}, headers=bearer(key)).status_code

    with client_for(demo_services, tmp_path, keys_file=keys_file) as client:
        assert status(KEYS["asker"]) == 200 and status(new_key) == 401
        entries = read_keys_file(keys_file)
        write_keys_file(keys_file, [*entries, entry("asker-next", new_key, ["query"])])  # 1. add the new key
        eventually(lambda: status(new_key) == 200)
        assert status(KEYS["asker"]) == 200  # both work while clients move over
        write_keys_file(keys_file, [e for e in read_keys_file(keys_file) if e.name != "asker"])  # 2. drop the old
        eventually(lambda: status(KEYS["asker"]) == 401)
        assert status(new_key) == 200

        with caplog.at_level(logging.ERROR, logger="app.access"):
            keys_file.write_text(keys_file.read_text().replace("scopes:", "scopez:", 1))  # 3. a broken edit
            # requests go on with the last good keys while the broken file is read, refused and logged
            eventually(lambda: status(new_key) == 200 and "keys file not reloaded" in caplog.text)
            assert status(new_key) == 200 and status(KEYS["asker"]) == 401
        logged = [r.getMessage() for r in caplog.records if "not reloaded" in r.getMessage()]
        assert len(logged) == 1 and str(keys_file) in logged[0] and "scopez" in logged[0], logged

        write_keys_file(keys_file, [entry("asker", KEYS["asker"], ["query"])])  # 4. fixed
        eventually(lambda: status(KEYS["asker"]) == 200)
        assert status(new_key) == 401


def test_rag_keys_create_list_revoke_against_the_running_app(demo_services, keys_file, tmp_path, monkeypatch):
    monkeypatch.setenv("RAG_KEYS_FILE", str(keys_file))
    runner = CliRunner()
    with client_for(demo_services, tmp_path, keys_file=keys_file) as client:
        created = runner.invoke(cli, ["keys", "create", "--name", "support-bot", "--scopes", "query,ingest-status",
                                      "--groups", "support,public-docs", "--requests-per-minute", "30"])
        assert created.exit_code == 0, created.output
        key = created.stdout.strip()
        assert len(key) >= 40 and "\n" not in key  # stdout holds the key alone
        eventually(lambda: client.post("/query", json={"question": GATED}, headers=bearer(key)).status_code == 200)

        again = runner.invoke(cli, ["keys", "create", "--name", "support-bot"])
        assert again.exit_code == 1 and "a key named 'support-bot' exists already" in again.stderr

        listed = runner.invoke(cli, ["keys", "list", "--json"])
        rows = {row["name"]: row for row in map(json.loads, listed.stdout.splitlines())}
        assert rows["support-bot"] == {"name": "support-bot", "scopes": ["ingest-status", "query"],
                                       "groups": ["public-docs", "support"], "key_id": key_digest(key)[:12],
                                       "requests_per_minute": 30, "tokens_per_minute": None}
        assert rows["operator"]["groups"] == ["*"]
        table = runner.invoke(cli, ["keys", "list"]).stdout
        assert "support-bot" in table and key_digest(key)[:12] in table
        assert key not in listed.stdout + table and key_digest(key) not in listed.stdout + table

        revoked = runner.invoke(cli, ["keys", "revoke", "--name", "support-bot"])
        assert revoked.exit_code == 0, revoked.output
        eventually(lambda: client.post("/query", json={"question": GATED}, headers=bearer(key)).status_code == 401)
    assert [e.name for e in read_keys_file(keys_file)] == ["asker", "watcher", "operator"]
    assert list(keys_file.parent.glob(".keys.yaml.*")) == []  # no temporary file left behind


def test_rag_keys_refuses_bad_input_in_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("RAG_KEYS_FILE", raising=False)
    runner = CliRunner()
    no_file = runner.invoke(cli, ["keys", "create", "--name", "x"])
    assert no_file.exit_code == 1 and "pass --file PATH or set RAG_KEYS_FILE" in no_file.stderr
    path = tmp_path / "keys.json"
    bad_scope = runner.invoke(cli, ["keys", "create", "--name", "x", "--scopes", "query,write", "--file", str(path)])
    assert bad_scope.exit_code == 1 and "--scopes: unknown 'write'" in bad_scope.stderr
    made = runner.invoke(cli, ["keys", "create", "--name", "x", "--file", str(path)])
    assert made.exit_code == 0 and json.loads(path.read_text())["keys"][0]["name"] == "x"  # JSON stays JSON
    assert path.stat().st_mode & 0o077 == 0  # a new keys file is readable by its owner only


# --- what is public ---------------------------------------------------------------------------------------

def test_health_without_a_key_is_liveness_only(demo_services, keys_file, tmp_path):
    with client_for(demo_services, tmp_path, keys_file=keys_file) as client:
        anonymous = client.get("/health")
        asker = client.get("/health", headers=bearer(KEYS["asker"]))
        watcher = client.get("/health", headers=bearer(KEYS["watcher"]))
        operator = client.get("/health", headers=bearer(KEYS["operator"]))
        unknown = client.get("/health", headers=bearer("x" * 30))
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ok"}
    assert asker.json() == {"status": "ok"}  # a query-only key learns no more than anyone
    for full in (watcher, operator):
        assert full.status_code == 200 and full.json()["documents"] == 5
        assert full.json()["embedding_model"] == "bundled:all-MiniLM-L6-v2"
    assert unknown.status_code == 401


def test_docs_and_schema_need_a_key_unless_public(demo_services, keys_file, tmp_path):
    paths = ("/openapi.json", "/docs", "/redoc")
    with client_for(demo_services, tmp_path, keys_file=keys_file) as client:
        anonymous = [client.get(path).status_code for path in paths]
        keyed = [client.get(path, headers=bearer(KEYS["watcher"])) for path in paths]
    assert anonymous == [401, 401, 401]
    assert [r.status_code for r in keyed] == [200, 200, 200]
    assert "/query" in keyed[0].json()["paths"] and "/openapi.json" in keyed[1].text

    with client_for(demo_services, tmp_path, keys_file=keys_file, public_routes="openapi") as client:
        assert [client.get(path).status_code for path in paths] == [200, 401, 401]
        assert client.get("/health").json() == {"status": "ok"}
    with client_for(demo_services, tmp_path, keys_file=keys_file, public_routes="health,docs") as client:
        assert [client.get(path).status_code for path in paths] == [200, 200, 200]
        assert client.get("/health").json()["documents"] == 5


def test_without_keys_everything_stays_open(demo_services, tmp_path):
    with client_for(demo_services, tmp_path) as client:
        assert client.get("/health").json()["documents"] == 5
        assert [client.get(p).status_code for p in ("/openapi.json", "/docs", "/redoc")] == [200, 200, 200]
        assert client.get("/jobs/nosuch").status_code == 404


def test_public_routes_setting_names_what_is_wrong(tmp_path):
    with pytest.raises(ValidationError, match="unknown 'metrics' \\(choose from health, docs, openapi\\)"):
        make_settings(tmp_path, public_routes="health,metrics")
    assert make_settings(tmp_path, public_routes=" health , docs ").public_routes == ["health", "docs"]


def test_rag_commands_reach_a_keyed_running_service(demo_services, keys_file, tmp_path, monkeypatch):
    """`rag query` / `rag refresh` find the service by its liveness answer and present RAG_CLIENT_API_KEY
    (else the first admin, else the first plain key)."""
    from tests.app.test_serving import Server

    app = create_app(make_settings(tmp_path / "unused", keys_file=keys_file, api_keys=PLAIN, refresh_cron=""),
                     services=demo_services)
    runner = CliRunner()
    for name in ("RAG_KEYS_FILE", "RAG_API_KEYS", "RAG_ADMIN_API_KEYS", "RAG_CLIENT_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with Server(app) as server:
        monkeypatch.setenv("RAG_HOST", "127.0.0.1")
        monkeypatch.setenv("RAG_PORT", str(server.port))
        keyless = runner.invoke(cli, ["query", GATED])
        monkeypatch.setenv("RAG_CLIENT_API_KEY", KEYS["asker"])
        asked = runner.invoke(cli, ["query", GATED, "--json"])
        monkeypatch.setenv("RAG_CLIENT_API_KEY", PLAIN)
        refresh = runner.invoke(cli, ["refresh", "--no-wait"])
    assert keyless.exit_code == 1 and "401: missing or invalid API key" in keyless.stderr
    assert asked.exit_code == 0, asked.output
    assert json.loads(asked.stdout)["abstain_reason"] == "no_relevant_context"
    assert refresh.exit_code == 1 and "403: key 'api-key-" in refresh.stderr and "'admin' scope" in refresh.stderr
