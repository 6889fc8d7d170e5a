"""DenseIndex against a real embedded Chroma: writes, cosine search, filters, the model check on open,
and dropping a generation's collection with the disk it used."""

import numpy as np
import pytest

from retrieval.dense import DenseIndex, EmbeddingModelMismatch, chroma_client, chroma_where, drop_collection

MODEL = "test-model"
VECTORS = {"a": [1.0, 0.0, 0.0, 0.0], "b": [0.6, 0.8, 0.0, 0.0], "c": [0.0, 0.0, 1.0, 0.0]}
META = {"a": {"document_id": "d1", "lang": "en"}, "b": {"document_id": "d2", "lang": "de"},
        "c": {"document_id": "d1", "lang": "de"}}


@pytest.fixture
def client(tmp_path):
    return chroma_client(path=tmp_path / "chroma")


def filled(client, name="chunks_g1") -> DenseIndex:
    index = DenseIndex(client, name, embedding_model=MODEL, dimension=4, create=True)
    ids = list(VECTORS)
    index.upsert(ids, np.array([VECTORS[i] for i in ids], dtype=np.float32), [META[i] for i in ids], batch_size=2)
    return index


def test_upsert_search_delete_and_count(client):
    """Scores are cosine similarities, best first; upsert replaces by id; deleted ids are gone."""
    index = filled(client)
    assert index.count() == 3 and sorted(index.iter_ids(batch_size=2)) == ["a", "b", "c"]
    query = np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)
    assert [(cid, round(score, 4)) for cid, score in index.search(query, 3)] == [("a", 1.0), ("b", 0.6), ("c", 0.0)]
    assert index.search(query, 0) == []
    index.upsert(["c"], np.array([[0.8, 0.6, 0.0, 0.0]], dtype=np.float32), [META["c"]])  # c moves next to a
    assert [cid for cid, _ in index.search(query, 2)] == ["a", "c"] and index.count() == 3
    index.delete(["a", "b"])
    assert index.count() == 1 and [cid for cid, _ in index.search(query, 3)] == ["c"]


def test_filters_keep_only_matching_metadata(client):
    """One field: any of its values; several fields: all of them."""
    assert chroma_where({"lang": ["en"]}) == {"lang": {"$in": ["en"]}} and chroma_where({}) is None
    index = filled(client)
    query = np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)
    ids = lambda filters: [cid for cid, _ in index.search(query, 3, filters)]  # noqa: E731
    assert ids({"lang": ["de"]}) == ["b", "c"]
    assert ids({"document_id": ["d1", "d2"]}) == ["a", "b", "c"]
    assert ids({"document_id": ["d1"], "lang": ["de"]}) == ["c"]


@pytest.mark.parametrize(("model", "dimension"), [("other-model", 4), (MODEL, 8)])
def test_opening_with_another_model_or_dimension_is_refused(client, model, dimension):
    """The collection records its embedding model and dimension; a service configured otherwise must rebuild."""
    filled(client)
    assert DenseIndex(client, "chunks_g1", embedding_model=MODEL, dimension=4).count() == 3
    expected = rf"'test-model' \(4-d\).*{model!r} \({dimension}-d\).*rag refresh"
    with pytest.raises(EmbeddingModelMismatch, match=expected):
        DenseIndex(client, "chunks_g1", embedding_model=model, dimension=dimension)


def test_drop_collection_deletes_it_and_reclaims_its_folder(client, tmp_path):
    """Embedded Chroma leaves a deleted collection's segment folder behind; drop_collection removes it."""
    path = tmp_path / "chroma"
    filled(client, "chunks_g1")
    filled(client, "chunks_g2")
    folders = lambda: {p.name for p in path.iterdir() if p.is_dir()}  # noqa: E731
    before = folders()
    drop_collection(client, "chunks_g1", path)
    assert {c.name for c in client.list_collections()} == {"chunks_g2"}
    assert len(folders()) == len(before) - 1 and folders() < before
    assert DenseIndex(client, "chunks_g2", embedding_model=MODEL, dimension=4).count() == 3  # the other one is intact
    drop_collection(client, "chunks_g1", path)  # already gone: nothing to do
