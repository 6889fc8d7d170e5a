"""Ingestion into real Chroma + BM25 and hybrid retrieval over the demo corpus."""

from app.cli.common import DEMO_CORPUS
from ingestion.loaders import load_documents


def test_bm25_and_chroma_hold_the_same_ids_as_the_ledger(demo_services):
    generation = demo_services.generation.generation
    ledger_ids = demo_services.ledger.chunk_ids(generation)
    assert ledger_ids
    assert set(demo_services.dense.iter_ids()) == ledger_ids
    assert set(demo_services.bm25.ids.tolist()) == ledger_ids


def test_reingesting_the_same_documents_changes_nothing(demo_services):
    before = demo_services.ledger.chunk_ids(demo_services.generation.generation)
    counts = demo_services.indexer().apply(load_documents([DEMO_CORPUS]))
    assert counts.unchanged == 5 and counts.added == counts.updated == counts.chunks_written == 0
    assert demo_services.ledger.chunk_ids(demo_services.generation.generation) == before


def test_the_one_answering_chunk_ranks_first(demo_services):
    cases = {
        "How often must the Orbit Scale be recalibrated?": ("product-overview.html", "6 months"),
        "How many vacation days can be carried over into the next year?": ("vacation-and-leave.md", "carried over"),
        "Which deployment do I restart when the connection pool is exhausted?": ("oncall-runbook.md", "pgbouncer"),
        "How long must passwords be?": ("security-basics.txt", "14 characters"),
    }
    generation = demo_services.generation.generation
    for question, (document_id, phrase) in cases.items():
        hits = demo_services.retriever.search(question, 3)
        top = demo_services.ledger.get_chunks(generation, [hits[0].chunk_id])[hits[0].chunk_id]
        assert top.document_id == document_id, question
        assert phrase in top.text, question


def test_filters_apply_to_both_retrievers(demo_services):
    generation = demo_services.generation.generation
    for method in ("bm25", "dense", "hybrid"):
        hits = demo_services.retriever.search("reimbursed hotel costs", 5, method=method,
                                              filters={"document_id": ["security-basics.txt"]})
        rows = demo_services.ledger.get_chunks(generation, [h.chunk_id for h in hits])
        assert {r.document_id for r in rows.values()} <= {"security-basics.txt"}, method
