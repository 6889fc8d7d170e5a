"""Bundled generator resolution: pass-through names, the one-time GGUF conversion and its atomic cache."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import generation.bundled as bundled
from generation.bundled import resolve_generator_model

SMOL = "bundled:SmolLM2-135M-Instruct"


def test_folders_and_cached_hub_models_resolve_offline_and_others_name_the_setting(tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants

    from ingestion.model_files import ModelUnavailable

    folder = tmp_path / "llama"
    folder.mkdir()
    assert resolve_generator_model(str(folder), tmp_path / "cache") == str(folder)
    # a hub id in the local cache (its layout: refs/main names the snapshot) resolves to the snapshot, offline
    hub = tmp_path / "hub"
    snapshot = hub / "models--meta-llama--Llama-2-13b-hf" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (hub / "models--meta-llama--Llama-2-13b-hf" / "refs").mkdir()
    (hub / "models--meta-llama--Llama-2-13b-hf" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_generator_model("meta-llama/Llama-2-13b-hf", tmp_path / "cache") == str(snapshot)
    with pytest.raises(ModelUnavailable, match="RAG_GENERATOR_MODEL='meta-llama/Llama-2-70b-hf'"):
        resolve_generator_model("meta-llama/Llama-2-70b-hf", tmp_path / "cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # downloads allowed by the operator: the name goes to the library
    assert resolve_generator_model("meta-llama/Llama-2-70b-hf", tmp_path / "cache") == "meta-llama/Llama-2-70b-hf"
    assert not (tmp_path / "cache").exists()


def test_unknown_bundled_name_lists_the_known_ones(tmp_path) -> None:
    with pytest.raises(ValueError, match="SmolLM2-135M-Instruct"):
        resolve_generator_model("bundled:nope", tmp_path)


def test_failed_conversion_leaves_no_cache_and_a_retry_succeeds(tmp_path, monkeypatch) -> None:
    def crash(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(bundled, "convert_gguf", crash)
    with pytest.raises(RuntimeError):
        resolve_generator_model(SMOL, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".SmolLM2-135M-Instruct.lock"]

    (tmp_path / ".SmolLM2-135M-Instruct.tmp-dead").mkdir()  # what a killed process leaves behind
    calls = []

    def fake(gguf_path: Path, out_dir: Path) -> None:
        calls.append(gguf_path)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(bundled, "convert_gguf", fake)
    folder = resolve_generator_model(SMOL, tmp_path)
    assert folder == str(tmp_path / "SmolLM2-135M-Instruct")
    assert calls[0].name == "SmolLM2-135M-Instruct.Q4_1.gguf" and calls[0].is_file()
    assert not list(tmp_path.glob(".*.tmp-*"))
    assert resolve_generator_model(SMOL, tmp_path) == folder and len(calls) == 1


@pytest.mark.slow
def test_real_bundled_model_converts_caches_and_answers(tmp_path_factory) -> None:
    from generation.generate import generate_answer
    from generation.loading import load_generator
    from generation.prompt import ContextChunk, pack_prompt

    cache = tmp_path_factory.mktemp("model_cache")
    start = time.perf_counter()
    folder = resolve_generator_model(SMOL, cache)
    converted_s = time.perf_counter() - start
    start = time.perf_counter()
    assert resolve_generator_model(SMOL, cache) == folder
    assert time.perf_counter() - start < 0.5
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in Path(folder).iterdir()}

    start = time.perf_counter()
    loaded = load_generator(folder, context_window=2048)
    load_s = time.perf_counter() - start
    assert loaded.rope_scaling is None and loaded.native_context == 8192
    assert loaded.tokenizer.chat_template and "<|im_start|>" in loaded.tokenizer.chat_template
    assert "quantization_config" not in loaded.model.config.to_dict()

    chunks = [
        ContextChunk("The Eiffel Tower is a wrought-iron lattice tower in Paris. It is named after the "
                     "engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889."),
        ContextChunk("The Statue of Liberty stands on Liberty Island in New York Harbor."),
    ]
    packed = pack_prompt(loaded.tokenizer, "Who is the Eiffel Tower named after?", chunks,
                         context_window=2048, max_new_tokens=40)
    result = generate_answer(loaded, packed, max_new_tokens=40, timeout_s=120)
    print(f"\nconvert {converted_s:.1f}s, load {load_s:.2f}s, {result.n_new_tokens} tokens in "
          f"{result.elapsed_s:.2f}s: {result.text!r}")
    assert "Eiffel" in result.text
    assert result.finish_reason in {"stop", "length"}
