"""Haystack 2.x's side of bench/peers.py, run in .venv-haystack (standard library and Haystack only).

Ingest: an indexing ``Pipeline`` of ``DocumentSplitter`` (by word, the service's token limit converted
with the corpus's MiniLM tokens per word), ``SentenceTransformersDocumentEmbedder`` on the bundled MiniLM
folder and ``DocumentWriter(policy=DuplicatePolicy.OVERWRITE)`` into an ``InMemoryDocumentStore`` (which
keeps its BM25 statistics as documents are written). Queries: a pipeline of
``SentenceTransformersTextEmbedder`` -> ``InMemoryEmbeddingRetriever`` and ``InMemoryBM25Retriever`` ->
``DocumentJoiner(join_mode="reciprocal_rank_fusion")``. Update: the changed documents through the same
indexing pipeline (OVERWRITE replaces a chunk whose id, a hash of its content and metadata, is already
stored), then ``delete_documents`` on the chunk ids of each deleted document (found by a metadata filter).

    .venv-haystack/bin/python bench/peers_haystack.py PLAN.json OUT.json
"""

from __future__ import annotations


from haystack import Document, Pipeline
from haystack.components.embedders import SentenceTransformersDocumentEmbedder, SentenceTransformersTextEmbedder
from haystack.components.joiners import DocumentJoiner
from haystack.components.preprocessors import DocumentSplitter
from haystack.components.retrievers.in_memory import InMemoryBM25Retriever, InMemoryEmbeddingRetriever
from haystack.components.writers import DocumentWriter
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack.document_stores.types import DuplicatePolicy
from peers_worker import Clock, args, run_probes, run_queries, write

PACKAGES = ("haystack-ai", "sentence-transformers", "torch")


def documents(rows: list[dict[str, str]]) -> list[Document]:
    return [Document(id=r["id"], content=f"{r['title']}\n{r['text']}", meta={"doc_id": r["id"]}) for r in rows]


def main() -> None:
    plan, out = args()
    store = InMemoryDocumentStore()
    indexing = Pipeline()
    indexing.add_component("splitter", DocumentSplitter(split_by="word", split_length=plan.chunk_words,
                                                        split_overlap=plan.overlap_words))
    indexing.add_component("embedder", SentenceTransformersDocumentEmbedder(model=plan.embedding_model))
    indexing.add_component("writer", DocumentWriter(store, policy=DuplicatePolicy.OVERWRITE))
    indexing.connect("splitter.documents", "embedder.documents")
    indexing.connect("embedder.documents", "writer.documents")

    querying = Pipeline()
    querying.add_component("text_embedder", SentenceTransformersTextEmbedder(model=plan.embedding_model,
                                                                             progress_bar=False))
    querying.add_component("embedding_retriever", InMemoryEmbeddingRetriever(store, top_k=plan.candidates))
    querying.add_component("bm25_retriever", InMemoryBM25Retriever(store, top_k=plan.candidates))
    querying.add_component("joiner", DocumentJoiner(join_mode="reciprocal_rank_fusion", top_k=plan.depth))
    querying.connect("text_embedder.embedding", "embedding_retriever.query_embedding")
    querying.connect("embedding_retriever.documents", "joiner.documents")
    querying.connect("bm25_retriever.documents", "joiner.documents")

    def search(question: str) -> list[tuple[str, str]]:
        found = querying.run({"text_embedder": {"text": question}, "bm25_retriever": {"query": question}})
        return [(d.meta["doc_id"], d.content) for d in found["joiner"]["documents"]]

    indexing.warm_up()  # loads the model, as the other sides do before their clocks start
    querying.warm_up()
    with Clock() as ingest:
        indexing.run({"splitter": {"documents": documents(plan.documents)}})
    chunks = store.count_documents()
    rankings, latencies = run_queries(search, plan.queries)

    with Clock() as update:
        indexing.run({"splitter": {"documents": documents(plan.changed)}})
        gone = store.filter_documents(filters={"field": "meta.doc_id", "operator": "in", "value": plan.deleted})
        store.delete_documents([d.id for d in gone])
    probes = run_probes(search, plan.probes, plan.probe_k)
    store_rows = [(d.meta["doc_id"], d.content) for d in store.filter_documents()]
    write(out, system="Haystack", packages=PACKAGES,
          chunking=(f"DocumentSplitter(split_by='word', split_length={plan.chunk_words}, "
                    f"split_overlap={plan.overlap_words})"),
          retrieval=(f"InMemoryDocumentStore: InMemoryBM25Retriever (BM25L) + InMemoryEmbeddingRetriever, "
                     f"DocumentJoiner reciprocal_rank_fusion, {plan.candidates} per side"),
          ingest=ingest, update=update, chunks=chunks, rankings=rankings, latencies_ms=latencies, probes=probes,
          store=store_rows, notes=["store listed with filter_documents()"])


if __name__ == "__main__":
    main()
