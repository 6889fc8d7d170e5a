"""The embedder on ONNX Runtime (fp32, int8) and OpenVINO: the bundled MiniLM exported once into a cache
folder and reused, vectors of unit length that agree with torch's, and clear errors for a bad setting, a
missing package, a failed export, and an index built with vectors of another backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ingestion import encoder_backends
from ingestion.embedder import Embedder
from ingestion.model_files import ModelUnavailable

MODEL = "bundled:all-MiniLM-L6-v2"
TEXTS = [
    "Vitamin D deficiency is associated with an increased risk of respiratory infections.",
    "Aspirin",
    "The tumour suppressor p53 regulates the cell cycle, apoptosis and DNA repair in response to genotoxic stress; "
    "mutations in TP53 are found in about half of all human cancers, and mice lacking it develop tumours early.",
    "Antibiotic resistance spreads between bacteria by horizontal gene transfer.",
    "Moderate exercise lowers blood pressure in adults with hypertension. " * 12,  # past 256 tokens: truncated
    "How do chunk ids stay stable when a document is ingested again?",
]
# cosine to torch's vector, per text: fp32 graphs reproduce it; int8 moves it a little (measured min ~0.986)
AGREEMENT = {"onnx": 0.9999, "openvino": 0.999, "onnx-int8": 0.97}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def loaded(cache) -> dict[str, Embedder]:
    """One embedder per backend, all exporting into the same cache folder."""
    return {backend: Embedder(MODEL, backend=backend, cache_dir=cache) for backend in AGREEMENT}


@pytest.mark.parametrize("backend", list(AGREEMENT))
def test_backend_vectors_are_unit_length_and_agree_with_torch(embedder, loaded, backend):
    model = loaded[backend]
    assert model.exported_now and (model.exported_to / "export.json").is_file()
    for encode in ("embed_passages", "embed_queries"):
        ours, reference = getattr(model, encode)(TEXTS), getattr(embedder, encode)(TEXTS)
        assert ours.shape == reference.shape == (len(TEXTS), 384) and ours.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
        cosine = (ours * reference).sum(axis=1)
        assert cosine.min() >= AGREEMENT[backend], (backend, cosine)
    if backend == "onnx-int8":
        assert 0.985 <= cosine.mean() < 0.99999  # quantised: close, but not torch's vectors
    # the same tokenizer (and so the same chunks) whatever runs the transformer
    assert model.max_passage_tokens == embedder.max_passage_tokens


def test_vector_space_names_int8_apart(loaded):
    assert loaded["onnx"].vector_space == loaded["openvino"].vector_space == MODEL
    assert loaded["onnx-int8"].vector_space == f"{MODEL}+onnx-int8"


def test_export_is_cached_and_reused(cache, loaded, monkeypatch):
    """A second load finds the exported files and does not export again; no temporary folder is left."""
    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(encoder_backends, "_write", no_export)
    again = Embedder(MODEL, backend="onnx-int8", cache_dir=cache)
    assert not again.exported_now and again.exported_to == loaded["onnx-int8"].exported_to
    np.testing.assert_array_equal(again.embed_passages(TEXTS[:2]), loaded["onnx-int8"].embed_passages(TEXTS[:2]))
    folders = {p.name for p in again.exported_to.parent.iterdir()}
    assert folders == {"onnx", "openvino", f"onnx-int8-{encoder_backends.quantization_config()['preset']}"}


def test_failed_export_is_one_line_naming_the_setting(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(encoder_backends, "export_graph", broken)
    with pytest.raises(ModelUnavailable, match=r"RAG_EMBEDDING_BACKEND='onnx': exporting .* exploded.*torch"):
        Embedder(MODEL, backend="onnx", cache_dir=tmp_path)
    assert not any(p.is_dir() for p in tmp_path.rglob("*") if p.name.startswith(".onnx-"))  # temp folder gone


def test_missing_package_is_one_line_naming_the_setting(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(ModelUnavailable, match=r"RAG_EMBEDDING_BACKEND='openvino': needs .*openvino.*make install"):
        encoder_backends.check_backend("openvino")


def test_bad_backend_is_a_settings_error(monkeypatch):
    from app.cli import cli

    monkeypatch.setenv("RAG_EMBEDDING_BACKEND", "tensorrt")
    result = CliRunner().invoke(cli, ["keys", "list"])
    assert result.exit_code == 2
    assert "invalid setting RAG_EMBEDDING_BACKEND: Input should be 'auto', 'torch', 'onnx', 'onnx-int8' or 'openvino'" \
        in result.output
    with pytest.raises(ValueError, match="unknown embedding backend 'tensorrt'"):
        Embedder(MODEL, backend="tensorrt")


def test_int8_vectors_are_another_embedding_until_a_refresh(tmp_path, cache, loaded):
    """int8 vectors are another embedding: a torch-built generation keeps being served with torch's vectors
    under RAG_EMBEDDING_BACKEND=onnx-int8, the next refresh records '+onnx-int8', and a collection is never
    opened with vectors of the other kind."""
    from app.container import build_services, pinned_embedding_model
    from app.settings import Settings
    from retrieval.dense import DenseIndex, EmbeddingModelMismatch

    base = dict(data_dir=tmp_path, model_cache_dir=cache, load_generator=False, retrieval_tuning=None)
    build_services(Settings(_env_file=None, **base), load_generator=False).ledger.close()
    same = build_services(Settings(_env_file=None, embedding_backend="onnx", **base), load_generator=False)
    assert same.live.dense.embedding_model == MODEL  # fp32 ONNX: the same vectors, the same index
    assert same.live.embedder.backend == "onnx"
    same.ledger.close()
    int8 = Settings(_env_file=None, embedding_backend="onnx-int8", **base)
    services = build_services(int8, load_generator=False)
    assert services.live.dense.embedding_model == MODEL and services.live.embedder.backend == "torch"
    assert pinned_embedding_model(int8) == f"{MODEL}+onnx-int8"  # what the next refresh builds and records
    collection = services.live.generation.collection
    with pytest.raises(EmbeddingModelMismatch, match=r"\+onnx-int8.*RAG_EMBEDDING_BACKEND.*rag refresh"):
        DenseIndex(services.chroma, collection, embedding_model=f"{MODEL}+onnx-int8", dimension=384)
    services.ledger.close()
