"""Dense retrieval: one Chroma collection per index generation, cosine space, vectors we compute.

Chroma stores the unit-length vectors and the chunk metadata (never the text: the ledger holds
that); it is given no embedding function, so it never tries to fetch one. The embedding model's
name and dimension are written into the collection's metadata and checked on every open.
"""

from __future__ import annotations

import logging
import re
import shutil
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np

from retrieval.acl import Groups, chroma_acl_where
from retrieval.bm25 import Filters


log = logging.getLogger(__name__)
_SEGMENT_DIR = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class EmbeddingModelMismatch(RuntimeError):
    pass


class ChromaUnavailable(ConnectionError):
    """The configured Chroma server does not answer."""


def _unavailable(host: str, port: int, ssl: bool, exc: BaseException) -> ChromaUnavailable:
    return ChromaUnavailable(
        f"Chroma server at {'https' if ssl else 'http'}://{host}:{port} (RAG_CHROMA_HOST, RAG_CHROMA_PORT) "
        f"does not answer ({type(exc).__name__}); start it (chroma run --path DIR --port {port}) or "
        "unset RAG_CHROMA_HOST to use embedded Chroma under the data directory")


@contextmanager
def server_errors(client: Any) -> Iterator[None]:
    """A Chroma server that stops answering mid-run raises ChromaUnavailable naming the settings, not the
    HTTP client's connection error (embedded Chroma raises none of these)."""
    import httpx

    try:
        yield
    except httpx.TransportError as exc:  # refused, reset, timed out
        settings = client.get_settings()
        raise _unavailable(str(settings.chroma_server_host), int(settings.chroma_server_http_port or 0),
                           bool(settings.chroma_server_ssl_enabled), exc) from exc


def chroma_client(*, path: Path | None = None, host: str | None = None, port: int = 8000, ssl: bool = False,
                  timeout_s: float = 60.0) -> Any:
    """An embedded PersistentClient under `path`, or an HttpClient for a Chroma server at host:port
    (ChromaUnavailable, naming the settings, when it does not answer; each request bounded by `timeout_s`)."""
    import chromadb
    import httpx
    from chromadb.config import Settings as ChromaSettings

    chroma_settings = ChromaSettings(anonymized_telemetry=False, allow_reset=False)
    if host:
        try:
            client = chromadb.HttpClient(host=host, port=port, ssl=ssl, settings=chroma_settings)
            # chromadb 1.5.9 builds its httpx client with timeout=None: a server that stops answering (paused,
            # partitioned) would hold a query or a job forever. Bounded, it is a TransportError (ChromaUnavailable).
            session = getattr(getattr(client, "_server", None), "_session", None)
            if isinstance(session, httpx.Client):
                session.timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
            client.heartbeat()
            return client
        except Exception as exc:  # chromadb raises ValueError / httpx errors, depending on where it fails
            raise _unavailable(host, port, ssl, exc) from None
    assert path is not None
    path.mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(path), settings=chroma_settings)


def drop_collection(client: Any, name: str, path: Path | None = None) -> None:
    """Delete a collection if it exists; with embedded Chroma (`path`), also the files it leaves behind."""
    from chromadb.errors import NotFoundError

    try:
        with server_errors(client):
            client.delete_collection(name)
    except NotFoundError:
        pass
    if path is not None:
        reclaim_disk(path)


def reclaim_disk(path: Path) -> list[str]:
    """Remove segment folders of deleted collections: embedded Chroma (1.x) deletes a collection's rows
    but leaves its HNSW folder, named by the segment id, behind. Returns the folders removed."""
    try:
        db = sqlite3.connect(f"file:{path / 'chroma.sqlite3'}?mode=ro", uri=True)
        try:
            known = {row[0] for row in db.execute("SELECT id FROM segments")}
        finally:
            db.close()
    except sqlite3.Error as exc:
        log.warning("cannot read Chroma's segments in %s (%s); no disk reclaimed", path, exc)
        return []
    removed = []
    for entry in path.iterdir():
        if entry.is_dir() and _SEGMENT_DIR.match(entry.name) and entry.name not in known:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


def chroma_where(filters: Filters | None, groups: Groups = None) -> dict[str, Any] | None:
    """Equality filters (a list means any of) and what `groups` may see (retrieval/acl.py) as a Chroma
    `where` clause; None when nothing is filtered."""
    clauses = [{field: {"$in": list(values)}} for field, values in (filters or {}).items()]
    visible = chroma_acl_where(groups)
    if visible is not None:
        clauses.append(visible)
    if not clauses:
        return None
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


class DenseIndex:
    """A generation's Chroma collection. Scores are cosine similarities (1 - cosine distance)."""

    def __init__(self, client: Any, name: str, *, embedding_model: str, dimension: int, create: bool = False) -> None:
        self.name = name
        self.embedding_model = embedding_model
        self.dimension = dimension
        self._client = client
        with server_errors(client):
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
                f"({dimension}-d) by RAG_EMBEDDING_MODEL and RAG_EMBEDDING_BACKEND; run a full refresh "
                "(rag refresh) to rebuild the index with the new model, or configure the one it was built with"
            )

    def count(self) -> int:
        with server_errors(self._client):
            return cast(int, self.collection.count())

    def upsert(self, ids: Sequence[str], vectors: np.ndarray, metadatas: Sequence[Mapping[str, Any]],
               batch_size: int = 2000) -> None:
        assert vectors.shape == (len(ids), self.dimension), (vectors.shape, len(ids), self.dimension)
        with server_errors(self._client):
            for start in range(0, len(ids), batch_size):
                stop = start + batch_size
                self.collection.upsert(ids=list(ids[start:stop]), embeddings=vectors[start:stop],
                                       metadatas=[dict(m) for m in metadatas[start:stop]])

    def delete(self, ids: Sequence[str], batch_size: int = 2000) -> None:
        with server_errors(self._client):
            for start in range(0, len(ids), batch_size):
                self.collection.delete(ids=list(ids[start:start + batch_size]))

    def iter_ids(self, batch_size: int = 5000) -> Iterator[str]:
        offset = 0
        while True:
            with server_errors(self._client):
                page = self.collection.get(include=[], limit=batch_size, offset=offset)
            if not page["ids"]:
                return
            yield from page["ids"]
            offset += len(page["ids"])

    def update_metadata(self, ids: Sequence[str], metadatas: Sequence[Mapping[str, Any]],
                        batch_size: int = 2000) -> None:
        """New metadata for vectors already stored (Chroma merges it key by key into what is there)."""
        with server_errors(self._client):
            for start in range(0, len(ids), batch_size):
                stop = start + batch_size
                self.collection.update(ids=list(ids[start:stop]), metadatas=[dict(m) for m in metadatas[start:stop]])

    def search(self, vector: np.ndarray, k: int, filters: Filters | None = None,
               groups: Groups = None) -> list[tuple[str, float]]:
        """The `k` nearest chunks passing `filters` that `groups` may see: Chroma filters before its
        nearest-neighbour search, so k is filled from visible chunks."""
        if k <= 0:
            return []
        with server_errors(self._client):
            result = self.collection.query(query_embeddings=vector.reshape(1, -1), n_results=k,
                                           where=chroma_where(filters, groups), include=["distances"])
        return [(cid, 1.0 - float(d)) for cid, d in zip(result["ids"][0], result["distances"][0])]
