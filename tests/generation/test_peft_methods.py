"""Every PEFT method (LoRA, DoRA, IA3, prompt and prefix tuning): its settings validated, trained through the
answer-only loss, reloaded by the serving loader to the same logits, generated from (virtual tokens included),
merged where peft can and refused where it cannot, and its method checked against the adapter's files.

A tiny random LLaMA (tests/generation/conftest.py) is trained a few steps per method on shared-prefix RAG rows.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from app.container import build_generator
from app.settings import Settings
from generation.adapters import AdapterMismatch, AdapterRegistry, check_compatible, read_adapter_config
from generation.finetune.config import TrainConfig
from generation.finetune.data import RowBuilder, build_rows
from generation.finetune.pipeline import answer_logits, build_metadata, compact_adapter
from generation.finetune.train import RowCollator, answer_hidden, causal_lm, run_training
from generation.generate import abstain_token_id, generate_answer
from generation.loading import load_generator
from generation.methods import METHODS
from generation.prompt import PROMPT_TEMPLATE_VERSION, ContextChunk, pack_prompt
from tests.generation.test_finetune import make_articles, stub_retrieve

REPO = Path(__file__).resolve().parents[2]
WINDOW = 1024
METHOD_SETTINGS = {
    "lora": {},
    "dora": {},
    "ia3": {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"],
            "learning_rate": 5e-2},
    "prompt_tuning": {"num_virtual_tokens": 6, "prompt_init_text": "Answer from the passages.", "learning_rate": 5e-2},
    "prefix_tuning": {"num_virtual_tokens": 6, "learning_rate": 5e-2},
}


def method_config(method: str, **overrides) -> TrainConfig:
    values = dict(name=f"tiny-{method}", base_model="tiny", method=method, context_window=WINDOW, max_new_tokens=32,
                  r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=5e-3, warmup_ratio=0.0, max_steps=4,
                  batch_size=2, grad_accumulation=1, eval_steps=4, logging_steps=1, seed=0)
    values.update(METHOD_SETTINGS.get(method, {}))
    values.update(overrides)
    config = TrainConfig(**values)
    config.validate()
    return config


def rows_for(tokenizer, config: TrainConfig):
    """Shared-prefix RAG rows packed, as prepare_rows packs them, into the window the method leaves the prompt."""
    articles = make_articles()
    builder = RowBuilder(tokenizer=tokenizer, retrieve=stub_retrieve(articles), context_window=config.prompt_window,
                         max_new_tokens=config.max_new_tokens, max_seq_length=1024, context_chunks=(2, 3),
                         gold_only_fraction=0.3, no_gold_fraction=0.2, questions_per_row=3, impossible_per_row=1)
    return build_rows(builder, [(a, p) for a in articles for p in a.paragraphs], n_rows=6, seed=0)


@pytest.fixture(scope="module")
def trained(smol_tokenizer, tiny_model_dir, tmp_path_factory):
    """method -> (config, rows, TrainResult, registry folder) for a few steps of each method, published."""
    registry = AdapterRegistry(tmp_path_factory.mktemp("registry"))
    out = {}
    for method in METHOD_SETTINGS:
        config = method_config(method, base_model=str(tiny_model_dir))
        built = rows_for(smol_tokenizer, config)
        run_dir = tmp_path_factory.mktemp(f"run-{method}")
        result = run_training(config, str(tiny_model_dir), {"train": built, "validation": built[:2]}, run_dir)
        diff = compact_adapter(result, str(tiny_model_dir), built, config)
        info = {"data_sha256": "abc", "rows": {}, "examples": {}, "kinds": {}, "articles": {}}
        metadata = build_metadata(config, result, info, [run_dir / "train.json"], diff)
        (result.adapter_dir / "metadata.json").write_text(json.dumps(metadata))
        ref = registry.publish(config.name, result.adapter_dir)
        out[method] = (config, built, result, ref.path)
    return out


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_each_method_trains_and_records_its_method(trained, method) -> None:
    config, _, result, folder = trained[method]
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert losses[-1] < losses[0], losses  # the answer-only loss goes down for every method
    assert 0 < result.trainable_params < result.total_params / 10
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["method"] == method and meta["quantization"] == "none"
    assert meta["mergeable"] == METHODS[method].mergeable
    assert meta["num_virtual_tokens"] == config.virtual_tokens == (6 if method.endswith("_tuning") else 0)
    check_compatible(meta, where="x", base_model=config.base_model, context_window=WINDOW, rope_scaling=None,
                     prompt_template_versions=(PROMPT_TEMPLATE_VERSION,), adapter_config=read_adapter_config(folder))


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_the_serving_loader_reproduces_the_trained_logits(trained, tiny_model_dir, method) -> None:
    config, built, result, folder = trained[method]
    served = load_generator(str(tiny_model_dir), context_window=WINDOW, adapter_path=str(folder))
    batch = RowCollator(pad_id=0)(built[:2])
    expected = answer_logits(result.model, batch)
    torch.testing.assert_close(answer_logits(served.model, batch), expected, atol=1e-2, rtol=0)
    base = load_generator(str(tiny_model_dir), context_window=WINDOW)
    assert (answer_logits(base.model, batch) - expected).abs().max() > 1e-3  # the adapter changes the answers
    # virtual tokens take the first positions: prompts are packed into what is left, as in training
    assert served.virtual_tokens == config.virtual_tokens
    assert served.context_window == config.prompt_window == WINDOW - config.virtual_tokens


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_virtual_tokens_line_up_in_training_and_generation(trained, tiny_model_dir, smol_tokenizer, method) -> None:
    """The shared-prefix training forward equals peft's own forward on one example, and greedy generation
    (peft's generate path) sees the same virtual tokens: its first-token log-probabilities are the forward's."""
    _, _, _, folder = trained[method]
    served = load_generator(str(tiny_model_dir), context_window=WINDOW, adapter_path=str(folder))
    chunk = ContextChunk(text="Paris is the capital of France.", chunk_id="c", document_id="d")
    packed = pack_prompt(smol_tokenizer, "What is the capital of France?", [chunk],
                         context_window=served.context_window, max_new_tokens=8)
    ids = torch.tensor([packed.input_ids])
    n = ids.shape[1]
    batch = {"input_ids": ids, "position_ids": torch.arange(n)[None], "segments": torch.zeros(1, n, dtype=torch.long)}
    with torch.no_grad():
        ours = causal_lm(served.model).lm_head(answer_hidden(served.model, batch))[0]  # (n, V)
        theirs = served.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -n:]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)

    result = generate_answer(served, packed, max_new_tokens=4)
    assert result.n_new_tokens == 4 and result.finish_reason == "length"  # stop tokens are never chosen (conftest)
    greedy, logprobs = ids, []  # greedy decoding by full forwards: every cached decoding step must agree
    with torch.no_grad():
        for _ in range(4):
            step = served.model(input_ids=greedy, attention_mask=torch.ones_like(greedy)).logits[0, -1].float()
            logprobs.append(float(torch.log_softmax(step, dim=-1).max()))
            greedy = torch.cat([greedy, step.argmax().view(1, 1)], dim=1)
    assert result.token_logprobs == pytest.approx(logprobs, abs=1e-4)
    assert result.text == smol_tokenizer.decode(greedy[0, n:], skip_special_tokens=True).strip()
    last = theirs[-1].float()  # (V,): the first answer token's logits
    abstain = abstain_token_id(smol_tokenizer)
    others = torch.cat([last[:abstain], last[abstain + 1:]])
    assert result.abstain_preference == pytest.approx(float(last[abstain] - others.max()), abs=1e-4)
    base = generate_answer(load_generator(str(tiny_model_dir), context_window=WINDOW), packed, max_new_tokens=4)
    assert base.token_logprobs[0] != pytest.approx(result.token_logprobs[0], abs=1e-3)  # the virtual tokens count


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merging_gives_the_unmerged_answers(trained, tiny_model_dir, smol_tokenizer, method) -> None:
    _, built, _, folder = trained[method]
    unmerged = load_generator(str(tiny_model_dir), context_window=WINDOW, adapter_path=str(folder))
    merged = load_generator(str(tiny_model_dir), context_window=WINDOW, adapter_path=str(folder), merge_adapter=True)
    assert not any("lora" in n or "ia3" in n for n, _ in merged.model.named_parameters())  # folded in
    batch = RowCollator(pad_id=0)(built[:2])
    torch.testing.assert_close(answer_logits(merged.model, batch), answer_logits(unmerged.model, batch),
                               atol=1e-4, rtol=0)
    chunk = ContextChunk(text="Rome is the capital of Italy.", chunk_id="c", document_id="d")
    packed = pack_prompt(smol_tokenizer, "What is the capital of Italy?", [chunk], context_window=WINDOW,
                         max_new_tokens=8)
    a, b = generate_answer(merged, packed, max_new_tokens=8), generate_answer(unmerged, packed, max_new_tokens=8)
    assert a.text == b.text and a.n_new_tokens == b.n_new_tokens == 8
    assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-3)


def serving_settings(tmp_path: Path, tiny_model_dir: Path, registry: Path, **overrides) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path / "data", generator_model=str(tiny_model_dir),
                    context_window=WINDOW, adapters_dir=registry, **overrides)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_merging_prompt_and_prefix_tuning_is_refused(trained, tiny_model_dir, tmp_path, method) -> None:
    config, _, _, folder = trained[method]
    settings = serving_settings(tmp_path, tiny_model_dir, folder.parents[1], adapter=config.name, merge_adapter=True)
    with pytest.raises(AdapterMismatch, match=f"{config.name}@v1 .*trained with {method}.*cannot be merged.*"
                                              "RAG_MERGE_ADAPTER=false"):
        build_generator(settings)
    with pytest.raises(ValueError, match="cannot be merged into the base weights"):
        load_generator(str(tiny_model_dir), context_window=WINDOW, adapter_path=str(folder), merge_adapter=True)
    served = build_generator(settings.model_copy(update={"merge_adapter": False}))  # unmerged: served
    assert served.adapter_name == f"{config.name}@v1" and served.virtual_tokens == 6


def test_the_metadata_check_covers_the_method(trained, tiny_model_dir, tmp_path) -> None:
    config, _, _, folder = trained["dora"]
    registry = tmp_path / "reg"
    for name, change in [("relabelled", {"method": "lora"}), ("unknown", {"method": "adalora"}),
                         ("unrecorded", {"method": None})]:
        copy = shutil.copytree(folder, tmp_path / name)
        meta = json.loads((copy / "metadata.json").read_text())
        meta.update(change)
        if change["method"] is None:
            del meta["method"]
        (copy / "metadata.json").write_text(json.dumps(meta))
        AdapterRegistry(registry).publish(name, copy)
    settings = serving_settings(tmp_path, tiny_model_dir, registry)
    expected = {"relabelled": "method: metadata records lora (LORA), adapter_config.json holds LORA+DoRA",
                "unknown": "method: 'adalora' is not one of lora, qlora, lora-8bit, dora, ia3",
                "unrecorded": "method: not recorded by the adapter"}
    for name, message in expected.items():
        with pytest.raises(AdapterMismatch, match=re.escape(message)):
            build_generator(settings.model_copy(update={"adapter": name}))


@pytest.mark.parametrize("method", ["dora", "ia3", "prompt_tuning", "prefix_tuning"])
def test_vllm_refuses_adapters_other_than_lora(trained, tiny_model_dir, tmp_path, method) -> None:
    from generation.vllm_backend import connect_vllm

    config, _, _, folder = trained[method]
    settings = serving_settings(tmp_path, tiny_model_dir, folder.parents[1], adapter=config.name,
                                generator_backend="vllm", vllm_url="http://127.0.0.1:9")
    with pytest.raises(AdapterMismatch, match=f"{config.name}@v1 .*was trained with {method}; vLLM serves LoRA "
                                              "adapters only.*RAG_GENERATOR_BACKEND=transformers"):
        build_generator(settings)
    kind = read_adapter_config(folder)["peft_type"] + ("+DoRA" if method == "dora" else "")
    refusal = re.escape(f"adapter {config.name}@v1 holds a {kind} adapter") + ".*RAG_GENERATOR_BACKEND=transformers"
    with pytest.raises(AdapterMismatch, match=refusal):
        connect_vllm(str(tiny_model_dir), url="http://127.0.0.1:9", context_window=WINDOW,
                     adapter_path=str(folder), adapter_name=f"{config.name}@v1")


@pytest.mark.parametrize(("quantization", "layer"), [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_dora_trains_on_a_quantized_base(smol_tokenizer, tiny_model_dir, tmp_path, quantization, layer) -> None:
    config = method_config("dora", quantization=quantization, max_steps=1, eval_steps=0, batch_size=1)
    built = rows_for(smol_tokenizer, config)
    result = run_training(config, str(tiny_model_dir), {"train": built[:1]}, tmp_path / "run")
    assert result.metrics["steps"] == 1
    layers = [m for m in result.model.modules() if type(m).__name__ == layer and hasattr(m, "lora_A")]
    assert layers and all("default" in m.lora_magnitude_vector for m in layers)  # DoRA's magnitude, quantized


# --- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "overrides", "message"), [
    ("prompt_tuning", {"num_virtual_tokens": None}, "num_virtual_tokens: prompt_tuning needs a positive number"),
    ("prefix_tuning", {"num_virtual_tokens": 0}, "num_virtual_tokens: prefix_tuning needs a positive number"),
    ("prompt_tuning", {"num_virtual_tokens": 1000},
     "num_virtual_tokens: 1000 virtual [+] 32 new tokens leave no room for a prompt in the 1024-token"),
    ("lora", {"num_virtual_tokens": 8}, "num_virtual_tokens: applies to prompt_tuning and prefix_tuning only"),
    ("ia3", {"feedforward_modules": None}, "feedforward_modules: ia3 needs the feed-forward modules"),
    ("ia3", {"feedforward_modules": ["down_proj", "up_proj"]},
     "feedforward_modules: up_proj not in target_modules [(]k_proj, v_proj, down_proj[)]"),
    ("dora", {"feedforward_modules": ["down_proj"]}, "feedforward_modules: applies to ia3 only, not dora"),
    ("ia3", {"target_modules": [], "feedforward_modules": []}, "target_modules: ia3 needs at least one module"),
    ("ia3", {"quantization": "4bit"}, "quantization: ia3 trains on an unquantized base, not '4bit'$"),
    ("lora", {"quantization": "4bit"}, "quantization: lora trains on an unquantized base.*use method qlora"),
    ("qlora", {"quantization": "8bit"}, "quantization: qlora trains on a 4-bit base, not '8bit' .use method lora-8bit"),
    ("lora", {"prompt_init_text": "Answer"}, "prompt_init_text: applies to prompt_tuning and prefix_tuning only"),
    ("prefix_tuning", {"prompt_init_text": "Answer", "prefix_projection": True}, "not with prefix_projection"),
    ("prompt_tuning", {"prompt_init_text": " "}, "prompt_init_text: empty"),
    ("prompt_tuning", {"prefix_projection": True}, "prefix_projection: applies to prefix_tuning only"),
    ("prompt_tuning", {"lora_layers": 2}, "lora_layers: applies to lora and dora only"),
    ("prefix_tuning", {"gradient_checkpointing": True}, "gradient_checkpointing: not with prefix_tuning"),
])
def test_config_validation_names_the_setting(method, overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        method_config(method, **overrides)


def test_unknown_method_lists_the_known_ones(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("method: adalora\ntrain_files: [a]\n")
    with pytest.raises(ValueError, match=r"c\.yaml: method: Input should be 'lora', 'qlora', 'lora-8bit', 'dora', "
                                         r"'ia3', 'prompt_tuning' or 'prefix_tuning', got 'adalora'"):
        TrainConfig.from_yaml(path)


def test_dora_composes_with_4bit_and_8bit() -> None:
    assert method_config("dora", quantization="4bit").base_quantization == "4bit"
    assert method_config("dora", quantization="8bit").base_quantization == "8bit"
    assert method_config("qlora").base_quantization == "4bit" and method_config("dora").base_quantization == "none"


def test_committed_training_configs_load_with_their_methods() -> None:
    methods = {}
    for path in sorted((REPO / "configs" / "train").glob("*.yaml")):
        if not re.search(r"^method:", path.read_text(encoding="utf-8"), re.MULTILINE):
            continue  # a reranker's or an embedder's config, not the generator's
        methods[path.name] = TrainConfig.from_yaml(path).method
    expected = {"lora", "qlora", "lora-8bit", "dora", "ia3", "prompt_tuning", "prefix_tuning"}
    assert expected <= set(methods.values()), methods
    shipped = TrainConfig.from_yaml(REPO / "configs" / "train" / "smollm2-squad.yaml")
    for method in ("qlora", "lora-8bit", "dora", "ia3", "prompt-tuning", "prefix-tuning"):
        config = TrainConfig.from_yaml(REPO / "configs" / "train" / f"smollm2-squad-{method}.yaml")
        # the same data, window and budget as the shipped LoRA config: the methods compare on equal footing
        for field in ("train_files", "train_rows", "validation_rows", "context_window", "seed", "time_budget_minutes"):
            assert getattr(config, field) == getattr(shipped, field), (method, field)


@pytest.mark.parametrize("init_text", ["Answer from the passages.", None])
def test_a_prefix_started_from_text_reads_as_that_text(tiny_model_dir, init_text) -> None:
    """prefix_tuning with prompt_init_text starts as the base model reading that text (repeated to fill the
    prefix) before every prompt: its keys and values, at their positions, so the first logits are the base's
    over text + prompt. peft's random start (None) is not."""
    from generation.finetune.train import load_trainable

    config = method_config("prefix_tuning", base_model=str(tiny_model_dir), prompt_init_text=init_text)
    model, loaded = load_trainable(config, str(tiny_model_dir), "cpu")
    n = config.virtual_tokens
    text_ids = loaded.tokenizer("Answer from the passages.", add_special_tokens=False).input_ids
    prefix = (text_ids * (n // len(text_ids) + 1))[:n]
    prompt = loaded.tokenizer("When did the harbor of Lumen open?", add_special_tokens=False).input_ids
    with torch.no_grad():
        adapted = model(input_ids=torch.tensor([prompt])).logits[0]
        with model.disable_adapter():
            base = model(input_ids=torch.tensor([prefix + prompt])).logits[0, n:]
    assert adapted.shape == base.shape
    assert torch.allclose(adapted, base, atol=1e-4) == (init_text is not None)
