"""Fixtures for generation tests: the real SmolLM2 tokenizer and tiny random LLaMA models built on it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NATIVE = 4096
ROPE_THETA = 500_000.0  # not the library default, so a dropped rope_theta shows up


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SmolLM2-135M-Instruct tokenizer (chat template included), read from the bundled GGUF once."""
    from transformers import AutoTokenizer

    from generation.bundled import BUNDLED_GENERATORS, bundled_gguf_path

    package, gguf_name, _ = BUNDLED_GENERATORS["bundled:SmolLM2-135M-Instruct"]
    path = bundled_gguf_path(package, gguf_name)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    out = tmp_path_factory.mktemp("smol_tokenizer")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smol_tokenizer(smol_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_tokenizer_dir)


def tiny_llama_config(tokenizer, **overrides):
    from transformers import LlamaConfig

    values = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=NATIVE,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer) -> Path:
    """A random 2-layer LLaMA (native 4096 positions) with the SmolLM2 vocabulary, saved with its tokenizer.

    The LM-head rows of the stop tokens are zero, so greedy decoding never ends a turn on its own and
    length / timeout stops are deterministic.
    """
    from transformers import GenerationConfig, LlamaForCausalLM

    from generation.prompt import stop_token_ids

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(smol_tokenizer))
    with torch.no_grad():
        for token_id in stop_token_ids(smol_tokenizer):
            model.lm_head.weight[token_id] = 0.0
    # sampling defaults like Llama-2's generation_config.json: generate_answer must stay greedy
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.6, top_p=0.9, eos_token_id=smol_tokenizer.eos_token_id
    )
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out)
    smol_tokenizer.save_pretrained(out)
    return out
