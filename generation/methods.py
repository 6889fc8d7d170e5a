"""The PEFT methods an adapter may be trained with, and what each allows at serving.

One table, read by the training config (validation), the trainer (which peft config to build), the
registry's metadata check (the method recorded must be the one the adapter's files hold) and the loaders
(merging, vLLM). An adapter's files say which peft type they hold (``adapter_config.json``: ``peft_type``,
``use_dora``); its metadata says which of these methods trained it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Method = Literal["lora", "qlora", "lora-8bit", "dora", "ia3", "prompt_tuning", "prefix_tuning"]
Quantization = Literal["none", "4bit", "8bit"]


@dataclass(frozen=True)
class MethodSpec:
    peft_type: str  # adapter_config.json's peft_type
    use_dora: bool = False
    quantization: Quantization = "none"  # the base it trains on by default
    quantizations: tuple[Quantization, ...] = ("none",)  # the bases it may train on
    mergeable: bool = True  # peft's merge_and_unload folds it into the base weights
    vllm: bool = False  # vLLM serves it (LoRA modules only)
    virtual_tokens: bool = False  # prompt learning: virtual tokens prepended to every sequence


METHODS: dict[str, MethodSpec] = {
    "lora": MethodSpec("LORA", vllm=True),
    "qlora": MethodSpec("LORA", quantization="4bit", quantizations=("4bit",), vllm=True),
    "lora-8bit": MethodSpec("LORA", quantization="8bit", quantizations=("8bit",), vllm=True),
    # peft's bitsandbytes LoRA layers take DoRA's magnitude vector on both 4-bit and 8-bit bases
    "dora": MethodSpec("LORA", use_dora=True, quantizations=("none", "4bit", "8bit")),
    "ia3": MethodSpec("IA3"),
    "prompt_tuning": MethodSpec("PROMPT_TUNING", mergeable=False, virtual_tokens=True),
    "prefix_tuning": MethodSpec("PREFIX_TUNING", mergeable=False, virtual_tokens=True),
}
MERGEABLE = [name for name, spec in METHODS.items() if spec.mergeable]


def method_spec(method: str) -> MethodSpec:
    try:
        return METHODS[method]
    except KeyError:
        raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}") from None


def peft_kind(adapter_config: dict[str, Any]) -> str:
    """What an adapter's files hold, as a method family: ``LORA``, ``LORA+DoRA``, ``IA3``, ``PROMPT_TUNING``..."""
    peft_type = str(adapter_config.get("peft_type") or "unknown")
    return f"{peft_type}+DoRA" if peft_type == "LORA" and adapter_config.get("use_dora") else peft_type


def spec_kind(spec: MethodSpec) -> str:
    return f"{spec.peft_type}+DoRA" if spec.use_dora else spec.peft_type


def serving_problem(method: str, where: str, *, merge: bool, quantization: str, backend: str) -> str | None:
    """Why an adapter trained with ``method`` cannot be served this way (None: it can)."""
    spec = method_spec(method)
    if backend == "vllm" and not spec.vllm:
        return (f"adapter {where} was trained with {method}; vLLM serves LoRA adapters only (lora, qlora, lora-8bit): "
                "serve it with RAG_GENERATOR_BACKEND=transformers")
    if merge and not spec.mergeable:
        return (f"adapter {where} was trained with {method}, whose virtual tokens cannot be merged into the base "
                f"weights (merging works for {', '.join(MERGEABLE)}): set RAG_MERGE_ADAPTER=false")
    if merge and spec.peft_type == "IA3" and quantization != "none":
        return (f"adapter {where}: peft cannot merge IA3 into a {quantization} base: "
                "set RAG_MERGE_ADAPTER=false or RAG_QUANTIZATION=none")
    return None
