"""/query with adapters: the default profile serves the shipped adapter; an unknown name is a 404."""

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from generation.adapters import AdapterRegistry


@pytest.fixture(scope="module")
def client(demo_services):
    with TestClient(create_app(demo_services.settings, services=demo_services)) as test_client:
        yield test_client


def test_unknown_adapter_is_404_naming_it(client):
    response = client.post("/query", json={"question": "How long is the warranty?", "adapter": "no-such-adapter"})
    assert response.status_code == 404
    assert "no-such-adapter" in response.json()["detail"]


def test_default_profile_serves_the_shipped_adapter(client, demo_services):
    default = Settings(_env_file=None).adapter
    assert default, "the default profile names an adapter"
    shipped = AdapterRegistry(demo_services.settings.adapters_path).resolve(default)
    assert (shipped.path / "metadata.json").is_file()
    response = client.post("/query", json={"question": "How many vacation days do full-time employees get?"})
    assert response.status_code == 200, response.text
    assert response.json()["provenance"]["adapter"] == shipped.label
    assert client.get("/health").json()["adapter"] == shipped.label
    named = client.post("/query", json={"question": "How long is the warranty?", "adapter": default})
    assert named.status_code == 200 and named.json()["provenance"]["adapter"] == shipped.label
