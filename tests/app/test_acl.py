"""Document access control end to end: webhook acls, an acl change alone taking effect with its job and
kept by a refresh, /query with keys from a keys file, and a property test over the whole answer.

Real components throughout: the service's chunker, MiniLM, embedded Chroma, bm25s, the ledger and the
bundled SmolLM2 (shared with the demo_services fixture).
"""

import hashlib
import json
import shutil
import threading

import pytest
import yaml
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.cli.common import DEMO_CORPUS
from app.container import build_services, refresh_config
from app.main import create_app
from app.schemas import QueryResponse
from generation.rag import answer_question
from ingestion.documents import Document
from ingestion.loaders import load_documents
from ingestion.refresh import run_refresh_job
from retrieval.acl import visible
from tests.app.conftest import SECRET, make_settings, signed_headers, wait_for_job

KEYS = {"hr-bot": ("hr-key-" + "h" * 20, ["hr"]), "eng-bot": ("eng-key-" + "e" * 20, ["eng"]),
        "ops": ("ops-key-" + "o" * 20, ["*"]), "plain": ("plain-key-" + "p" * 20, [])}
GROUPS = ("hr", "eng", "legal", "sales")
NOTE_WORDS = ("amber basalt cedar delta ember fjord glacier harbor iris juniper kestrel lagoon".split())


def bearer(name: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[name][0]}"}


def note(i: int, acl=()) -> Document:
    """A one-chunk note with a word only it holds (``note<i>``), so a query for that word finds exactly it."""
    a, b = NOTE_WORDS[i % len(NOTE_WORDS)], NOTE_WORDS[(i * 5 + 3) % len(NOTE_WORDS)]
    return Document(f"note-{i:02d}", f"Memo note{i:02d} about the {a} audit. The {b} team reviewed note{i:02d} "
                                     f"and filed it under {a}.", title=f"Memo {i}", source="memos", acl=acl)


@pytest.fixture(scope="module")
def service(tmp_path_factory, embedder, demo_services):
    """The demo corpus with vacation-and-leave.md under hr/ (.acl: hr) and the expense policy under
    finance/ (.acl: finance); the rest public. Keys from a keys file; the demo generator."""
    root = tmp_path_factory.mktemp("acl-service")
    corpus = root / "corpus"
    shutil.copytree(DEMO_CORPUS, corpus)
    for folder, name in (("hr", "vacation-and-leave.md"), ("finance", "expense-policy.md")):
        (corpus / folder).mkdir()
        (corpus / name).rename(corpus / folder / name)
        (corpus / folder / ".acl").write_text(f"{folder}\n")
    keys_file = root / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"keys": [
        {"name": name, "sha256": hashlib.sha256(key.encode()).hexdigest(), "groups": groups,
         "scopes": ["query", "ingest-status"]} for name, (key, groups) in KEYS.items()]}))
    settings = make_settings(root / "data", keys_file=keys_file, webhook_secret=SECRET, refresh_cron="",
                             max_new_tokens=24, refresh_golden_sample=4)
    services = build_services(settings, load_generator=False, embedder=embedder)
    services.generator = demo_services.generator
    services.indexer().apply(load_documents([corpus]))
    with TestClient(create_app(settings, services=services)) as client:
        yield client, services
    services.ledger.close()


def query(client, key: str, question: str, **extra) -> dict:
    response = client.post("/query", json={"question": question, **extra}, headers=bearer(key))
    assert response.status_code == 200, response.text
    return response.json()


def ingest(client, documents: list[dict]) -> dict:
    body = json.dumps({"documents": documents}).encode()
    response = client.post("/ingest", content=body, headers=signed_headers(body))
    assert response.status_code == 202, response.text
    return wait_for_job(client, response.json()["job_id"], headers=bearer("hr-bot"))


def cited(body: dict) -> set[str]:
    return {c["document_id"] for c in body["citations"]}


def test_query_through_keys_with_different_groups(service):
    """The same question: the hr key is answered from the HR document, the eng key never sees it (nor
    the finance one), a key without groups sees public documents only, a "*" key sees everything."""
    client, _ = service
    question = "How many vacation days do full-time employees get?"
    hr = query(client, "hr-bot", question, top_k=6)
    assert hr["citations"][0]["document_id"] == "hr/vacation-and-leave.md"
    assert "hr/vacation-and-leave.md" in {hr["citations"][i - 1]["document_id"] for i in hr["cited"]} or hr["abstained"]
    for key in ("eng-bot", "plain"):
        other = query(client, key, question, top_k=6)
        assert other["citations"], "public documents still answer"
        assert not cited(other) & {"hr/vacation-and-leave.md", "finance/expense-policy.md"}, key
        assert "vacation-and-leave" not in json.dumps(other)
    streamed = client.post("/query", json={"question": question, "top_k": 6, "stream": True}, headers=bearer("eng-bot"))
    assert streamed.status_code == 200 and "vacation-and-leave" not in streamed.text
    ops = query(client, "ops", "What is the limit for hotel expenses?", top_k=8)
    assert "finance/expense-policy.md" in cited(ops)
    assert "finance/expense-policy.md" not in cited(query(client, "hr-bot", "What is the limit for hotel expenses?",
                                                          top_k=8))


def test_webhook_refuses_a_bad_acl_naming_document_and_group(service):
    client, services = service
    before = services.ledger.count_documents()
    body = json.dumps({"documents": [{"document_id": "fine", "text": "ok", "acl": ["hr"]},
                                     {"document_id": "memo-x", "text": "t", "acl": ["hr", "bad group", "*"]}]})
    response = client.post("/ingest", content=body.encode(), headers=signed_headers(body.encode()))
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "documents[1] (document_id 'memo-x'): acl[1]: group 'bad group' is invalid" in detail
    assert "documents[1] (document_id 'memo-x'): acl[2]: '*' is a key's group" in detail
    body = json.dumps({"documents": [{"document_id": "memo-y", "text": "t", "acl": "hr"}]}).encode()
    response = client.post("/ingest", content=body, headers=signed_headers(body))
    assert response.status_code == 422 and "acl" in response.json()["detail"]
    assert services.ledger.count_documents() == before


def test_an_acl_change_alone_takes_effect_with_its_job_and_a_refresh_keeps_it(service):
    client, services = service
    memo = note(90)
    seen = lambda groups: "note-90" in {c.document_id for c in retrieved(services, "note90", groups)}  # noqa: E731
    job = ingest(client, [{"document_id": memo.document_id, "text": memo.text, "title": memo.title, "acl": ["hr"]}])
    assert job["status"] == "succeeded" and job["counts"]["added"] == 1
    assert seen(frozenset({"hr"})) and not seen(frozenset({"eng"})) and not seen(frozenset())

    job = ingest(client, [{"document_id": memo.document_id, "text": memo.text, "title": memo.title,
                           "acl": ["eng", "legal"]}])
    assert job["status"] == "succeeded"
    assert job["counts"]["updated"] == 1 and job["counts"]["chunks_written"] == 0  # same text: nothing re-embedded
    gen = services.generation.generation
    ids = services.ledger.document_chunk_ids(gen, "note-90")
    assert {c.acl for c in services.ledger.get_chunks(gen, ids).values()} == {("eng", "legal")}
    stored = services.dense.collection.get(ids=ids, include=["metadatas"])["metadatas"]
    assert all(m["acl"] == ["eng", "legal", "#restricted"] for m in stored)
    for method in ("bm25", "dense"):  # each index on its own follows the change
        hits = lambda groups: [h.chunk_id for h in services.retriever.search(  # noqa: E731
            "note90", 50, groups=groups, method=method)]
        assert not set(hits(frozenset({"hr"}))) & set(ids) and set(ids) <= set(hits(frozenset({"legal"}))), method
    assert not seen(frozenset({"hr"})) and seen(frozenset({"eng"})) and seen(None)
    assert "note-90" not in cited(query(client, "hr-bot", "What does memo note90 say about the audit?"))

    before = services.generation.generation
    _, accepted = services.ledger.accept_job("refresh", {}, respond=lambda job_id: {"job_id": job_id})
    run_refresh_job(services.refresh_context(), refresh_config(services.settings),
                    services.ledger.start_job(accepted["job_id"]))
    assert services.generation.generation == before + 1
    assert not seen(frozenset({"hr"})) and seen(frozenset({"legal"}))
    assert set(services.bm25.acl.tolist()) >= {"eng,legal", "hr", "finance", ""}


def test_reconcile_repairs_bm25_acls_a_stopped_job_left_behind(service):
    """A job stopped between its ledger step and the BM25 rebuild changed acls only: chunk ids match, yet
    reconcile sees the acls differ and rebuilds BM25 (meanwhile the ledger check drops the hit)."""
    _, services = service
    indexer = services.indexer()
    indexer.apply([note(91, acl=("hr",))])
    indexer.apply([note(91, acl=("sales",))], rebuild_bm25=False)
    assert "hr" in services.bm25.acl.tolist()  # BM25 still says hr
    assert "note-91" not in {c.document_id for c in retrieved(services, "note91", frozenset({"hr"}))}
    assert indexer.reconcile()["bm25_rebuilt"] == 1
    hits = {h.chunk_id for h in services.retriever.search("note91", 10, groups=frozenset({"hr"}), method="bm25")}
    assert not hits & set(services.ledger.document_chunk_ids(services.generation.generation, "note-91"))
    assert "note-91" in {c.document_id for c in retrieved(services, "note91", frozenset({"sales"}))}


def retrieved(services, question: str, groups, k: int = 5):
    from generation.rag import retrieve_context

    live = services.live
    return retrieve_context(live.retriever, services.ledger, live.generation.generation, question, k, groups=groups)


class Recording:
    """The real generator, recording the chunks each call packs into its prompt."""

    def __init__(self, generator) -> None:
        self._generator, self.packed, self._lock = generator, [], threading.Lock()

    def __getattr__(self, name):
        return getattr(self._generator, name)

    def generate(self, packed, **options):
        with self._lock:
            self.packed.append(list(packed.chunks))
        return self._generator.generate(packed, **options)


@pytest.fixture(scope="module")
def restricted_notes(service):
    """24 notes with seeded random acls (some public) beside the demo corpus."""
    import random

    _, services = service
    rng = random.Random(5)
    notes = [note(i, tuple(rng.sample(GROUPS, rng.randint(0, 2)))) for i in range(24)]
    services.indexer().apply(notes)
    return {n.document_id: n.acl for n in notes}


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(groups=st.one_of(st.none(), st.frozensets(st.sampled_from(GROUPS + ("other",)), max_size=2)),
       asked=st.lists(st.integers(0, 23), min_size=1, max_size=3), top_k=st.integers(1, 8))
def test_property_nothing_outside_the_callers_groups_reaches_the_answer(service, restricted_notes, groups, asked,
                                                                       top_k):
    """Random callers asking for random notes: hits, the generator's context, citations and the whole
    response (answer, timings, provenance) hold nothing of a note the caller may not see; the hits are
    still top_k (enough visible chunks exist), and a visible note asked for by its own word is found."""
    _, services = service
    live = services.live
    recording = Recording(services.generator)
    question = "What do the memos " + " and ".join(f"note{i:02d}" for i in asked) + " say?"
    hits = retrieved(services, question, groups, k=top_k)
    answer = answer_question(question, retriever=live.retriever, ledger=services.ledger,
                             generation=live.generation.generation, generator=recording,
                             provenance=services.provenance(live=live), top_k=top_k, max_new_tokens=6, groups=groups)
    hidden = {doc for doc, acl in restricted_notes.items() if not visible(acl, groups)}
    chunks = hits + [c for packed in recording.packed for c in packed] + answer.citations
    assert not {c.document_id for c in chunks} & hidden
    assert len(hits) == top_k
    response = json.dumps(QueryResponse.from_answer(answer).model_dump(mode="json"))
    not_asked = {f"note-{i:02d}" for i in range(24)} - {f"note-{i:02d}" for i in asked}
    for doc in hidden:
        assert doc not in response
        if doc in not_asked:  # the answer may repeat the question's words, never a hidden note's text
            assert f"note{doc[-2:]}" not in response
    if len(asked) == 1 and f"note-{asked[0]:02d}" not in hidden:
        assert f"note-{asked[0]:02d}" in {c.document_id for c in hits}


def test_rag_ingest_acl_and_rag_query_groups(tmp_path, embedder, demo_services, monkeypatch):
    """`rag ingest --acl` restricts documents without an acl of their own; `rag query --groups` answers
    in this process as a key with those groups would ("" : a key without groups)."""
    import app.container
    from typer.testing import CliRunner

    from app.cli import cli
    from tests.app.conftest import REPO

    lines = tmp_path / "notes.jsonl"
    lines.write_text("".join(json.dumps({"document_id": d.document_id, "text": d.text, **extra}) + "\n"
                             for d, extra in ((note(1), {}), (note(2), {"acl": []}))))
    for name, value in {"RAG_DATA_DIR": str(tmp_path / "data"), "RAG_MODEL_CACHE_DIR": str(REPO / ".cache" / "models"),
                        "RAG_MAX_NEW_TOKENS": "8"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(app.container, "build_embedder", lambda settings: embedder)
    monkeypatch.setattr(app.container, "build_generator", lambda settings, **_: demo_services.generator)
    runner = CliRunner()
    result = runner.invoke(cli, ["ingest", str(lines), "--acl", "hr", "--acl", "legal"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["added"] == 2

    def documents(groups: str) -> set[str]:
        result = runner.invoke(cli, ["query", "What does memo note01 say?", "--groups", groups, "--json",
                                     "--top-k", "2"])
        assert result.exit_code == 0, result.output
        return {c["document_id"] for c in json.loads(result.stdout)["citations"]}

    assert documents("") == {"note-02"}
    assert documents("sales, legal") == {"note-01", "note-02"} and documents("*") == {"note-01", "note-02"}
    bad = runner.invoke(cli, ["query", "q", "--groups", "a b"])
    assert bad.exit_code == 1 and "--groups: invalid group 'a b'" in bad.output
