"""The bm25s index: agreement with plain bm25s, filters, atomic save and load."""

import bm25s
import Stemmer

from retrieval.bm25 import BM25Index

TEXTS = [
    "The cat sat on the mat",
    "Dogs are running in the park",
    "A cat and a dog played together",
    "Quantum physics of running cats",
    "Stock markets fell sharply on Monday",
]
IDS = [f"c{i}" for i in range(len(TEXTS))]
DOCS = ["d0", "d1", "d0", "d2", "d2"]


def test_scores_match_reference_bm25s():
    index = BM25Index.build(IDS, TEXTS, {"document_id": DOCS})
    stemmer = Stemmer.Stemmer("english")
    reference = bm25s.BM25()
    reference.index(bm25s.tokenize(TEXTS, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
    docs, scores = reference.retrieve(bm25s.tokenize(["running cats"], stopwords="en", stemmer=stemmer,
                                                     show_progress=False), k=3, show_progress=False)
    ours = index.search("running cats", 3)
    assert [s for _, s in ours] == [float(s) for s in scores[0]]
    assert {cid for cid, _ in ours} == {IDS[i] for i in docs[0]}


def test_filters_and_no_match():
    index = BM25Index.build(IDS, TEXTS, {"document_id": DOCS})
    assert {cid for cid, _ in index.search("cat", 10, {"document_id": ["d0"]})} == {"c0", "c2"}
    assert index.search("cat", 10, {"document_id": ["d1"]}) == []
    assert index.search("zebra xylophone", 10) == []


def test_save_load_roundtrip_and_pointer_switch(tmp_path):
    first = BM25Index.build(IDS, TEXTS, {"document_id": DOCS})
    first.save(tmp_path)
    loaded = BM25Index.load(tmp_path)
    assert loaded.search("stock markets", 2) == first.search("stock markets", 2)
    second = BM25Index.build(IDS[:2], TEXTS[:2], {"document_id": DOCS[:2]})
    second.save(tmp_path)
    assert len(BM25Index.load(tmp_path)) == 2
    assert BM25Index.load(tmp_path / "missing") is None


def test_idf_counts_chunks_holding_each_stem_and_survives_save_and_load(tmp_path):
    import math

    index = BM25Index.build(IDS, TEXTS, {"document_id": DOCS})
    n = len(TEXTS)

    def lucene(df):
        return math.log(1 + (n - df + 0.5) / (df + 0.5))

    # "cat" in 3 chunks (cat, cat, cats), "stock" in 1, "zebra" in none
    assert index.idf(["cat", "stock", "zebra"]) == [lucene(3), lucene(1), lucene(0)]
    index.save(tmp_path)
    assert BM25Index.load(tmp_path).idf(["cat", "stock", "zebra"]) == [lucene(3), lucene(1), lucene(0)]
