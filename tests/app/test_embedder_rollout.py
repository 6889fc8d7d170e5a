"""Rolling out a fine-tuned embedder: `rag train embedder` publishes it, a refresh switches the live generation
and the query embedder to it together while queries keep answering, a rollback returns to the old model;
a collection opened with another model stays a clear error."""

import json
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app.container import build_services
from app.main import create_app
from ingestion.registry import EmbedderRegistry
from retrieval.dense import DenseIndex, EmbeddingModelMismatch
from tests.app.conftest import found_documents, make_settings, marker, synthetic_documents, wait_for_job

ADMIN = {"Authorization": "Bearer " + "a" * 24}
BASE = "bundled:all-MiniLM-L6-v2"
N_DOCS = 10


def _training_files(folder):
    """A corpus of the synthetic documents and one labelled query per document (its marker word)."""
    docs = synthetic_documents(N_DOCS)
    corpus, pairs = folder / "corpus.jsonl", folder / "pairs.jsonl"
    corpus.write_text("".join(json.dumps({"_id": d.document_id, "title": d.title, "text": d.text}) + "\n"
                              for d in docs))
    pairs.write_text("".join(json.dumps({"query": f"survey {marker('doc', i, 0)} readings",
                                         "document_id": d.document_id}) + "\n" for i, d in enumerate(docs)))
    config = folder / "tiny.yaml"
    config.write_text(f"name: tiny\ncorpus: {corpus}\npairs: {pairs}\nmax_steps: 2\nbatch_size: 4\n"
                      "hard_negatives: 1\nnegative_depth: 8\nnegative_skip: 0\nmax_seq_length: 64\n"
                      "learning_rate: 1.0e-4\nlogging_steps: 1\n")
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`rag train embedder` for two steps on ten documents (seconds); the registry it published into."""
    from app.cli import cli

    folder = tmp_path_factory.mktemp("embedder-train")
    registry = folder / "embedders"
    result = CliRunner().invoke(cli, ["train", "embedder", "--config", str(_training_files(folder)),
                                      "--registry", str(registry)])
    assert result.exit_code == 0, result.output
    assert "embedder tiny@v1" in result.output and "rag refresh --embedding-model embedder:tiny@v1" in result.output
    return registry


@pytest.mark.slow
def test_train_publishes_a_versioned_model_with_metadata(trained):
    ref = EmbedderRegistry(trained).resolve("tiny")
    assert ref.label == "tiny@v1" and (ref.path / "modules.json").is_file()
    meta = json.loads((ref.path / "metadata.json").read_text())
    assert meta["base_model"] == BASE and len(meta["training_data"]["sha256"]) == 64
    assert meta["training_data"]["rows"] == N_DOCS and meta["metrics"]["steps"] == 2
    assert [h["step"] for h in meta["loss_history"]] == [1, 2] and meta["max_seq_length"] == 256
    assert (ref.path / "training_curve.png").stat().st_size > 0 and (ref.path / "train_config.yaml").is_file()


@pytest.mark.slow
def test_refresh_switches_the_query_embedder_and_rollback_restores_it(trained, tmp_path, embedder):
    settings = make_settings(tmp_path / "data", admin_api_keys="a" * 24, load_generator=False, refresh_cron="",
                             refresh_golden_sample=4, embedders_dir=trained)
    services = build_services(settings, embedder=embedder)
    services.indexer().apply(synthetic_documents(N_DOCS))
    question = f"survey {marker('doc', 3, 0)} readings"
    base_vector = embedder.embed_queries([question])[0]
    errors, answered, stop = [], [], threading.Event()

    def ask() -> None:  # a reader during the refresh: every question answered, never with a half-swapped index
        while not stop.is_set():
            try:
                answered.append(found_documents(services, question, k=3)[0] == "doc-003")
            except Exception as exc:  # noqa: BLE001 - any failure counts
                errors.append(repr(exc))

    try:
        with TestClient(create_app(settings, services=services)) as client:
            assert client.post("/refresh", params={"embedding_model": "embedder:nope"},
                               headers=ADMIN).status_code == 422
            reader = threading.Thread(target=ask)
            reader.start()
            try:
                job = client.post("/refresh", params={"embedding_model": "embedder:tiny"}, headers=ADMIN).json()
                assert wait_for_job(client, job["job_id"], headers=ADMIN)["status"] == "succeeded"
            finally:
                stop.set()
                reader.join()
            assert not errors and answered and all(answered)

            live = services.live
            assert live.generation.embedding_model == "embedder:tiny@v1"  # pinned: ACTIVE may move later
            assert live.embedder is not embedder and live.retriever.embedder is live.embedder
            tuned = live.embedder.embed_queries([question])[0]
            assert not np.allclose(tuned, base_vector, atol=1e-5)
            assert np.allclose(live.retriever.embed_query(question), tuned, atol=1e-6)
            assert client.get("/health", headers=ADMIN).json()["embedding_model"] == "embedder:tiny@v1"
            assert found_documents(services, question)[0] == "doc-003"

            # the new collection records the new model: opening it with the old one is a clear error
            with pytest.raises(EmbeddingModelMismatch, match="embedder:tiny@v1"):
                DenseIndex(services.chroma, live.generation.collection, embedding_model=BASE, dimension=384)

            job = client.post("/refresh/rollback", headers=ADMIN).json()
            assert wait_for_job(client, job["job_id"], headers=ADMIN)["status"] == "succeeded"
            assert services.live.generation.embedding_model == BASE and services.live.embedder is embedder
            assert np.allclose(services.live.retriever.embed_query(question), base_vector, atol=1e-6)
            assert found_documents(services, question)[0] == "doc-003"
    finally:
        services.ledger.close()
