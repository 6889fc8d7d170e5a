"""The adapter registry (publish, activate, rollback) and the metadata check before serving an adapter."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from app.container import build_generator
from app.settings import Settings
from generation.adapters import AdapterMismatch, AdapterNotFound, AdapterRegistry, check_compatible
from generation.prompt import PROMPT_TEMPLATE_VERSION
from tests.generation.conftest import NATIVE


def fake_adapter(folder: Path, **metadata) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "metadata.json").write_text(json.dumps(metadata))
    return folder


def test_publish_activate_and_rollback(tmp_path) -> None:
    registry = AdapterRegistry(tmp_path / "reg")
    assert registry.names() == []
    v1 = registry.publish("qa", fake_adapter(tmp_path / "a1", created_at="1"))
    v2 = registry.publish("qa", fake_adapter(tmp_path / "a2", created_at="2"))
    assert (v1.label, v2.label) == ("qa@v1", "qa@v2")
    assert registry.active("qa") == "v2" and registry.resolve("qa").version == "v2"
    assert registry.resolve("qa@v1").path == tmp_path / "reg" / "qa" / "v1"

    assert registry.rollback("qa").version == "v1"
    assert registry.resolve("qa").version == "v1"
    with pytest.raises(AdapterNotFound, match="no earlier activation"):
        registry.rollback("qa")

    assert registry.activate("qa", "v2").version == "v2"
    assert registry.activate("qa", "v1").version == "v1"
    assert registry.rollback("qa").version == "v2"
    assert [(e["version"], e["active"]) for e in registry.entries()] == [("v1", False), ("v2", True)]
    v3 = registry.publish("qa", fake_adapter(tmp_path / "a3"), activate=False)
    assert v3.version == "v3" and registry.active("qa") == "v2"
    assert registry.activate("qa").version == "v3"  # no version: the latest


def test_unknown_names_and_versions_are_named(tmp_path) -> None:
    registry = AdapterRegistry(tmp_path / "reg")
    registry.publish("qa", fake_adapter(tmp_path / "a1"))
    with pytest.raises(AdapterNotFound, match="'nope'"):
        registry.resolve("nope")
    with pytest.raises(AdapterNotFound, match="no version 'v9'.*v1"):
        registry.resolve("qa@v9")
    with pytest.raises(ValueError, match="adapter name"):
        registry.publish("../evil", tmp_path / "a1")


def serving(**overrides):
    values = dict(base_model="bundled:SmolLM2-135M-Instruct", context_window=8192,
                  rope_scaling={"rope_type": "linear", "factor": 2.0}, prompt_template_versions=("rag-v1", "rag-v2"))
    values.update(overrides)
    return values


def test_metadata_mismatch_names_both_values() -> None:
    trained = {**serving(), "prompt_template_version": "rag-v1", "method": "lora"}
    del trained["prompt_template_versions"]
    check_compatible(dict(trained, rope_scaling={"rope_type": "linear", "factor": 2}), where="x", **serving())
    with pytest.raises(AdapterMismatch) as info:
        check_compatible(trained, where="qa@v1", **serving(context_window=4096, rope_scaling=None))
    message = str(info.value)
    assert "qa@v1" in message
    assert "context_window: adapter trained with 8192, serving 4096" in message
    assert "rope_scaling: adapter trained with {'rope_type': 'linear', 'factor': 2.0}, serving None" in message
    with pytest.raises(AdapterMismatch, match="base_model: adapter trained with 'bundled:SmolLM2-135M-Instruct', "
                                              "serving 'meta-llama/Llama-2-13b-hf'"):
        check_compatible(trained, where="x", **serving(base_model="meta-llama/Llama-2-13b-hf"))
    check_compatible(dict(trained, prompt_template_version="rag-v2"), where="x", **serving())  # any known version
    mismatch = "prompt_template_version: adapter trained with 'rag-v9', unknown here (known: 'rag-v1', 'rag-v2')"
    with pytest.raises(AdapterMismatch, match=re.escape(mismatch)):
        check_compatible(dict(trained, prompt_template_version="rag-v9"), where="x", **serving())
    with pytest.raises(AdapterMismatch, match="not recorded"):
        check_compatible({}, where="x", **serving())


def tiny_settings(tmp_path, model_dir, **overrides) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path / "data", generator_model=str(model_dir),
                    context_window=NATIVE, **overrides)


def test_serving_refuses_a_mismatched_adapter(tmp_path, tiny_model_dir) -> None:
    registry = AdapterRegistry(tmp_path / "reg")
    registry.publish("qa", fake_adapter(tmp_path / "a", base_model=str(tiny_model_dir), context_window=2 * NATIVE,
                                        rope_scaling={"rope_type": "linear", "factor": 2.0},
                                        prompt_template_version=PROMPT_TEMPLATE_VERSION))
    settings = tiny_settings(tmp_path, tiny_model_dir, adapters_dir=tmp_path / "reg", adapter="qa")
    with pytest.raises(AdapterMismatch, match=f"context_window: adapter trained with {2 * NATIVE}, serving {NATIVE}"):
        build_generator(settings)


def test_missing_registry_names_the_path(tmp_path, tiny_model_dir, caplog) -> None:
    missing = tmp_path / "no-such-registry"
    explicit = tiny_settings(tmp_path, tiny_model_dir, adapters_dir=missing, adapter="qa")
    with pytest.raises(AdapterNotFound, match=str(missing)):
        build_generator(explicit)
    # a default (not explicitly configured) adapter that is missing: logged, and the base model serves
    default = explicit.model_copy()
    default.model_fields_set.discard("adapter")
    with caplog.at_level(logging.ERROR):
        loaded = build_generator(default)
    assert loaded.adapter_name is None and loaded.adapter_path is None
    assert str(missing) in caplog.text


def real_adapter(folder: Path, model_dir: Path, template_version: str = PROMPT_TEMPLATE_VERSION) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(folder)
    meta = dict(base_model=str(model_dir), context_window=NATIVE, rope_scaling=None,
                prompt_template_version=template_version, method="lora")
    (folder / "metadata.json").write_text(json.dumps(meta))
    return folder


def test_services_load_adapters_on_demand_in_a_bounded_cache(tmp_path, tiny_model_dir) -> None:
    from app.container import Services

    registry = AdapterRegistry(tmp_path / "reg")
    registry.publish("qa", real_adapter(tmp_path / "a", tiny_model_dir))
    registry.publish("qa", tmp_path / "a")
    settings = tiny_settings(tmp_path, tiny_model_dir, adapters_dir=tmp_path / "reg", adapter_cache_size=1)
    base = build_generator(settings)
    services = Services(settings=settings, ledger=None, chroma=None, embedder=None, chunker=None,  # type: ignore[arg-type]
                        live=None, generator=base)
    assert services.generator_for(None) is base and services.generator_for("none") is base
    qa = services.generator_for("qa")
    assert qa.adapter_name == "qa@v2" and services.generator_for("qa") is qa
    old = services.generator_for("qa@v1")
    assert old.adapter_name == "qa@v1"
    assert services.generator_for("qa") is not qa  # evicted: the cache holds one adapter
    with pytest.raises(LookupError, match="'nope'"):
        services.generator_for("nope")


def test_concurrent_first_users_of_an_adapter_share_one_load(tmp_path, tiny_model_dir, monkeypatch) -> None:
    import threading

    import app.container as container
    from app.container import Services

    AdapterRegistry(tmp_path / "reg").publish("qa", real_adapter(tmp_path / "a", tiny_model_dir))
    settings = tiny_settings(tmp_path, tiny_model_dir, adapters_dir=tmp_path / "reg")
    services = Services(settings=settings, ledger=None, chroma=None, embedder=None, chunker=None,  # type: ignore[arg-type]
                        live=None, generator=build_generator(settings))
    loads = []
    real_build = container.build_generator
    monkeypatch.setattr(container, "build_generator", lambda *a, **k: loads.append(1) or real_build(*a, **k))
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(services.generator_for("qa"))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loads) == 1 and len(got) == 4 and all(g is got[0] for g in got)
    assert got[0].adapter_name == "qa@v1"


def test_a_request_adapter_is_a_registry_name_never_a_folder(tmp_path, tiny_model_dir) -> None:
    from app.container import Services
    from generation.adapters import AdapterBroken, AdapterNotFound

    folder = real_adapter(tmp_path / "outside", tiny_model_dir)  # a valid adapter, but not in the registry
    registry = AdapterRegistry(tmp_path / "reg")
    broken = real_adapter(tmp_path / "b", tiny_model_dir)
    (broken / "adapter_config.json").write_text("{not json")
    registry.publish("broken", broken)
    settings = tiny_settings(tmp_path, tiny_model_dir, adapters_dir=tmp_path / "reg")
    services = Services(settings=settings, ledger=None, chroma=None, embedder=None, chunker=None,  # type: ignore[arg-type]
                        live=None, generator=build_generator(settings))
    for ref in (str(folder), f"../{folder.name}", "qa/../../outside"):
        with pytest.raises(AdapterNotFound) as raised:
            services.generator_for(ref)
        assert str(tmp_path) not in str(raised.value).replace(ref, "")
    with pytest.raises(AdapterBroken, match="'broken'") as raised:
        services.generator_for("broken")
    assert str(tmp_path) not in str(raised.value)


def test_each_adapter_is_served_with_its_own_prompt_template(tmp_path, tiny_model_dir) -> None:
    from app.container import Services
    from generation.rag import grounded_generation
    from generation.prompt import ContextChunk, system_prompt

    registry = AdapterRegistry(tmp_path / "reg")
    registry.publish("old", real_adapter(tmp_path / "a1", tiny_model_dir, "rag-v1"))
    registry.publish("new", real_adapter(tmp_path / "a2", tiny_model_dir, "rag-v2"))
    settings = tiny_settings(tmp_path, tiny_model_dir, adapters_dir=tmp_path / "reg", adapter="old")
    old = build_generator(settings)
    services = Services(settings=settings, ledger=None, chroma=None, embedder=None, chunker=None,  # type: ignore[arg-type]
                        live=None, generator=old)
    assert old.prompt_template_version == "rag-v1"
    assert services.generator_for("new").prompt_template_version == "rag-v2"
    assert services.generator_for("none").prompt_template_version == PROMPT_TEMPLATE_VERSION == "rag-v2"
    for generator, version in ((old, "rag-v1"), (services.generator_for("new"), "rag-v2")):
        packed = grounded_generation(generator, "Who?", [ContextChunk("Nobody.")], max_new_tokens=4).packed
        assert packed.template_version == version and system_prompt(version) in packed.text
