"""Settings validation and the CLI's refusal to run insecurely."""

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from app.cli import cli
from app.settings import Settings


def test_defaults_are_the_embedded_profile(tmp_path):
    settings = Settings(_env_file=None, data_dir=tmp_path)
    assert settings.embedding_model == "bundled:all-MiniLM-L6-v2"
    assert settings.generator_model == "bundled:SmolLM2-135M-Instruct"
    assert settings.chroma_host is None and settings.api_keys == []
    assert settings.chunk_max_tokens == 512 and settings.chunk_overlap_tokens == 50


def test_environment_variables_and_comma_lists(monkeypatch, tmp_path):
    monkeypatch.setenv("RAG_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("RAG_API_KEYS", "a" * 20 + ", " + "b" * 20)
    monkeypatch.setenv("RAG_CONTEXT_WINDOW", "8192")
    settings = Settings(_env_file=None)
    assert settings.data_dir == tmp_path and settings.context_window == 8192
    assert settings.api_keys == ["a" * 20, "b" * 20]


@pytest.mark.parametrize(
    ("env", "value", "mentions"),
    [
        ("RAG_TOP_K", "0", "top_k"),
        ("RAG_FUSION", "max", "fusion"),
        ("RAG_FUSION_ALPHA", "2", "fusion_alpha"),
        ("RAG_API_KEYS", "changeme", "api_keys"),
        ("RAG_CHUNK_OVERLAP_TOKENS", "600", "RAG_CHUNK_OVERLAP_TOKENS"),
        ("RAG_QUANTIZATION", "3bit", "quantization"),
    ],
)
def test_invalid_settings_name_the_setting(monkeypatch, env, value, mentions):
    monkeypatch.setenv(env, value)
    with pytest.raises(ValidationError) as error:
        Settings(_env_file=None)
    assert mentions in str(error.value)


def test_cli_reports_invalid_setting_by_env_name(monkeypatch):
    monkeypatch.setenv("RAG_TOP_K", "zero")
    result = CliRunner().invoke(cli, ["query", "anything"])
    assert result.exit_code == 2
    assert "RAG_TOP_K" in result.output


def test_serve_refuses_public_bind_without_api_keys(monkeypatch, tmp_path):
    monkeypatch.setenv("RAG_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("RAG_API_KEYS", raising=False)
    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0"])
    assert result.exit_code == 1
    assert "refusing to bind 0.0.0.0" in result.output
