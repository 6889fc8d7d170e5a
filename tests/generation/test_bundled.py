"""Bundled generator resolution: pass-through names, the one-time GGUF conversion and its atomic cache."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import generation.bundled as bundled
from generation.bundled import resolve_generator_model

SMOL = "bundled:SmolLM2-135M-Instruct"


def test_other_names_pass_through(tmp_path) -> None:
    assert resolve_generator_model("meta-llama/Llama-2-13b-hf", tmp_path) == "meta-llama/Llama-2-13b-hf"
    assert resolve_generator_model("/models/llama", tmp_path) == "/models/llama"
    assert not any(tmp_path.iterdir())


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
