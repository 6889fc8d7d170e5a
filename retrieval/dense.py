"""Dense retrieval: one Chroma collection per index generation, cosine space, vectors we compute.

Chroma stores the unit-length vectors and the chunk metadata (never the text: the ledger holds
that); it is given no embedding function, so it never tries to fetch one. The embedding model's
name and dimension are written into the collection's metadata and checked on every open.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.bm25 import Filters


class EmbeddingModelMismatch(RuntimeError):
    pass


def chroma_client(*, path: Path | None = None, host: str | None = None, port: int = 8000, ssl: bool = False) -> Any:
    """An embedded PersistentClient under `path`, or an HttpClient for a Chroma server at host:port."""
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    chroma_settings = ChromaSettings(anonymized_telemetry=False, allow_reset=False)
    if host:
        return chromadb.HttpClient(host=host, port=port, ssl=ssl, settings=chroma_settings)
    assert path is not None
    path.mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(path), settings=chroma_settings)


def chroma_where(filters: Filters | None) -> dict | None:
    """Equality filters (a list means any of) as a Chroma `where` clause."""
    if not filters:
        return None
    clauses = [{field: {"$in": list(values)}} for field, values in filters.items()]
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


class DenseIndex:
    """A generation's Chroma collection. Scores are cosine similarities (1 - cosine distance)."""

    def __init__(self, client: Any, name: str, *, embedding_model: str, dimension: int, create: bool = False) -> None:
        self.name = name
        self.embedding_model = embedding_model
        self.dimension = dimension
        if create:
            self.collection = client.get_or_create_collection(
                name=name,
                embedding_function=None,
                configuration={"hnsw": {"space": "cosine"}},
                metadata={"embedding_model": embedding_model, "dimension": dimension},
            )
        else:
            self.collection = client.get_collection(name=name, embedding_function=None)
        stored = self.collection.metadata or {}
        if stored.get("embedding_model") != embedding_model or int(stored.get("dimension", -1)) != dimension:
            raise EmbeddingModelMismatch(
                f"collection {name!r} was built with embedding model {stored.get('embedding_model')!r} "
                f"({stored.get('dimension')}-d), but the service is configured with {embedding_model!r} "
                f"({dimension}-d); run a full refresh (rag refresh) to rebuild the index with the new model"
            )

    def count(self) -> int:
        return self.collection.count()

    def upsert(self, ids: Sequence[str], vectors: np.ndarray, metadatas: Sequence[Mapping[str, Any]],
               batch_size: int = 2000) -> None:
        assert vectors.shape == (len(ids), self.dimension), (vectors.shape, len(ids), self.dimension)
        for start in range(0, len(ids), batch_size):
            stop = start + batch_size
            self.collection.upsert(ids=list(ids[start:stop]), embeddings=vectors[start:stop],
                                   metadatas=[dict(m) for m in metadatas[start:stop]])

    def delete(self, ids: Sequence[str], batch_size: int = 2000) -> None:
        for start in range(0, len(ids), batch_size):
            self.collection.delete(ids=list(ids[start:start + batch_size]))

    def iter_ids(self, batch_size: int = 5000) -> Iterator[str]:
        offset = 0
        while True:
            page = self.collection.get(include=[], limit=batch_size, offset=offset)
            if not page["ids"]:
                return
            yield from page["ids"]
            offset += len(page["ids"])

    def search(self, vector: np.ndarray, k: int, filters: Filters | None = None) -> list[tuple[str, float]]:
        if k <= 0:
            return []
        result = self.collection.query(
            query_embeddings=vector.reshape(1, -1), n_results=k, where=chroma_where(filters), include=["distances"]
        )
        return [(cid, 1.0 - float(d)) for cid, d in zip(result["ids"][0], result["distances"][0])]
