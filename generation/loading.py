"""Load the generator: base model, RoPE position interpolation, optional bitsandbytes quantization, a PEFT adapter
(LoRA, QLoRA, DoRA, IA3, prompt or prefix tuning; see generation/methods.py).

RoPE scaling is derived by one function, :func:`apply_rope_scaling`, used at serving and at training
time, so an adapter trained with a context window is served with exactly the same positions. It is a
pure function of (native context, requested window): pass the same ``context_window`` to both.

transformers 5 reads RoPE settings from ``config.rope_parameters`` (``rope_type``, ``factor`` and
``rope_theta`` together). The v4 way, ``config.rope_scaling = {"type": "linear", "factor": 2}`` or a
``rope_scaling=`` / ``rope_parameters=`` kwarg to ``from_pretrained``, drops ``rope_theta`` and the
model fails to build; so the whole dict is written here, ``rope_theta`` copied from the base config.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from generation.grounding import Thresholds
from generation.methods import Quantization
from generation.prompt import PROMPT_TEMPLATE_VERSION

if TYPE_CHECKING:
    from generation.generate import GenerationResult
    from generation.prompt import PackedPrompt


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Scalings a checkpoint may ship itself (Llama 3.1 "llama3", YaRN, ...): kept, never stacked on.
_OWN_SCALING_MESSAGE = (
    "{name} already uses RoPE scaling {rope_type!r} up to {native} positions; "
    "a context window of {window} would need stacking linear interpolation on it, which is not supported"
)


def rope_scaling_for(native_positions: int, context_window: int) -> dict[str, Any] | None:
    """Linear position interpolation needed to stretch ``native_positions`` to ``context_window``.

    None when the window fits. LLaMA-2: 4096 -> 8192 gives ``{"rope_type": "linear", "factor": 2.0}``.
    """
    if native_positions <= 0 or context_window <= 0:
        raise ValueError("positions and context window must be positive")
    if context_window <= native_positions:
        return None
    return {"rope_type": "linear", "factor": context_window / native_positions}


def native_context(config: Any) -> int:
    """Positions the checkpoint handles before any scaling applied by :func:`apply_rope_scaling`."""
    rope = getattr(config, "rope_parameters", None) or {}
    recorded = getattr(config, "original_max_position_embeddings", None)
    if rope.get("rope_type") == "linear" and recorded:
        return int(recorded)  # scaled by apply_rope_scaling earlier (e.g. a merged, saved model)
    return int(config.max_position_embeddings)


def apply_rope_scaling(config: Any, context_window: int) -> dict[str, Any] | None:
    """Set linear RoPE interpolation on ``config`` (in place) so it serves ``context_window`` positions.

    Returns the scaling written (None when the window fits the native positions). When scaling:
    ``rope_parameters`` becomes ``{"rope_type": "linear", "factor": window / native, "rope_theta": ...}``,
    ``max_position_embeddings`` becomes ``context_window`` and the native length is recorded as
    ``original_max_position_embeddings`` so a saved, scaled config is recognised on reload.
    """
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if not rope or "rope_theta" not in rope:
        raise ValueError(f"{type(config).__name__} has no flat rope_parameters; RoPE scaling unsupported")
    rope_type = rope.get("rope_type", "default")
    native = native_context(config)
    ours = rope_type == "linear" and getattr(config, "original_max_position_embeddings", None)
    if rope_type != "default" and not ours:
        if context_window > native:
            raise ValueError(
                _OWN_SCALING_MESSAGE.format(
                    name=type(config).__name__, rope_type=rope_type, native=native, window=context_window
                )
            )
        return None

    scaling = rope_scaling_for(native, context_window)
    base = {"rope_type": "default", "rope_theta": rope["rope_theta"]}
    if "partial_rotary_factor" in rope:
        base["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if scaling is None:
        if ours:  # an earlier scaling is undone: the result depends on (native, window) only
            config.rope_parameters = base
            config.max_position_embeddings = native
            del config.original_max_position_embeddings
        return None
    config.rope_parameters = {**base, **scaling}
    config.max_position_embeddings = context_window
    config.original_max_position_embeddings = native
    config.validate_rope()
    return dict(scaling)


@dataclass
class LoadedGenerator:
    model: Any
    tokenizer: Any
    model_name: str
    native_context: int
    # the window prompts are packed into: the configured one less a prompt/prefix-tuning adapter's virtual tokens
    context_window: int
    rope_scaling: dict[str, Any] | None
    quantization: str
    adapter_path: str | None
    # Logits the abstention must win by on the first answer token (see generate.AbstainMargin);
    # calibrated per adapter (its metadata), 0 for the base model.
    abstain_margin: float = 0.0
    # When an answer counts as grounded (generation/grounding.py); calibrated per adapter (its metadata).
    grounding: Thresholds = field(default_factory=Thresholds)
    adapter_name: str | None = None  # the registry label (name@version) served, None for the base model
    # The system prompt its prompts are packed with (generation.prompt.SYSTEM_PROMPTS): the adapter's, else current.
    prompt_template_version: str = PROMPT_TEMPLATE_VERSION
    backend: str = "transformers"
    virtual_tokens: int = 0  # positions a prompt/prefix-tuning adapter's virtual tokens take before every prompt

    def generate(self, packed: PackedPrompt, *, max_new_tokens: int, timeout_s: float | None = None,
                 abstain_margin: float | None = None, on_text: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None) -> GenerationResult:
        """The generator interface every backend offers (generation.generate.Generator; see
        generation.generate.generate_answer for the arguments)."""
        from generation.generate import generate_answer

        return generate_answer(self, packed, max_new_tokens=max_new_tokens, timeout_s=timeout_s,
                               abstain_margin=abstain_margin, on_text=on_text, cancel=cancel)


def bnb_config(quantization: Quantization, device: str) -> Any:
    """bitsandbytes settings: 4-bit NF4 with double quantization, or LLM.int8()."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        compute = torch.bfloat16 if device.startswith("cuda") else torch.float32
        return BitsAndBytesConfig(  # type: ignore[no-untyped-call]  # transformers leaves __init__ unannotated
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]  # as above
    raise ValueError(f"unknown quantization {quantization!r}; expected 'none', '4bit' or '8bit'")


def load_generator(
    model_name_or_path: str,
    *,
    context_window: int,
    quantization: Quantization = "none",
    torch_dtype: str | torch.dtype = "auto",
    device: str = "cpu",
    adapter_path: str | None = None,
    merge_adapter: bool = False,
) -> LoadedGenerator:
    """Load tokenizer and causal LM, RoPE-scaled to ``context_window``, in eval mode.

    ``model_name_or_path`` is a folder or hub id (resolve ``bundled:`` names first with
    :func:`generation.bundled.resolve_generator_model`). Merging an adapter into a 4/8-bit model
    re-quantizes the merged weights, which is lossy; prompt and prefix tuning cannot be merged (ValueError).
    A prompt/prefix-tuning adapter's virtual tokens take the first positions of the window: the returned
    ``context_window`` is what is left for the prompt and the answer.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_name_or_path)
    native = native_context(config)
    scaling = apply_rope_scaling(config, context_window)

    kwargs: dict[str, Any] = {"config": config}
    dtype = _DTYPES[torch_dtype] if isinstance(torch_dtype, str) and torch_dtype != "auto" else torch_dtype
    kwargs["dtype"] = dtype  # transformers 5 name; torch_dtype= is deprecated there
    if quantization != "none":
        kwargs["quantization_config"] = bnb_config(quantization, device)
        kwargs["device_map"] = {"": device}
    model: Any = AutoModelForCausalLM.from_pretrained(model_name_or_path, **kwargs)  # or a PeftModel around it
    if quantization == "none":
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)

    virtual_tokens = 0
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path)
        config = model.active_peft_config
        if config.is_prompt_learning:
            if merge_adapter:
                raise ValueError(f"adapter {adapter_path}: {config.peft_type.value} adds virtual tokens, which cannot "
                                 "be merged into the base weights; load it unmerged")
            virtual_tokens = int(config.num_virtual_tokens)
            _name_cache_for_peft(model)
        elif merge_adapter:
            model = model.merge_and_unload()
    model.eval()
    return LoadedGenerator(
        model=model,
        tokenizer=tokenizer,
        model_name=model_name_or_path,
        native_context=native,
        context_window=context_window - virtual_tokens,
        rope_scaling=scaling,
        quantization=quantization,
        adapter_path=adapter_path,
        virtual_tokens=virtual_tokens,
    )


def _name_cache_for_peft(model: Any) -> None:
    """Make a prompt- or prefix-tuning PeftModel's ``generate`` see its virtual tokens exactly once.

    peft 0.21 looks for the KV cache under ``past_key_values``; transformers 5 generation passes it as
    ``cache``. Unpatched, peft finds no cache at every step: a prefix it injects is dropped (the model
    takes ``cache``), and prompt embeddings are prepended again before every new token. Each generation
    step here hands peft the cache under the old name and the model peft's answer under the new one.
    """
    peft_prepare = model.prepare_inputs_for_generation

    def prepare(*args: Any, **kwargs: Any) -> dict[str, Any]:
        base_prepare = model.base_model_prepare_inputs_for_generation

        def renamed(*a: Any, **k: Any) -> dict[str, Any]:
            inputs: dict[str, Any] = base_prepare(*a, **k)
            if "cache" in inputs:
                inputs["past_key_values"] = inputs.pop("cache")
            return inputs

        model.base_model_prepare_inputs_for_generation = renamed
        try:
            inputs: dict[str, Any] = peft_prepare(*args, **kwargs)
        finally:
            model.base_model_prepare_inputs_for_generation = base_prepare
        if "past_key_values" in inputs:
            inputs["cache"] = inputs.pop("past_key_values")
        return inputs

    model.prepare_inputs_for_generation = prepare
