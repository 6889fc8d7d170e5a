"""The embedder registry: `embedder:<name>[@<version>]` resolves to a version folder, is pinned to the active
version for a generation's record, and a missing model is an error naming the setting and what to do."""

import pytest

from ingestion.embedder import pin_embedding_model, resolve_embedding_model
from ingestion.registry import EmbedderNotFound, EmbedderRegistry


def _publish(registry: EmbedderRegistry, tmp_path, tag: str):
    source = tmp_path / f"model-{tag}"
    source.mkdir()
    (source / "modules.json").write_text("[]")
    return registry.publish("scifact", source)


def test_resolve_and_pin_follow_the_active_version(tmp_path):
    registry = EmbedderRegistry(tmp_path / "embedders")
    first, second = _publish(registry, tmp_path, "a"), _publish(registry, tmp_path, "b")
    assert (first.label, second.label) == ("scifact@v1", "scifact@v2")
    assert resolve_embedding_model("embedder:scifact", registry.root) == str(second.path)
    assert resolve_embedding_model("embedder:scifact@v1", registry.root) == str(first.path)
    assert pin_embedding_model("embedder:scifact", registry.root) == "embedder:scifact@v2"
    registry.rollback("scifact")
    assert pin_embedding_model("embedder:scifact", registry.root) == "embedder:scifact@v1"
    assert pin_embedding_model("bundled:all-MiniLM-L6-v2", registry.root) == "bundled:all-MiniLM-L6-v2"


def test_a_missing_model_names_the_setting(tmp_path):
    with pytest.raises(EmbedderNotFound, match="RAG_EMBEDDING_MODEL.*rag train embedder.*RAG_EMBEDDERS_DIR"):
        resolve_embedding_model("embedder:nope", tmp_path)
    _publish(EmbedderRegistry(tmp_path), tmp_path, "a")
    with pytest.raises(EmbedderNotFound, match="no version 'v7'"):
        pin_embedding_model("embedder:scifact@v7", tmp_path)
