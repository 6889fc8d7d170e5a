"""Progress per chunk: one batch of documents embeds for minutes on a CPU, so progress moves within it.

Old main: `rag ingest` of 64 Markdown files showed 0/64 for 14 minutes, then 64/64.
"""

from app.container import build_services
from ingestion.refresh import REFRESH_KINDS
from tests.app.conftest import make_settings, synthetic_documents


def test_ingest_and_refresh_report_progress_per_chunk(tmp_path, embedder):
    settings = make_settings(tmp_path, ingest_batch_documents=64, embedding_batch_size=4)
    services = build_services(settings, load_generator=False, embedder=embedder)
    original_batch = embedder.batch_size
    embedder.batch_size = 4  # the session embedder: a small mini-batch, so one step has many
    try:
        documents = synthetic_documents(24)
        steps, embedded = [], []
        indexer = services.indexer()
        indexer.on_embedded = embedded.append
        counts = indexer.apply(documents, progress=lambda done, total: steps.append(done))
        assert steps == [24]  # one step for all 24 documents ...
        assert len(embedded) >= 6 and sum(embedded) == counts.chunks_written  # ... but progress per 4 chunks

        from app.worker import run_pending, submit_refresh

        reports = []
        submit_refresh(services, "refresh")
        run_pending(services, REFRESH_KINDS, report=lambda job, progress: reports.append(dict(progress)))
        building = [r["chunks_embedded"] for r in reports if r.get("phase") == "building" and "chunks_embedded" in r]
        assert len(building) >= 6 and building == sorted(building) and building[-1] == counts.chunks_written
    finally:
        embedder.batch_size = original_batch
        services.ledger.close()
