"""Generator loading: RoPE interpolation reaching the rotary embedding, LoRA adapters, bitsandbytes."""

from __future__ import annotations

import warnings

import pytest
import torch

from generation.loading import apply_rope_scaling, load_generator, native_context, rope_scaling_for
from tests.generation.conftest import NATIVE, ROPE_THETA, tiny_llama_config


def test_rope_scaling_for() -> None:
    assert rope_scaling_for(4096, 4096) is None
    assert rope_scaling_for(4096, 2048) is None
    assert rope_scaling_for(4096, 8192) == {"rope_type": "linear", "factor": 2.0}
    assert rope_scaling_for(2048, 3072) == {"rope_type": "linear", "factor": 1.5}
    with pytest.raises(ValueError):
        rope_scaling_for(0, 8192)


@pytest.fixture(scope="module")
def unscaled(tiny_model_dir):
    return load_generator(str(tiny_model_dir), context_window=NATIVE)


@pytest.fixture(scope="module")
def scaled(tiny_model_dir):
    return load_generator(str(tiny_model_dir), context_window=2 * NATIVE)


def test_no_scaling_when_window_fits(unscaled, tiny_model_dir) -> None:
    small = load_generator(str(tiny_model_dir), context_window=1024)
    for loaded in (unscaled, small):
        assert loaded.rope_scaling is None
        assert loaded.native_context == NATIVE
        config = loaded.model.config
        assert config.rope_parameters["rope_type"] == "default"
        assert config.max_position_embeddings == NATIVE
    torch.testing.assert_close(small.model.model.rotary_emb.inv_freq, unscaled.model.model.rotary_emb.inv_freq)


def test_linear_rope_factor_two_is_used_by_the_rotary_embedding(scaled, unscaled) -> None:
    assert scaled.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert scaled.native_context == NATIVE and scaled.context_window == 2 * NATIVE
    config = scaled.model.config
    assert config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": ROPE_THETA}
    assert config.max_position_embeddings == 2 * NATIVE

    rotary, base = scaled.model.model.rotary_emb, unscaled.model.model.rotary_emb
    assert rotary.rope_type == "linear" and rotary.attention_scaling == 1.0
    torch.testing.assert_close(rotary.inv_freq, base.inv_freq / 2.0)
    # position interpolation: position 2p under factor 2 rotates exactly like position p natively
    x = torch.zeros(1, 1, 16)
    positions = torch.arange(0, 8000, 7)[None, :]  # (1, n)
    cos_s, sin_s = rotary(x, positions)
    cos_b, sin_b = base(x, positions // 2)
    even = (positions % 2 == 0)[0]
    torch.testing.assert_close(cos_s[:, even], cos_b[:, even], atol=1e-5, rtol=0)
    torch.testing.assert_close(sin_s[:, even], sin_b[:, even], atol=1e-5, rtol=0)

    ids = torch.randint(0, 1000, (1, 64))
    with torch.inference_mode():
        assert not torch.allclose(scaled.model(ids).logits, unscaled.model(ids).logits)


def test_apply_rope_scaling_is_idempotent_across_save_and_reload(tiny_model_dir, tmp_path) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert apply_rope_scaling(config, 8192) == {"rope_type": "linear", "factor": 2.0}
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)  # e.g. a merged model saved after training
    assert native_context(reloaded) == NATIVE
    assert apply_rope_scaling(reloaded, 8192) == {"rope_type": "linear", "factor": 2.0}  # not 4.0
    assert reloaded.rope_parameters["rope_theta"] == ROPE_THETA
    assert apply_rope_scaling(reloaded, 16384)["factor"] == 4.0
    assert apply_rope_scaling(reloaded, 2048) is None
    assert reloaded.rope_parameters == {"rope_type": "default", "rope_theta": ROPE_THETA}
    assert reloaded.max_position_embeddings == NATIVE


def test_checkpoint_with_its_own_rope_scaling_is_kept_not_stacked(smol_tokenizer) -> None:
    llama3 = {
        "rope_type": "llama3", "factor": 8.0, "rope_theta": ROPE_THETA, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 1024,
    }
    config = tiny_llama_config(smol_tokenizer, max_position_embeddings=8192, rope_parameters=llama3)
    assert apply_rope_scaling(config, 8192) is None
    assert config.rope_parameters["rope_type"] == "llama3"
    with pytest.raises(ValueError, match="llama3"):
        apply_rope_scaling(config, 16384)


def test_prompt_beyond_native_length_runs_through_scaled_model(scaled) -> None:
    ids = torch.randint(0, 1000, (1, NATIVE + 904))  # 5000 positions
    with torch.inference_mode():
        # logits_to_keep=1: full (5000, 49152) logits would cost ~1 GB and most of the time
        out = scaled.model(ids, logits_to_keep=1, output_hidden_states=True)
    assert out.logits.shape == (1, 1, scaled.model.config.vocab_size)
    assert out.hidden_states[-1].shape[1] == NATIVE + 904
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.hidden_states[-1]).all()


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False,  # random, nonzero B: the adapter changes the output
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    ids = torch.randint(0, 1000, (1, 48))
    model.eval()
    with torch.inference_mode():
        logits = model(ids).logits
    return out, ids, logits


def test_lora_adapter_reloads_to_identical_logits_and_merges(tiny_model_dir, adapter_dir, unscaled) -> None:
    path, ids, expected = adapter_dir
    loaded = load_generator(str(tiny_model_dir), context_window=NATIVE, adapter_path=str(path))
    merged = load_generator(str(tiny_model_dir), context_window=NATIVE, adapter_path=str(path), merge_adapter=True)
    assert loaded.adapter_path == str(path)
    assert not loaded.model.training
    with torch.inference_mode():
        got = loaded.model(ids).logits
        got_merged = merged.model(ids).logits
        base = unscaled.model(ids).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    torch.testing.assert_close(got_merged, got, atol=1e-4, rtol=0)
    assert (got - base).abs().max() > 1e-3  # the adapter is not a no-op
    assert not hasattr(merged.model, "peft_config")


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_bitsandbytes_quantized_loading_on_cpu(tiny_model_dir, quantization) -> None:
    import bitsandbytes as bnb

    loaded = load_generator(str(tiny_model_dir), context_window=2 * NATIVE, quantization=quantization)
    layer = loaded.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit if quantization == "4bit" else bnb.nn.Linear8bitLt)
    if quantization == "4bit":
        assert layer.weight.quant_type == "nf4"
        assert loaded.model.config.quantization_config.bnb_4bit_use_double_quant
    assert loaded.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert loaded.model.model.rotary_emb.rope_type == "linear"
    ids = torch.randint(0, 1000, (1, 32))
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 8-bit: "inputs will be cast from torch.float32 to float16"
        logits = loaded.model(ids).logits
    assert torch.isfinite(logits).all()
