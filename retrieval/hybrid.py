"""Hybrid retrieval: BM25 and dense candidates for the same question, fused into one ranking.

Like a Haystack pipeline of two retrievers and a joiner, but as one small class: it validates its
configuration once, and ``search`` does one thing. It is immutable; when the index changes (a BM25
rebuild, a generation switch) the service builds a new one and swaps the reference.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from retrieval.acl import Groups
from retrieval.bm25 import FILTER_FIELDS, BM25Index, Filters
from retrieval.dense import DenseIndex
from retrieval.fusion import FusionMethod, fuse

Method = Literal["hybrid", "bm25", "dense"]


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    score: float
    bm25_score: float | None = None
    dense_score: float | None = None


class QueryVectorCache:
    """Thread-safe LRU of query vectors keyed by the exact question text (one embedder per cache)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"cache size must be positive, got {size}")
        self.size = size
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, question: str) -> np.ndarray | None:
        with self._lock:
            vector = self._vectors.get(question)
            if vector is not None:
                self._vectors.move_to_end(question)
            return vector

    def put(self, question: str, vector: np.ndarray) -> None:
        vector = np.array(vector, copy=True)  # a private, read-only copy: callers cannot alter it
        vector.setflags(write=False)
        with self._lock:
            self._vectors[question] = vector
            self._vectors.move_to_end(question)
            while len(self._vectors) > self.size:
                self._vectors.popitem(last=False)


class QueryEmbedder(Protocol):
    """What retrieval needs of an embedder (ingestion.embedder.Embedder is one): questions to unit vectors."""

    dimension: int

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray: ...


class HybridRetriever:
    def __init__(self, *, embedder: QueryEmbedder, dense: DenseIndex, bm25: BM25Index, fusion: FusionMethod = "convex",
                 alpha: float = 0.5, rrf_k: int = 60, candidates: int = 50,
                 query_cache: QueryVectorCache | None = None) -> None:
        if fusion not in ("convex", "rrf"):
            raise ValueError(f"fusion must be 'convex' or 'rrf', got {fusion!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if candidates < 1 or rrf_k < 1:
            raise ValueError("candidates and rrf_k must be positive")
        if dense.dimension != embedder.dimension:
            raise ValueError(f"index is {dense.dimension}-d but the embedder gives {embedder.dimension}-d vectors")
        self.embedder = embedder
        self.dense = dense
        self.bm25 = bm25
        self.fusion = fusion
        self.alpha = alpha
        self.rrf_k = rrf_k
        self.candidates = candidates
        self.query_cache = query_cache

    def embed_query(self, question: str) -> np.ndarray:
        """The question's vector, (dimension,), from the cache when it was asked before."""
        cached = self.query_cache.get(question) if self.query_cache is not None else None
        if cached is not None:
            return cached
        vector: np.ndarray = self.embedder.embed_queries([question])[0]
        if self.query_cache is not None:
            self.query_cache.put(question, vector)
        return vector

    def search(self, question: str, top_k: int, *, filters: Filters | None = None, alpha: float | None = None,
               fusion: FusionMethod | None = None, method: Method = "hybrid",
               query_vector: np.ndarray | None = None, groups: Groups = None) -> list[Hit]:
        """The best `top_k` chunks for `question`, best first. Filters and the caller's `groups` (None: sees
        every document; retrieval/acl.py) apply inside both retrievers, before fusion."""
        _check_filters(filters)
        depth = max(self.candidates, top_k)
        lexical = self.bm25.search(question, depth, filters, groups) if method in ("hybrid", "bm25") else []
        dense: list[tuple[str, float]] = []
        if method in ("hybrid", "dense"):
            vector = query_vector if query_vector is not None else self.embed_query(question)
            dense = self.dense.search(vector, depth, filters, groups)
        if method == "bm25":
            return [Hit(cid, s, bm25_score=s) for cid, s in lexical[:top_k]]
        if method == "dense":
            return [Hit(cid, s, dense_score=s) for cid, s in dense[:top_k]]
        fused = fuse(lexical, dense, fusion=fusion or self.fusion, alpha=self.alpha if alpha is None else alpha,
                     rrf_k=self.rrf_k)
        lex, den = dict(lexical), dict(dense)
        return [Hit(cid, s, bm25_score=lex.get(cid), dense_score=den.get(cid)) for cid, s in fused[:top_k]]


def _check_filters(filters: Filters | None) -> None:
    for field, values in (filters or {}).items():
        if field not in FILTER_FIELDS:
            raise ValueError(f"cannot filter on {field!r}; filterable fields: {', '.join(FILTER_FIELDS)}")
        if isinstance(values, str) or not values:
            raise ValueError(f"filter {field!r} needs a non-empty list of values")
