"""LlamaIndex's side of bench/peers.py, run in .venv-llamaindex (standard library and LlamaIndex only).

Ingest: ``IngestionPipeline`` (SentenceSplitter counting MiniLM tokens, HuggingFaceEmbedding on the bundled
MiniLM folder) with a ``SimpleDocumentStore`` docstore, ``DocstoreStrategy.UPSERTS`` and a Chroma vector
store (embedded ``PersistentClient``). The pipeline's docstore holds the source documents (for change
detection), not the chunks, so ``BM25Retriever`` is built from the chunk nodes the vector store holds
(``ChromaVectorStore.get_nodes``), again after the update. Queries: ``QueryFusionRetriever`` over the
vector and BM25 retrievers, ``num_queries=1`` (no LLM query rewriting), reciprocal-rank fusion.
Update: the pipeline re-run on the changed documents (UPSERTS deletes a changed document's nodes from the
vector store by ref_doc_id and re-ingests it), then each deleted document removed the way the pipeline's
own UPSERTS_AND_DELETE strategy removes one: ``vector_store.delete(ref_doc_id)`` and
``docstore.delete_document(ref_doc_id)``.

    .venv-llamaindex/bin/python bench/peers_llamaindex.py PLAN.json OUT.json
"""

from __future__ import annotations

import tempfile

import chromadb
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.ingestion import DocstoreStrategy, IngestionPipeline
from llama_index.core.llms import MockLLM
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.retrievers import QueryFusionRetriever
from llama_index.core.storage.docstore import SimpleDocumentStore
from llama_index.embeddings.huggingface import HuggingFaceEmbedding
from llama_index.retrievers.bm25 import BM25Retriever
from llama_index.vector_stores.chroma import ChromaVectorStore
from peers_worker import Clock, args, run_probes, run_queries, write
from transformers import AutoTokenizer

PACKAGES = ("llama-index-core", "llama-index-vector-stores-chroma", "llama-index-retrievers-bm25",
            "llama-index-embeddings-huggingface", "chromadb", "bm25s", "sentence-transformers", "torch")


def documents(rows: list[dict[str, str]]) -> list[Document]:
    return [Document(text=f"{r['title']}\n{r['text']}", id_=r["id"]) for r in rows]


def main() -> None:
    plan, out = args()
    Settings.llm = MockLLM()  # nothing here generates; keeps LlamaIndex from resolving its OpenAI default
    embed = HuggingFaceEmbedding(model_name=plan.embedding_model)
    Settings.embed_model = embed
    tokenizer = AutoTokenizer.from_pretrained(plan.embedding_model)
    splitter = SentenceSplitter(chunk_size=plan.chunk_tokens, chunk_overlap=plan.overlap_tokens,
                                tokenizer=lambda text: tokenizer.encode(text, add_special_tokens=False))
    with tempfile.TemporaryDirectory(prefix="peers-llamaindex-") as tmp:
        collection = chromadb.PersistentClient(path=tmp).get_or_create_collection("peers")
        vector_store = ChromaVectorStore(chroma_collection=collection)
        pipeline = IngestionPipeline(transformations=[splitter, embed], vector_store=vector_store,
                                     docstore=SimpleDocumentStore(), docstore_strategy=DocstoreStrategy.UPSERTS)
        vectors = VectorStoreIndex.from_vector_store(vector_store, embed_model=embed).as_retriever(
            similarity_top_k=plan.candidates)

        def retriever() -> QueryFusionRetriever:
            bm25 = BM25Retriever.from_defaults(nodes=vector_store.get_nodes(None), similarity_top_k=plan.candidates)
            return QueryFusionRetriever([vectors, bm25], mode="reciprocal_rerank", similarity_top_k=plan.depth,
                                        num_queries=1)

        def searcher(fusion: QueryFusionRetriever):
            return lambda question: [(n.node.ref_doc_id, n.node.get_content()) for n in fusion.retrieve(question)]

        with Clock() as ingest:
            # in batches: one run over the whole corpus hands Chroma more nodes in one add than its max batch
            # size (9,872 > 5,461 for SciFact: chromadb InternalError), and the pipeline does not split them
            docs = documents(plan.documents)
            for start in range(0, len(docs), 1000):
                pipeline.run(documents=docs[start:start + 1000], show_progress=True)
            fusion = retriever()
        chunks = collection.count()
        rankings, latencies = run_queries(searcher(fusion), plan.queries)

        with Clock() as update:
            pipeline.run(documents=documents(plan.changed))
            for ref_doc_id in plan.deleted:
                pipeline.vector_store.delete(ref_doc_id)
                pipeline.docstore.delete_document(ref_doc_id)
            fusion = retriever()
        probes = run_probes(searcher(fusion), plan.probes, plan.probe_k)
        rows = collection.get(include=["documents", "metadatas"])
        store = [(meta["ref_doc_id"], text) for meta, text in zip(rows["metadatas"], rows["documents"])]
        stored_documents = len(pipeline.docstore.docs)
    write(out, system="LlamaIndex", packages=PACKAGES,
          chunking=(f"SentenceSplitter(chunk_size={plan.chunk_tokens}, chunk_overlap={plan.overlap_tokens}), "
                    "tokens counted by the MiniLM tokenizer"),
          retrieval=(f"Chroma + BM25Retriever (bm25s, English stemmer), QueryFusionRetriever reciprocal_rerank, "
                     f"{plan.candidates} per side"),
          ingest=ingest, update=update, chunks=chunks, rankings=rankings, latencies_ms=latencies, probes=probes,
          store=store,
          notes=[f"store listed from the Chroma collection (BM25 is rebuilt from it); the pipeline's docstore "
                 f"holds {stored_documents} source documents after the update"])


if __name__ == "__main__":
    main()
