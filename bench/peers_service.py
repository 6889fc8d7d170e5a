"""This service's side of bench/peers.py, in the project's virtualenv: its own ingest, retriever and ingest job.

Ingest is ``Indexer.apply`` on an empty data directory (what ``rag ingest`` runs: semantic chunker, MiniLM,
embedded Chroma, ledger, BM25); queries go to the hybrid retriever as served (fusion and candidates from
the settings and the shipped tuning file), asked for `depth` chunks, query embedding included (no
query cache). The update is one ingest job (what ``POST /ingest`` queues) with the changed documents and
the deletes, run by the job worker. The store after it is listed from the ledger, and checked against
Chroma's and BM25's chunk ids.

    python bench/peers_service.py PLAN.json OUT.json
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tqdm import tqdm

import common  # noqa: F401  (puts the repository first on sys.path)
from peers_worker import Clock, args, run_probes, run_queries, write

from app.container import build_services
from app.settings import Settings
from app.worker import run_pending
from ingestion.documents import Document
from ingestion.jobs import ingest_payload
from retrieval.hybrid import HybridRetriever


def documents(rows: list[dict[str, str]]) -> list[Document]:
    return [Document(r["id"], r["text"], title=r["title"], source="scifact", created_at="2024-01-01T00:00:00+00:00")
            for r in rows]


def searcher(services, depth: int):
    """The served retriever's configuration over the live index, without the query-vector cache."""
    live, s = services.live, services.settings
    retriever = HybridRetriever(embedder=services.embedder, dense=live.dense, bm25=live.retriever.bm25,
                                fusion=s.fusion, alpha=s.fusion_alpha, rrf_k=s.rrf_k, candidates=s.candidates)
    ledger, generation = services.ledger, live.generation.generation
    chunk_document = dict(zip(retriever.bm25.ids.tolist(), retriever.bm25.columns["document_id"].tolist()))

    def search(question: str) -> list[tuple[str, str]]:
        return [(chunk_document[hit.chunk_id], "") for hit in retriever.search(question, depth)]

    def search_with_text(question: str) -> list[tuple[str, str]]:
        hits = retriever.search(question, depth)
        chunks = ledger.get_chunks(generation, [h.chunk_id for h in hits])
        return [(chunks[h.chunk_id].document_id, chunks[h.chunk_id].text) for h in hits]

    return search, search_with_text


def main() -> None:
    plan, out = args()
    with tempfile.TemporaryDirectory(prefix="peers-service-") as tmp:
        settings = Settings(_env_file=None, data_dir=Path(tmp), load_generator=False, refresh_cron="")
        services = build_services(settings, load_generator=False)
        indexer = services.indexer()
        with Clock() as ingest, tqdm(total=len(plan.documents), desc="ingest", unit="doc", mininterval=5) as bar:
            indexer.apply(documents(plan.documents), progress=lambda done, total: bar.update(done - bar.n))
        chunks = len(services.bm25)
        search, _ = searcher(services, plan.depth)
        rankings, latencies = run_queries(search, plan.queries)

        services.ledger.accept_job("ingest", ingest_payload(documents(plan.changed), plan.deleted),
                                   respond=lambda job_id: {"job_id": job_id})
        with Clock() as update:
            results = run_pending(services)
        if set(results.values()) != {"succeeded"}:
            raise SystemExit(f"the update job did not succeed: {results}")
        _, search_with_text = searcher(services, plan.depth)
        probes = run_probes(search_with_text, plan.probes, plan.probe_k)
        generation = services.generation.generation
        store = [(c.document_id, c.text) for c in services.ledger.iter_chunks(generation)]
        ledger_ids = {c.chunk_id for c in services.ledger.iter_chunks(generation)}
        same = (set(services.bm25.ids.tolist()) == ledger_ids and services.dense.count() == len(ledger_ids))
        services.ledger.close()
    write(out, system="this service",
          packages=("chromadb", "bm25s", "sentence-transformers", "torch"),
          chunking=(f"semantic chunker, {plan.chunk_tokens} MiniLM tokens at most (RAG_CHUNK_MAX_TOKENS "
                    f"{settings.chunk_max_tokens}, capped at the encoder's limit), {settings.chunk_overlap_tokens} "
                    "overlap, title header"),
          retrieval=(f"bm25s + Chroma, {settings.fusion} fusion (alpha {settings.fusion_alpha}), "
                     f"{settings.candidates} candidates per side"),
          ingest=ingest, update=update, chunks=chunks, rankings=rankings, latencies_ms=latencies, probes=probes,
          store=store,
          notes=[f"store listed from the ledger; Chroma and BM25 hold {'the same' if same else 'OTHER'} chunk ids"])


if __name__ == "__main__":
    main()
