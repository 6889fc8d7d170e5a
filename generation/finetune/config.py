"""The training configuration: one flat, typed block of defaults, read from a YAML file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import pydantic
import yaml

from generation.methods import METHODS, Method, Quantization, method_spec

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

ConfigT = TypeVar("ConfigT", bound="DataclassInstance")

BASES = {"none": "an unquantized", "4bit": "a 4-bit", "8bit": "an 8-bit"}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    # --- what is trained ------------------------------------------------------------------------
    name: str = "adapter"  # registry name of the adapter
    base_model: str = "bundled:SmolLM2-135M-Instruct"
    # lora, dora (LoRA with weight decomposition), ia3, prompt_tuning, prefix_tuning (generation/methods.py);
    # qlora: LoRA on a 4-bit NF4 + double quant base; lora-8bit: LoRA on an LLM.int8() base
    method: Method = "lora"
    quantization: Quantization | None = None  # dora only: its base ("none", "4bit", "8bit"); others imply theirs
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # 4-bit compute / LoRA dtype
    context_window: int = 2048  # RoPE scaling derived from it exactly as at serving
    max_new_tokens: int = 64  # the serving answer budget: prompts are packed to window - this
    # --- LoRA -----------------------------------------------------------------------------------
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    bias: Literal["none", "all", "lora_only"] = "none"
    lora_layers: int | None = None  # LoRA on the top N decoder layers only (None: all layers)
    # target_modules above are IA3's too; of them, those whose input (not output) is scaled: IA3's feed-forward
    feedforward_modules: list[str] | None = None  # ia3 only, and required there
    # --- prompt and prefix tuning -------------------------------------------------------------------
    num_virtual_tokens: int | None = None  # prompt_tuning, prefix_tuning only, and required there
    # prompt_tuning: start the virtual tokens from this text's embeddings; prefix_tuning (without projection): from
    # its key/value activations in every layer (Li & Liang 2021, 7.2). None: a random start.
    prompt_init_text: str | None = None
    prefix_projection: bool = False  # prefix_tuning: reparametrize the prefix through a 2-layer MLP
    # --- optimisation ---------------------------------------------------------------------------
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"  # any transformers scheduler, or cosine_time (needs time_budget_minutes)
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 1  # rows per micro-batch (a row is one context with several questions)
    grad_accumulation: int = 4
    gradient_checkpointing: bool = False
    max_seq_length: int = 2048  # a packed row (context + its questions and answers) is cut to this
    seed: int = 42
    eval_steps: int = 25
    save_best: bool = True  # keep the checkpoint with the lowest validation loss
    time_budget_minutes: float | None = None  # stop training (cleanly) after this long
    num_threads: int | None = None  # torch CPU threads (None: torch's default)
    logging_steps: int = 5
    # --- data -----------------------------------------------------------------------------------
    train_files: list[str] = field(default_factory=list)  # SQuAD JSON (v1.1 / v2.0) or JSONL
    validation_articles: int = 2  # held-out articles of the training files, for the best checkpoint
    validation_rows: int = 8
    train_rows: int = 400  # contexts built (each with up to questions_per_row questions)
    context_chunks: list[int] = field(default_factory=lambda: [3, 5])  # chunks per retrieved context, min..max
    gold_only_fraction: float = 0.2  # contexts holding the gold paragraph alone (as in gold-mode eval)
    no_gold_fraction: float = 0.1  # contexts of distractors only: the paragraph's questions -> "I don't know."
    questions_per_row: int = 6
    impossible_per_row: int = 2  # SQuAD 2.0 unanswerable questions per row at most
    off_topic_fraction: float = 0.0  # contexts from other articles only (out of corpus) -> "I don't know."
    output_dir: str = "runs"  # checkpoints and logs; the adapter goes to the registry

    @classmethod
    def from_yaml(cls, path: Path, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        config = read_yaml_config(cls, path, overrides)
        try:
            config.validate()
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None  # name the file, as read_yaml_config's errors do
        return config

    @property
    def base_quantization(self) -> Quantization:
        """The quantization of the base the adapter trains on."""
        return self.quantization or method_spec(self.method).quantization

    @property
    def virtual_tokens(self) -> int:
        """Positions the method's virtual tokens take at the start of every sequence (0 for LoRA, DoRA, IA3)."""
        return (self.num_virtual_tokens or 0) if method_spec(self.method).virtual_tokens else 0

    @property
    def prompt_window(self) -> int:
        """The window the service's prompt and answer get: the context window less the virtual tokens."""
        return self.context_window - self.virtual_tokens

    def validate(self) -> None:
        spec = method_spec(self.method)
        if self.max_new_tokens >= self.context_window:
            raise ValueError("max_new_tokens must be smaller than context_window")
        self._validate_method()
        if spec.virtual_tokens and self.max_new_tokens + self.virtual_tokens >= self.context_window:
            raise ValueError(f"num_virtual_tokens: {self.num_virtual_tokens} virtual + {self.max_new_tokens} new "
                             f"tokens leave no room for a prompt in the {self.context_window}-token context_window")
        lo, hi = self.context_chunks
        if not 1 <= lo <= hi:
            raise ValueError(f"context_chunks: expected [min, max] with 1 <= min <= max, got {self.context_chunks}")
        fractions = (self.gold_only_fraction, self.no_gold_fraction, self.off_topic_fraction)
        if min(fractions) < 0 or sum(fractions) > 1:
            raise ValueError("gold_only_fraction, no_gold_fraction and off_topic_fraction must be >= 0 "
                             "and sum to at most 1")
        if self.lr_scheduler == "cosine_time" and not self.time_budget_minutes:
            raise ValueError("lr_scheduler cosine_time needs time_budget_minutes")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ValueError("set epochs > 0 or max_steps > 0")

    def _validate_method(self) -> None:
        """Each method's own settings; a setting of another method is an error, not silently ignored."""
        method, spec = self.method, method_spec(self.method)
        if self.quantization is not None and self.quantization not in spec.quantizations:
            implied = [name for name, other in METHODS.items()
                       if other.quantization == self.quantization and other.peft_type == spec.peft_type]
            hint = f" (use method {implied[0]})" if implied else ""
            bases = " or ".join(BASES[q] for q in spec.quantizations)
            raise ValueError(f"quantization: {method} trains on {bases} base, not {self.quantization!r}{hint}")
        lora = spec.peft_type == "LORA"
        if not lora and self.lora_layers is not None:
            raise ValueError(f"lora_layers: applies to lora and dora only, not {method}")
        if spec.peft_type == "IA3":
            if self.feedforward_modules is None:
                raise ValueError("feedforward_modules: ia3 needs the feed-forward modules among target_modules "
                                 "(for LLaMA: [down_proj]; [] for none)")
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(f"feedforward_modules: {', '.join(extra)} not in target_modules "
                                 f"({', '.join(self.target_modules)}); IA3's feed-forward modules are a subset of them")
        elif self.feedforward_modules is not None:
            raise ValueError(f"feedforward_modules: applies to ia3 only, not {method}")
        if (lora or spec.peft_type == "IA3") and not self.target_modules:
            raise ValueError(f"target_modules: {method} needs at least one module")
        if spec.virtual_tokens:
            if self.num_virtual_tokens is None or self.num_virtual_tokens < 1:
                raise ValueError(f"num_virtual_tokens: {method} needs a positive number of virtual tokens, "
                                 f"got {self.num_virtual_tokens!r}")
        elif self.num_virtual_tokens is not None:
            raise ValueError(f"num_virtual_tokens: applies to prompt_tuning and prefix_tuning only, not {method}")
        if self.prompt_init_text is not None and not spec.virtual_tokens:
            raise ValueError(f"prompt_init_text: applies to prompt_tuning and prefix_tuning only, not {method}")
        if self.prompt_init_text is not None and self.prefix_projection and method == "prefix_tuning":
            raise ValueError("prompt_init_text: not with prefix_projection (the projection's input is not a key/value)")
        if self.prompt_init_text is not None and not self.prompt_init_text.strip():
            raise ValueError("prompt_init_text: empty; leave it unset for a random start")
        if self.prefix_projection and method != "prefix_tuning":
            raise ValueError(f"prefix_projection: applies to prefix_tuning only, not {method}")
        if self.gradient_checkpointing and method == "prefix_tuning":
            # the prefix lives in the KV cache, which each recomputed layer would extend a second time
            raise ValueError("gradient_checkpointing: not with prefix_tuning (its prefix is the KV cache)")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_yaml_config(cls: type[ConfigT], path: Path, overrides: dict[str, Any] | None = None) -> ConfigT:
    """A flat dataclass config from a YAML mapping plus ``overrides``; unknown keys are an error naming the file."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings")
    data.update(overrides or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    # pydantic checks each value against its field's type and converts what is meant: YAML 1.1 reads `1e-3`
    # (no dot) as a string, which the optimizer would otherwise meet deep inside training
    try:
        config: ConfigT = pydantic.TypeAdapter(cls).validate_python(data)
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}, got {e['input']!r}" for e in exc.errors())
        raise ValueError(f"{path}: {problems}") from None
    return config
