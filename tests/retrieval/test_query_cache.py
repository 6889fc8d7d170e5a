"""The query-vector LRU: hits skip the embedder, the oldest entry goes first, cached vectors are read-only."""

import numpy as np
import pytest

from retrieval.hybrid import HybridRetriever, QueryVectorCache


class CountingEmbedder:
    dimension = 3

    def __init__(self):
        self.calls = 0

    def embed_queries(self, texts):
        self.calls += 1
        return np.ones((len(texts), 3), dtype=np.float32) / np.sqrt(3)


class FakeDense:
    dimension = 3


def test_lru_evicts_least_recently_used():
    cache = QueryVectorCache(2)
    cache.put("a", np.zeros(3))
    cache.put("b", np.ones(3))
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("c", np.ones(3))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    with pytest.raises(ValueError):
        cache.get("a")[0] = 1.0  # read-only: a caller cannot corrupt the cache
    with pytest.raises(ValueError):
        QueryVectorCache(0)


def test_retriever_embeds_a_repeated_question_once():
    embedder = CountingEmbedder()
    retriever = HybridRetriever(embedder=embedder, dense=FakeDense(), bm25=None, query_cache=QueryVectorCache(8))
    first = retriever.embed_query("what is bm25?")
    again = retriever.embed_query("what is bm25?")
    assert embedder.calls == 1 and np.array_equal(first, again)
    retriever.embed_query("What is bm25?")  # keyed by the exact text
    assert embedder.calls == 2
