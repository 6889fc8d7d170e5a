"""Static breakpoint vectors: no encoder pass, yet the topic boundary is still where the chunker cuts."""

import numpy as np
import pytest

from ingestion.chunker import SemanticChunker
from ingestion.documents import Document
from tests.ingestion.test_chunker import BEES, RATES


def test_static_vectors_are_unit_rows_independent_of_the_batch(embedder):
    vectors = embedder.static_sentence_vectors(BEES + RATES)
    assert vectors.shape == (16, embedder.dimension)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(embedder.static_sentence_vectors(RATES[:3]), vectors[8:11])


def test_static_breakpoints_split_at_the_topic_shift_without_encoding(embedder, monkeypatch):
    monkeypatch.setattr(embedder, "embed_sentences", lambda texts: pytest.fail("static needs no encoder pass"))
    document = Document("topics", " ".join(BEES) + "\n\n" + " ".join(RATES), title="Notes")
    chunks = SemanticChunker(embedder, max_tokens=200, overlap_tokens=50, breakpoint_vectors="static").chunk(document)
    first = chunks[0].text
    assert all(sentence in first for sentence in BEES) and not any(sentence in first for sentence in RATES)
    assert all(sentence in chunks[1].text for sentence in RATES)


def test_unknown_breakpoint_vectors_are_refused(embedder):
    with pytest.raises(ValueError, match="breakpoint_vectors"):
        SemanticChunker(embedder, breakpoint_vectors="tfidf")
