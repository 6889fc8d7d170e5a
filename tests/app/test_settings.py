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


@pytest.mark.parametrize("device, backend, resolved", [
    ("cpu", None, "openvino"), ("cuda", None, "torch"), ("cuda:1", None, "torch"), ("cpu", "torch", "torch"),
    ("cuda", "onnx-int8", "onnx-int8"),
])
def test_the_embedding_backend_defaults_to_openvino_on_the_cpu_only(device, backend, resolved):
    """'auto' resolves once, in the settings: OpenVINO (torch's vectors, faster) where the embedder runs on the
    CPU; torch on a GPU, which the exported backends would leave idle. A backend that is set stays."""
    chosen = {} if backend is None else {"embedding_backend": backend}
    assert Settings(_env_file=None, device=device, **chosen).embedding_backend == resolved


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
        ("RAG_UNSUPPORTED", "ignore", "unsupported"),
        ("RAG_EVIDENCE_MIN", "1.5", "evidence_min"),
        ("RAG_CONFIDENCE_MIN", "0.5", "confidence_min"),
        ("RAG_MARGIN_SLOPE", "-1", "margin_slope"),
        ("RAG_ABSTAIN_MARGIN", "-20", "abstain_margin"),
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


def test_grounding_settings_override_the_calibrated_thresholds(tmp_path):
    from app.container import grounding_thresholds

    metadata = {"grounding": {"thresholds": {"relevance_min": 0.3, "evidence_min": 0.2, "confidence_min": -0.8,
                                             "retired_knob": 1}}}
    calibrated = grounding_thresholds(Settings(_env_file=None, data_dir=tmp_path), metadata)
    assert (calibrated.relevance_min, calibrated.evidence_min, calibrated.confidence_min) == (0.3, 0.2, -0.8)
    overridden = grounding_thresholds(Settings(_env_file=None, data_dir=tmp_path, evidence_min=0.6), metadata)
    assert overridden.evidence_min == 0.6 and overridden.relevance_min == 0.3
    sloped = grounding_thresholds(Settings(_env_file=None, data_dir=tmp_path, margin_slope=5.0), metadata)
    assert sloped.margin_slope == 5.0 and calibrated.margin_slope == 0.0  # absent from older metadata: no slope
    assert grounding_thresholds(Settings(_env_file=None, data_dir=tmp_path), {}).support_min == 0.5


def test_eval_generation_rejects_corpus_in_gold_mode(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "q", "answer": "a", "context": "a"}\n')
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "app.cli", "eval", "generation", "--data", str(data),
                             "--mode", "gold", "--corpus", str(data)], capture_output=True, text=True)
    assert result.returncode == 1 and "--corpus needs --mode retrieval" in result.stderr + result.stdout


@pytest.mark.parametrize(("env", "mentions"), [
    ({"RAG_CHROMA_HOST": "127.0.0.1", "RAG_CHROMA_PORT": "{free_port}"}, "RAG_CHROMA_HOST"),
    ({"RAG_EMBEDDING_MODEL": "intfloat/e5-large-v2"}, "RAG_EMBEDDING_MODEL='intfloat/e5-large-v2'"),
    ({"RAG_GENERATOR_MODEL": "meta-llama/Llama-2-13b-hf"}, "RAG_GENERATOR_MODEL='meta-llama/Llama-2-13b-hf'"),
])
@pytest.mark.parametrize("command", [["query", "anything", "--local"], ["serve"]])
def test_a_missing_part_is_one_line_naming_its_setting(tmp_path, env, mentions, command):
    """Old main: the production profile ended in raw tracebacks for an absent Chroma server and e5-large-v2."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    values = {key: value.replace("{free_port}", port) for key, value in env.items()}
    environment = {**os.environ, "RAG_DATA_DIR": str(tmp_path / "data"), "HF_HOME": str(tmp_path / "hf"),
                   "HF_HUB_OFFLINE": "1", **values}
    result = subprocess.run([sys.executable, "-m", "app.cli", *command], env=environment, capture_output=True,
                            text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and mentions in errors[0], result.stderr
