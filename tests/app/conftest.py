"""A real service over the demo corpus: real MiniLM, real Chroma, real BM25, the bundled SmolLM2."""

from pathlib import Path

import pytest

from app.cli import DEMO_CORPUS
from app.container import build_services
from app.settings import Settings
from ingestion.loaders import load_documents

REPO = Path(__file__).resolve().parents[2]
MODEL_CACHE = REPO / ".cache" / "models"  # converted bundled models, reused across test runs


def make_settings(data_dir: Path, **overrides) -> Settings:
    return Settings(_env_file=None, data_dir=data_dir, model_cache_dir=MODEL_CACHE, **overrides)


@pytest.fixture(scope="session")
def demo_services(tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("demo-data"), max_new_tokens=48)
    services = build_services(settings, load_generator=True)
    services.indexer().apply(load_documents([DEMO_CORPUS]))
    yield services
    services.ledger.close()
