"""Every PEFT method end to end: rows from the service's own retrieval over a SQuAD file (real MiniLM, Chroma and
BM25), training, publication into the registry, and /query over HTTP naming each adapter per request."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from app.cli.common import DEMO_CORPUS
from app.container import build_services
from app.evaluation.indexes import corpus_opener, retrieval_key
from app.main import create_app
from app.settings import Settings
from generation.adapters import AdapterRegistry
from generation.finetune.config import TrainConfig
from generation.finetune.pipeline import train_from_config
from ingestion.loaders import load_documents
from tests.app.test_reranker_training import squad_file
from tests.generation.test_peft_methods import METHOD_SETTINGS, WINDOW

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("peft-pipeline")
    settings = Settings(_env_file=None, data_dir=root / "data", generator_model=str(tiny_model_dir),
                        context_window=WINDOW, adapters_dir=root / "registry", adapter="", max_new_tokens=6,
                        relevance_min=0.0, dense_min=-1.0)  # the gate lets every question through to the generator
    train = squad_file(root / "train.json")
    refs = {}
    for method, extra in METHOD_SETTINGS.items():
        config = TrainConfig(name=f"tiny-{method}", base_model=str(tiny_model_dir), method=method,
                             context_window=WINDOW, max_new_tokens=6, r=4, lora_alpha=8, max_steps=2, batch_size=1,
                             grad_accumulation=1, eval_steps=2, logging_steps=1, train_files=[str(train)],
                             validation_articles=1, validation_rows=1, train_rows=3, questions_per_row=3,
                             context_chunks=[2, 3], gold_only_fraction=0.3, no_gold_fraction=0.0,
                             **extra)
        config.validate()
        refs[method] = train_from_config(config, models_path=settings.models_path,
                                         open_index=corpus_opener(settings, root / "cache"),
                                         retrieval_key=retrieval_key(settings), root=root,
                                         registry_root=settings.adapters_path, cache_root=root / "cache")
    return settings, refs


def test_each_method_publishes_into_the_registry_with_its_method(published) -> None:
    settings, refs = published
    registry = AdapterRegistry(settings.adapters_path)
    assert {e["name"]: e["method"] for e in registry.entries()} == {f"tiny-{m}": m for m in METHOD_SETTINGS}
    for method, ref in refs.items():
        meta = json.loads((ref.path / "metadata.json").read_text())
        assert meta["method"] == method and meta["metrics"]["steps"] == 2
        assert meta["training_data"]["kinds"].get("retrieved", 0) >= 1  # contexts from the service's retrieval
        assert meta["context_window"] == WINDOW and (ref.path / "training_curve.png").is_file()


def test_each_adapter_answers_a_query_named_in_the_request(published) -> None:
    settings, refs = published
    services = build_services(settings)
    services.indexer().apply(load_documents([DEMO_CORPUS]))
    with TestClient(create_app(settings, services=services)) as client:
        for method, ref in refs.items():
            response = client.post("/query", json={"question": "How many vacation days do employees get?",
                                                   "adapter": ref.name})
            assert response.status_code == 200, (method, response.text)
            body = response.json()
            assert body["provenance"]["adapter"] == ref.label, method
            assert body["finish_reason"] is not None, method  # the adapter's generator ran
    services.ledger.close()
