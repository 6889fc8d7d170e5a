"""Crash safety, proven: SIGKILL a worker process at random points of an ingest job and of a refresh,
restart it, let it finish; the end state equals an uninterrupted run's. Same documents and versions,
same chunk ids, ledger ids == Chroma ids == BM25 ids for every kept generation, no orphan collection,
BM25 folder or ledger row, the same job counts.

The live generation answers throughout: each worker process runs a probe thread that retrieves
documents the job leaves alone, from start-up (before it resumes anything: the state a crash left)
until it exits or is killed; every probe must find its document.

Worker processes come from a forkserver that imported the heavy modules once, so a start costs the
model load (about 2 s), not the imports; the worker is ``app.worker.resume_all``, what a restart does.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from tests.app.conftest import MODEL_CACHE, marker, synthetic_documents

SEEDS = (11, 12, 13)
BASE_DOCS = 40
PROBED = range(30, 40)  # documents no job below touches: they must always be found


def settings_kwargs(data_dir: Path) -> dict:
    return {"data_dir": str(data_dir), "model_cache_dir": str(MODEL_CACHE), "load_generator": False,
            "refresh_cron": "", "ingest_batch_documents": 2, "refresh_golden_sample": 8}


# --- what runs in the worker processes -----------------------------------------------------------


def _worker(kwargs: dict, probe_log: str) -> None:
    from app.settings import Settings
    from app.worker import resume_all

    resume_all(Settings(_env_file=None, **kwargs), during=lambda services: _start_probes(services, probe_log))


def _start_probes(services, probe_log: str):
    from generation.rag import retrieve_context

    stop = threading.Event()

    def probe() -> None:
        with open(probe_log, "a", buffering=1) as log:
            for i in _cycle(PROBED):
                if stop.is_set():
                    return
                live = services.live
                try:
                    found = retrieve_context(live.retriever, services.ledger, live.generation.generation,
                                             marker("doc", i, 0), 3)
                    ok = f"doc-{i:03d}" in [c.document_id for c in found]
                    log.write(f"{'ok' if ok else 'miss'} g{live.generation.generation} doc-{i:03d}\n")
                except Exception as exc:  # noqa: BLE001 - every failure is recorded
                    log.write(f"error {exc!r}\n")
                time.sleep(0.05)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()

    def stop_probes() -> None:
        stop.set()
        thread.join()

    return stop_probes


def _cycle(values):
    while True:
        yield from values


def _snapshot(kwargs: dict, out: multiprocessing.Queue) -> None:
    """Everything that must equal a clean run's (nothing time- or id-dependent)."""
    from app.settings import Settings
    from ingestion.ledger import Ledger
    from retrieval.bm25 import BM25Index
    from retrieval.dense import chroma_client

    settings = Settings(_env_file=None, **kwargs)
    ledger = Ledger(settings.ledger_path)
    client = chroma_client(path=settings.chroma_path)
    q = ledger._query
    kept = {g.generation: g for g in ledger.generations() if g.state in ("live", "previous")}
    snapshot = {
        "documents": [tuple(r) for r in q("SELECT document_id, state, version, content_hash FROM documents "
                                         "ORDER BY document_id")],
        "generations": [(g.generation, g.state, g.collection) for g in ledger.generations()],
        "jobs": [(r["kind"], r["status"], r["counts_json"], r["error"])
                 for r in q("SELECT * FROM jobs ORDER BY rowid")],
        "collections": sorted(c.name for c in client.list_collections()),
        "bm25_folders": sorted(p.name for p in settings.bm25_path.iterdir()),
        "chunk_rows_by_generation": [tuple(r) for r in
                                     q("SELECT generation, COUNT(*) FROM chunks GROUP BY generation")],
        "built_rows_by_generation": [tuple(r) for r in q("SELECT generation, COUNT(*) FROM generation_documents "
                                                         "GROUP BY generation")],
        "segment_folders": len([p for p in settings.chroma_path.iterdir() if p.is_dir()]),
    }
    for number, generation in kept.items():
        bm25 = BM25Index.load(settings.bm25_path / f"g{number}")
        chroma = client.get_collection(generation.collection).get(include=[])["ids"]
        snapshot[f"g{number}"] = {
            "ledger": sorted(ledger.chunk_ids(number)), "chroma": sorted(chroma),
            "bm25": sorted(bm25.ids.tolist()) if bm25 is not None else None,
        }
    out.put(json.loads(json.dumps(snapshot)))


# --- the test process ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workers():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["sentence_transformers", "chromadb", "app.worker", "generation.rag",
                                    "tests.app.test_crash"])
    return context


def run(workers, data_dir: Path, probe_log: Path) -> float:
    """Run a worker to its end; returns about how long the newest job was running (seconds)."""
    process = workers.Process(target=_worker, args=(settings_kwargs(data_dir), str(probe_log)))
    process.start()
    started = None
    while process.is_alive():
        if started is None and job_state(data_dir)[0] == "running":
            started = time.monotonic()
        time.sleep(0.02)
    process.join(600)
    assert process.exitcode == 0, f"worker exit code {process.exitcode}"
    return time.monotonic() - (started or time.monotonic())


def run_and_kill(workers, data_dir: Path, probe_log: Path, rng: random.Random, job_seconds: float,
                 phases: tuple = ()) -> str:
    """Start a worker, SIGKILL it at a random point of the unfinished job: a random share of its documents
    done, or (one time in two, when `phases` are given) on entering one of those phases; then a random
    delay of up to a fifth of the clean job's duration. Returns the job's status after the kill."""
    process = workers.Process(target=_worker, args=(settings_kwargs(data_dir), str(probe_log)))
    process.start()
    fraction, delay = rng.uniform(0.0, 0.9), rng.uniform(0.0, 0.2 * job_seconds)
    phase = rng.choice(phases) if phases and rng.random() < 0.5 else None
    while process.is_alive():
        status, progress = job_state(data_dir)
        reached = progress.get("phase") == phase if phase else \
            progress.get("done", 0) >= fraction * max(progress.get("total", 1), 1)
        if status == "running" and reached:
            time.sleep(delay)
            break
        if status in ("succeeded", "failed"):
            break
        time.sleep(0.02)
    if process.is_alive():
        os.kill(process.pid, signal.SIGKILL)
    process.join(60)
    return job_state(data_dir)[0]


def job_state(data_dir: Path) -> tuple[str | None, dict]:
    """Status and progress of the newest job, read without disturbing the worker (SQLite WAL reader)."""
    try:
        db = sqlite3.connect(f"file:{data_dir / 'ledger.sqlite3'}?mode=ro", uri=True, timeout=5)
        try:
            row = db.execute("SELECT status, progress_json FROM jobs ORDER BY rowid DESC LIMIT 1").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None, {}
    return (row[0], json.loads(row[1])) if row else (None, {})


def snapshot(workers, data_dir: Path) -> dict:
    out = workers.Queue()
    process = workers.Process(target=_snapshot, args=(settings_kwargs(data_dir), out))
    process.start()
    result = out.get(timeout=300)
    process.join(60)
    return result


def queue_job(data_dir: Path, kind: str, payload: dict) -> None:
    from ingestion.ledger import Ledger

    ledger = Ledger(data_dir / "ledger.sqlite3")
    ledger.accept_job(kind, payload, respond=lambda job_id: {"job_id": job_id})
    ledger.close()


def ingest_payload_for(documents, deletes=()) -> dict:
    from ingestion.jobs import ingest_payload

    return ingest_payload(documents, deletes)


def check_consistent(state: dict) -> None:
    kept = [g for g in state["generations"] if g[1] in ("live", "previous")]
    assert state["collections"] == sorted(g[2] for g in kept)
    assert state["bm25_folders"] == sorted(f"g{g[0]}" for g in kept)
    assert {g for g, _ in state["chunk_rows_by_generation"]} == {g[0] for g in kept}
    assert state["segment_folders"] <= len(kept)  # dropped collections' files were reclaimed
    for number, _, _ in kept:
        ids = state[f"g{number}"]
        assert ids["ledger"] == ids["chroma"] == ids["bm25"], f"generation {number} is inconsistent"
        assert len(ids["ledger"]) == len(set(ids["ledger"]))


def probe_results(probe_log: Path) -> tuple[int, list[str]]:
    lines = probe_log.read_text().splitlines() if probe_log.exists() else []
    complete = [line for line in lines if line.startswith(("ok ", "miss ", "error "))]
    return sum(line.startswith("ok ") for line in complete), [line for line in complete if not line.startswith("ok ")]


@pytest.fixture(scope="module")
def base(workers, tmp_path_factory):
    """A data directory holding BASE_DOCS documents (ingested by a worker through a job)."""
    root = tmp_path_factory.mktemp("crash")
    data = root / "base"
    queue_job(data, "ingest", ingest_payload_for(synthetic_documents(BASE_DOCS)))
    run(workers, data, root / "base-probes.log")
    return root, data


def ingest_job_payload() -> dict:
    """20 new documents, 10 changed, 5 deleted, 5 sent unchanged."""
    new = synthetic_documents(20, start=BASE_DOCS)
    changed = synthetic_documents(10, version=1)
    unchanged = synthetic_documents(5, start=10)
    return ingest_payload_for(new + changed + unchanged, deletes=[f"doc-{i:03d}" for i in range(15, 20)])


def crash_and_compare(workers, root: Path, template: Path, kind: str, payload: dict, name: str,
                      phases: tuple = ()) -> dict:
    clean = root / f"{name}-clean"
    shutil.copytree(template, clean)
    queue_job(clean, kind, payload)
    job_seconds = run(workers, clean, root / f"{name}-clean.log")
    expected = snapshot(workers, clean)
    check_consistent(expected)
    interrupted = 0
    for seed in SEEDS:
        rng = random.Random(seed)
        data, probes = root / f"{name}-{seed}", root / f"{name}-{seed}.log"
        shutil.copytree(template, data)
        queue_job(data, kind, payload)
        for _ in range(1 + rng.randrange(2)):  # one or two kills
            status = run_and_kill(workers, data, probes, rng, job_seconds, phases)
            interrupted += status == "running"
        run(workers, data, probes)
        state = snapshot(workers, data)
        check_consistent(state)
        assert state == expected, f"seed {seed}: the end state differs from an uninterrupted run's"
        answered, failures = probe_results(probes)
        assert answered > 0 and not failures, (seed, failures[:5])
    assert interrupted >= len(SEEDS), "the kills should land while the job runs"
    return expected


def test_kill_during_ingest_job_then_resume_equals_clean_run(workers, base):
    root, data = base
    expected = crash_and_compare(workers, root, data, "ingest", ingest_job_payload(), "ingest")
    [_, (kind, status, counts, error)] = expected["jobs"]
    assert (kind, status, error) == ("ingest", "succeeded", None)
    assert json.loads(counts) == {"added": 20, "updated": 10, "unchanged": 5, "deleted": 5,
                                  "chunks_written": 30, "chunks_removed": 15}


def test_kill_during_refresh_then_resume_equals_clean_run(workers, base):
    root, data = base
    # start from two generations (1 previous, 2 live) so the refresh under test also drops one
    template = root / "refresh-template"
    shutil.copytree(data, template)
    queue_job(template, "refresh", {})
    run(workers, template, root / "refresh-template.log")
    expected = crash_and_compare(workers, root, template, "refresh", {}, "refresh",
                                 phases=("validating", "switching"))
    states = {number: state for number, state, _ in expected["generations"]}
    assert states == {1: "dropped", 2: "previous", 3: "live"}
    assert expected["jobs"][-1][1] == "succeeded"
