"""The training configuration: one flat, typed block of defaults, read from a YAML file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import yaml

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

ConfigT = TypeVar("ConfigT", bound="DataclassInstance")

Method = Literal["lora", "qlora", "lora-8bit"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    # --- what is trained ------------------------------------------------------------------------
    name: str = "adapter"  # registry name of the adapter
    base_model: str = "bundled:SmolLM2-135M-Instruct"
    method: Method = "lora"  # qlora: 4-bit NF4 + double quant base; lora-8bit: LLM.int8() base
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
    output_dir: str = "runs"  # checkpoints and logs; the adapter goes to the registry

    @classmethod
    def from_yaml(cls, path: Path, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        config = read_yaml_config(cls, path, overrides)
        config.validate()
        return config

    def validate(self) -> None:
        if self.method not in ("lora", "qlora", "lora-8bit"):
            raise ValueError(f"method: {self.method!r} is not one of lora, qlora, lora-8bit")
        if self.max_new_tokens >= self.context_window:
            raise ValueError("max_new_tokens must be smaller than context_window")
        lo, hi = self.context_chunks
        if not 1 <= lo <= hi:
            raise ValueError(f"context_chunks: expected [min, max] with 1 <= min <= max, got {self.context_chunks}")
        if not 0 <= self.gold_only_fraction + self.no_gold_fraction <= 1:
            raise ValueError("gold_only_fraction + no_gold_fraction must lie in [0, 1]")
        if self.lr_scheduler == "cosine_time" and not self.time_budget_minutes:
            raise ValueError("lr_scheduler cosine_time needs time_budget_minutes")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ValueError("set epochs > 0 or max_steps > 0")

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
    return cls(**data)
