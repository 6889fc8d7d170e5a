"""docker-compose's production profile and configs/production.env agree with how the service connects to
its Chroma server (no Docker needed: the files are read, as compose and the service read them)."""

from importlib.metadata import version

import yaml

from app.settings import Settings
from tests.app.conftest import REPO


def test_production_profile_points_the_service_at_the_chroma_service(monkeypatch):
    for name in ("RAG_CHROMA_HOST", "RAG_CHROMA_PORT", "RAG_CHROMA_SSL"):
        monkeypatch.delenv(name, raising=False)
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    app, chroma = services["rag-production"], services["chroma"]
    assert "production" in app["profiles"] and "production" in chroma["profiles"]
    assert "chroma" in app["depends_on"]
    settings = Settings(_env_file=[REPO / path for path in app["env_file"]])
    # inside the compose network the service is the host named after it, on the image's port 8000
    assert settings.chroma_host == "chroma" and settings.chroma_port == 8000 and not settings.chroma_ssl
    assert any(port.rsplit(":", 1)[1] == "8000" for port in chroma["ports"])
    assert any(volume.endswith(":/data") for volume in chroma["volumes"])  # the image's persist_path
    assert all(port.startswith("127.0.0.1:") for port in chroma["ports"])  # Chroma has no authentication
    image, tag = chroma["image"].split(":")
    assert image == "chromadb/chroma" and tag == version("chromadb")  # server and client of one version
