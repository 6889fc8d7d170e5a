"""Document access control inside the indexes: real bm25s, real embedded Chroma, the bundled MiniLM.

Both retrievers filter by the caller's groups before fusion, so a caller's top k is the best k of what
it may see. The property test draws random corpora with random ACLs, random callers and queries.
"""

import itertools
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrieval.acl import bm25_acl, chroma_acl, chroma_acl_where, normalize_acl, visible
from retrieval.bm25 import BM25Index
from retrieval.dense import DenseIndex, chroma_client
from retrieval.hybrid import HybridRetriever

GROUPS = ("red", "green", "blue", "gold")
WORDS = ("amber basalt cedar delta ember fjord glacier harbor iris juniper kestrel lagoon meadow nectar orchid "
         "prairie quartz raven sierra tundra umber valley willow yarrow zephyr").split()
POOL = 40  # texts a corpus is drawn from (embedded once)


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def pool(embedder):
    """(texts, their passage vectors, questions, their query vectors), embedded once for every example."""
    rng = random.Random(13)
    texts = [f"Note {i}: the {_sentence(rng, 12)}." for i in range(POOL)]
    questions = [_sentence(rng, rng.randint(1, 4)) for _ in range(30)]
    return texts, embedder.embed_passages(texts), questions, embedder.embed_queries(questions)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    return chroma_client(path=tmp_path_factory.mktemp("acl-chroma"))


class Corpus:
    """One chunk per document: ids, texts, acls in BM25 and Chroma, and a retriever over both."""

    names = itertools.count()

    def __init__(self, client, embedder, texts, vectors, acls, candidates: int = 50) -> None:
        self.ids = [f"c{i:03d}" for i in range(len(texts))]
        self.acl = dict(zip(self.ids, acls))
        self.bm25 = BM25Index.build(self.ids, texts, {"document_id": self.ids}, acl=[bm25_acl(a) for a in acls])
        self.dense = DenseIndex(client, f"acl-{next(self.names)}", embedding_model="bundled",
                                dimension=vectors.shape[1], create=True)
        self.dense.upsert(self.ids, vectors, [{"document_id": i, "acl": chroma_acl(a)} for i, a in self.acl.items()])
        self.retriever = HybridRetriever(embedder=embedder, dense=self.dense, bm25=self.bm25, candidates=candidates)
        self.client = client

    def drop(self) -> None:
        self.client.delete_collection(self.dense.name)


def test_acls_are_validated_and_normalized():
    assert normalize_acl(["b", "a", "b"]) == ("a", "b") and normalize_acl([]) == ()
    with pytest.raises(ValueError, match=r"acl\[1\]: group 'has space' is invalid"):
        normalize_acl(["ok", "has space"])
    with pytest.raises(ValueError, match=r"acl\[0\]: '\*' is a key's group, not a document's"):
        normalize_acl(["*"])
    assert visible((), frozenset()) and visible(("a",), None) and visible(("a", "b"), frozenset({"b"}))
    assert not visible(("a",), frozenset()) and not visible(("a",), frozenset({"b"}))


def test_chroma_filters_restricted_chunks_and_keeps_pre_acl_chunks_public(client):
    """A chunk written before ACLs existed has no acl key: every caller still sees it (it is public in
    the ledger too). Restricted chunks only reach callers holding one of their groups."""
    dense = DenseIndex(client, "acl-old-and-new", embedding_model="m", dimension=2, create=True)
    dense.upsert(["old", "public", "red", "red-blue"], np.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.7, 0.3]]),
                 [{"document_id": "old"}, {"acl": chroma_acl(())}, {"acl": chroma_acl(("red",))},
                  {"acl": chroma_acl(("blue", "red"))}])
    ids = lambda groups: sorted(cid for cid, _ in dense.search(np.array([1.0, 0.0]), 10, groups=groups))  # noqa: E731
    assert ids(None) == ["old", "public", "red", "red-blue"]
    assert ids(frozenset()) == ["old", "public"]
    assert ids(frozenset({"red"})) == ["old", "public", "red", "red-blue"]
    assert ids(frozenset({"blue", "gold"})) == ["old", "public", "red-blue"]
    assert ids(frozenset({"gold"})) == ["old", "public"]
    assert chroma_acl_where(None) is None
    # an acl change of a stored vector: Chroma merges metadata, so the list is always written whole
    dense.update_metadata(["red-blue"], [{"acl": chroma_acl(())}])
    assert ids(frozenset()) == ["old", "public", "red-blue"]


def test_bm25_mask_and_a_build_saved_before_acls_loads_as_public(tmp_path):
    index = BM25Index.build(["a", "b", "c"], ["meadow raven", "meadow raven", "meadow"], {},
                            acl=["", "red", "blue,red"])
    hits = lambda groups: sorted(cid for cid, _ in index.search("meadow", 5, groups=groups))  # noqa: E731
    assert hits(None) == ["a", "b", "c"] and hits(frozenset()) == ["a"]
    assert hits(frozenset({"blue"})) == ["a", "c"] and hits(frozenset({"red", "gold"})) == ["a", "b", "c"]
    assert [cid for cid, _ in index.search("raven", 5, {"document_id": ["b"]}, frozenset({"blue"}))] == []
    index.save(tmp_path)
    assert BM25Index.load(tmp_path).acl.tolist() == ["", "red", "blue,red"]
    build = tmp_path / (tmp_path / "CURRENT").read_text()
    (build / "col_acl.npy").unlink()  # as written before ACLs existed
    assert sorted(cid for cid, _ in BM25Index.load(tmp_path).search("meadow", 5, groups=frozenset())) == ["a", "b", "c"]


def test_a_caller_who_sees_few_documents_still_gets_top_k(client, embedder, pool):
    """30 chunks the caller may not see rank above its 6; with only 5 candidates per retriever, filtering
    after fusion would leave nothing. Filtered inside both retrievers, the caller gets 5 of its 6."""
    texts, _, _, _ = pool
    strong = [f"glacier raven survey {i}: glacier raven glacier raven readings" for i in range(30)]
    weak = [f"field log {i}: one glacier note among other {WORDS[i]} matters" for i in range(6)]
    acls = [("red",)] * 30 + [("gold",)] * 6
    corpus = Corpus(client, embedder, strong + weak, embedder.embed_passages(strong + weak), acls, candidates=5)
    try:
        for method in ("hybrid", "bm25", "dense"):
            hits = corpus.retriever.search("glacier raven", 5, groups=frozenset({"gold"}), method=method)
            assert len(hits) == 5, method
            assert all(corpus.acl[h.chunk_id] == ("gold",) for h in hits), method
            everyone = corpus.retriever.search("glacier raven", 5, method=method)
            assert all(corpus.acl[h.chunk_id] == ("red",) for h in everyone), method  # what post-filtering would get
    finally:
        corpus.drop()


acl_strategy = st.lists(st.sampled_from(GROUPS), max_size=3).map(tuple)
caller_strategy = st.one_of(st.none(), st.frozensets(st.sampled_from(GROUPS + ("other",)), max_size=3))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_no_hit_outside_the_callers_groups_and_top_k_filled(client, embedder, pool, data):
    """Random corpora, ACLs, callers, queries: every hit of every method is visible to the caller, and
    each retriever returns exactly the visible part of its unrestricted ranking, cut to k."""
    texts, vectors, questions, query_vectors = pool
    chosen = data.draw(st.lists(st.integers(0, POOL - 1), min_size=1, max_size=20, unique=True), label="documents")
    acls = [normalize_acl(data.draw(acl_strategy, label=f"acl {i}")) for i in chosen]
    corpus = Corpus(client, embedder, [texts[i] for i in chosen], vectors[chosen], acls,
                    candidates=data.draw(st.integers(1, 10), label="candidates"))
    try:
        for _ in range(12):
            groups = data.draw(caller_strategy, label="caller")
            q = data.draw(st.integers(0, len(questions) - 1), label="question")
            k = data.draw(st.integers(1, 8), label="top_k")
            seen = {cid for cid in corpus.ids if visible(corpus.acl[cid], groups)}
            for method in ("hybrid", "bm25", "dense"):
                hits = corpus.retriever.search(questions[q], k, groups=groups, method=method,
                                               query_vector=query_vectors[q])
                assert {h.chunk_id for h in hits} <= seen, (method, groups)
            lexical = corpus.bm25.search(questions[q], k, groups=groups)
            all_lexical = [(cid, s) for cid, s in corpus.bm25.search(questions[q], POOL) if cid in seen][:k]
            assert [round(s, 5) for _, s in lexical] == [round(s, 5) for _, s in all_lexical]
            nearest = corpus.dense.search(query_vectors[q], k, groups=groups)
            assert len(nearest) == min(k, len(seen))
            all_nearest = [(cid, s) for cid, s in corpus.dense.search(query_vectors[q], POOL) if cid in seen][:k]
            assert np.allclose([s for _, s in nearest], [s for _, s in all_nearest], atol=1e-5)
    finally:
        corpus.drop()
