"""PEFT training (LoRA, QLoRA, DoRA, IA3, prompt and prefix tuning) with transformers' Trainer on
shared-prefix rows (see data.py), answer tokens only.

Memory: the 49k-word vocabulary's logits are computed only at the answer positions (the LM head runs on
the hidden states of the labelled positions, a few per question), never over the whole prompt.
Prompt and prefix tuning put V virtual tokens before every row: they take positions 0..V-1, every real
token attends to them, and the real tokens' hidden states (positions V..) are the ones scored, so labels,
branch masks and the answer-only head line up exactly as without them (see :func:`answer_hidden`).
The base model is loaded by :func:`generation.loading.load_generator`, the serving loader, so RoPE
scaling and quantization are exactly those of serving.
"""

from __future__ import annotations

import logging
import math
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from generation.finetune.config import TrainConfig
from generation.finetune.data import Row
from generation.methods import method_spec

log = logging.getLogger(__name__)


# --- batches -------------------------------------------------------------------------------------


class RowDataset(torch.utils.data.Dataset[Row]):
    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Row:
        return self.rows[index]


@dataclass
class RowCollator:
    """Rows -> padded tensors. ``segments``: 0 prefix, i >= 1 branch i, -1 padding."""

    pad_id: int

    def __call__(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        length = max(r.n_tokens for r in rows)
        batch = {name: torch.full((len(rows), length), fill, dtype=torch.long)
                 for name, fill in (("input_ids", self.pad_id), ("labels", -100), ("position_ids", 0),
                                    ("segments", -1))}
        for b, row in enumerate(rows):
            n = len(row.prefix)
            batch["input_ids"][b, :n] = torch.tensor(row.prefix)
            batch["position_ids"][b, :n] = torch.arange(n)
            batch["segments"][b, :n] = 0
            start = n
            for i, branch in enumerate(row.branches, start=1):
                m = len(branch["ids"])
                end = start + m
                batch["input_ids"][b, start:end] = torch.tensor(branch["ids"])
                batch["labels"][b, start:end] = torch.tensor(branch["labels"])
                batch["position_ids"][b, start:end] = torch.arange(n, n + m)  # as if alone after the prefix
                batch["segments"][b, start:end] = i
                start = end
        return batch


def branch_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool, True = may attend: causal, within the prefix or the query's own branch.

    A padding position attends to itself only (a row of all False would give NaN).
    """
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()  # (L, L)
    q, k = segments[:, :, None], segments[:, None, :]  # (B, L, 1), (B, 1, L)
    allowed = causal & ((k == 0) | (k == q)) & (k >= 0) & (q >= 0)
    allowed |= torch.eye(length, dtype=torch.bool, device=segments.device) & (q < 0)
    return allowed[:, None]


def attention_mask_for(lm: Any, allowed: torch.Tensor) -> torch.Tensor:
    """The 4D mask in the form the model's attention takes: bool for SDPA (any compute dtype), additive
    float32 (0 / min) for eager attention."""
    if getattr(lm.config, "_attn_implementation", "sdpa") != "eager":
        return allowed
    mask = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(torch.float32).min)


# --- the trainer ---------------------------------------------------------------------------------


def causal_lm(model: Any) -> Any:
    """The LlamaForCausalLM-like module inside a peft wrapper (LoRA layers injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def prompt_learning(model: Any) -> tuple[str | None, int]:
    """(peft type, virtual tokens) of a peft model's active prompt-learning adapter; (None, 0) otherwise."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return None, 0
    return str(config.peft_type.value), int(config.num_virtual_tokens)


def answer_hidden(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, L, H) final hidden states of a collated batch's real tokens, under the branch mask.

    With prompt tuning the virtual token embeddings are prepended (positions 0..V-1, segment 0: the shared
    prefix); with prefix tuning the virtual keys and values fill the cache before the row. Either way the
    real tokens sit at positions V.., as in peft's own forward and generate, and only their states return.
    """
    lm = causal_lm(model)
    input_ids, segments, positions = inputs["input_ids"], inputs["segments"], inputs["position_ids"]
    kind, n_virtual = prompt_learning(model)
    if kind is None:
        mask = attention_mask_for(lm, branch_mask(segments))
        hidden: torch.Tensor = lm.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                        use_cache=False).last_hidden_state
        return hidden
    batch, device = input_ids.shape[0], input_ids.device
    virtual_positions = torch.arange(n_virtual, device=device).expand(batch, n_virtual)  # (B, V)
    if kind == "PROMPT_TUNING":
        embeds = lm.get_input_embeddings()(input_ids)  # (B, L, H)
        prompts = model.get_prompt(batch_size=batch).to(embeds.dtype)  # (B, V, H)
        segments = torch.cat([torch.zeros_like(virtual_positions), segments], dim=1)  # (B, V+L)
        mask = attention_mask_for(lm, branch_mask(segments))
        hidden = lm.model(inputs_embeds=torch.cat([prompts, embeds], dim=1), attention_mask=mask,
                          position_ids=torch.cat([virtual_positions, positions + n_virtual], dim=1),
                          use_cache=False).last_hidden_state
        return hidden[:, n_virtual:]
    if kind == "PREFIX_TUNING":
        cache = model.get_prompt(batch_size=batch)  # a cache holding V positions per layer
        allowed = branch_mask(segments)  # (B, 1, L, L)
        prefix = torch.ones(*allowed.shape[:3], n_virtual, dtype=torch.bool, device=device)  # (B, 1, L, V)
        mask = attention_mask_for(lm, torch.cat([prefix, allowed], dim=-1))  # (B, 1, L, V+L)
        hidden = lm.model(input_ids=input_ids, attention_mask=mask, position_ids=positions + n_virtual,
                          cache=cache, use_cache=True).last_hidden_state
        return hidden
    raise ValueError(f"prompt-learning method {kind} is not supported here")


def answer_loss(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, argmax-correct flags, branch of each target) over the answer tokens only."""
    lm = causal_lm(model)
    hidden = answer_hidden(model, inputs)  # (B, L, H)
    target = inputs["labels"][:, 1:]  # (B, L-1): the token each position predicts
    keep = target != -100
    logits = lm.lm_head(hidden[:, :-1][keep]).float()  # (n_answer_tokens, V): the only logits computed
    loss = F.cross_entropy(logits, target[keep], reduction="sum")
    correct = logits.argmax(-1) == target[keep]
    segments = inputs["segments"][:, 1:]
    rows = torch.arange(segments.shape[0], device=segments.device)[:, None]  # (B, 1)
    branch = rows * (int(segments.max()) + 1) + segments  # (B, L-1): unique per (row, branch)
    return loss, correct, branch[keep]


class AnswerOnlyTrainer(Trainer):
    """Trainer whose loss is the mean over the answer tokens of the whole accumulated batch.

    ``time_budget_s`` with scheduler ``cosine_time``: the cosine decays over max(steps done / max_steps,
    time spent / budget), so a run on a busy machine still anneals to zero when its time is up.
    """

    loss_is_scaled_for_ga = True
    time_budget_s: float | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True  # so Trainer counts answer tokens over the accumulated batch
        self._eval_tokens = [0, 0]  # correct, total
        self._eval_answers = [0, 0]  # fully correct answers, answers
        self.train_tokens = 0  # real (unpadded) row tokens seen in training
        self.train_examples = 0  # questions (branches) seen in training

    def create_scheduler(self, num_training_steps: int,
                         optimizer: torch.optim.Optimizer | None = None) -> torch.optim.lr_scheduler.LRScheduler:
        if self.args.lr_scheduler_type != "constant" or self.time_budget_s is None:
            return super().create_scheduler(num_training_steps, optimizer)
        budget_s = self.time_budget_s
        warmup: int = self.args.get_warmup_steps(num_training_steps)
        started = time.perf_counter()

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = max(step / max(num_training_steps, 1), (time.perf_counter() - started) / budget_s)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        optimizer = optimizer or self.optimizer
        assert optimizer is not None, "the optimizer is created before the scheduler"
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        self.lr_scheduler = scheduler
        self._created_lr_scheduler = True
        return scheduler

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        loss, correct, branches = answer_loss(model, inputs)
        count = num_items_in_batch if num_items_in_batch is not None else max(int(correct.numel()), 1)
        loss = loss / count
        if model.training:
            self.train_tokens += int((inputs["segments"] >= 0).sum())
            self.train_examples += int(torch.unique(branches).numel())
        else:
            self._count_eval(correct, branches)
        return (loss, {"loss": loss}) if return_outputs else loss

    def _count_eval(self, correct: torch.Tensor, branches: torch.Tensor) -> None:
        self._eval_tokens[0] += int(correct.sum())
        self._eval_tokens[1] += int(correct.numel())
        # teacher-forced: an answer whose every token is the argmax is exactly what greedy decoding writes
        for value in torch.unique(branches):
            self._eval_answers[1] += 1
            self._eval_answers[0] += int(correct[branches == value].all())

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        self._eval_tokens, self._eval_answers = [0, 0], [0, 0]
        metrics = super().evaluate(*args, **kwargs)
        extra = {"eval_token_accuracy": self._eval_tokens[0] / max(self._eval_tokens[1], 1),
                 "eval_answer_match": self._eval_answers[0] / max(self._eval_answers[1], 1)}
        self.log(extra)
        metrics.update(extra)
        return metrics


# --- progress and time budget ----------------------------------------------------------------------


class BudgetAndThroughput(TrainerCallback):
    """Logs tokens/s and peak RSS; stops training cleanly once the time budget is spent."""

    def __init__(self, budget_minutes: float | None) -> None:
        self.budget_s = budget_minutes * 60 if budget_minutes else None
        self.trainer: AnswerOnlyTrainer | None = None  # set once the trainer exists
        self.started = time.perf_counter()
        self.stopped_early = False

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self.started = time.perf_counter()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> TrainerControl:
        if self.budget_s is not None and time.perf_counter() - self.started > self.budget_s:
            log.warning("time budget of %.0f min spent at step %d of %d: stopping", self.budget_s / 60,
                        state.global_step, state.max_steps)
            self.stopped_early = True
            control.should_training_stop = True
            # the last point counts for the best model
            control.should_evaluate = args.eval_strategy != "no"
            control.should_save = args.save_strategy != "no"
        return control

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs is not None and "loss" in logs:
            assert self.trainer is not None, "set once the trainer exists, before training"
            elapsed = time.perf_counter() - self.started
            logs["row_tokens_per_s"] = round(self.trainer.train_tokens / max(elapsed, 1e-9), 1)
            logs["peak_rss_mb"] = round(peak_rss_mb(), 1)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --- model ---------------------------------------------------------------------------------------


def peft_config(config: TrainConfig, model: Any, model_path: str) -> Any:
    """The peft configuration of ``config.method`` (validated by TrainConfig.validate)."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    spec = method_spec(config.method)
    if spec.peft_type == "LORA":
        n_layers = model.config.num_hidden_layers
        layers = None if not config.lora_layers else list(range(max(n_layers - config.lora_layers, 0), n_layers))
        return LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=list(config.target_modules), bias=config.bias, use_dora=spec.use_dora,
                          layers_to_transform=layers, task_type="CAUSAL_LM")
    if spec.peft_type == "IA3":
        return IA3Config(target_modules=list(config.target_modules),
                         feedforward_modules=list(config.feedforward_modules or []), task_type="CAUSAL_LM")
    if spec.peft_type == "PROMPT_TUNING":
        text = config.prompt_init_text
        return PromptTuningConfig(num_virtual_tokens=config.virtual_tokens, task_type="CAUSAL_LM",
                                  prompt_tuning_init="TEXT" if text else "RANDOM", prompt_tuning_init_text=text,
                                  tokenizer_name_or_path=model_path if text else None)
    if spec.peft_type == "PREFIX_TUNING":
        return PrefixTuningConfig(num_virtual_tokens=config.virtual_tokens, prefix_projection=config.prefix_projection,
                                  encoder_hidden_size=model.config.hidden_size, task_type="CAUSAL_LM")
    raise ValueError(f"method: {config.method!r} has no peft configuration")


def load_trainable(config: TrainConfig, model_path: str, device: str) -> tuple[Any, Any]:
    """(peft model, LoadedGenerator) with the method's adapter; the base exactly as served."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from generation.loading import load_generator

    quantization = config.base_quantization
    loaded = load_generator(model_path, context_window=config.context_window, quantization=quantization,
                            torch_dtype="float32" if quantization == "none" else config.compute_dtype,
                            device=device)
    model = loaded.model
    if quantization != "none":
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]  # unannotated in peft
            model, use_gradient_checkpointing=config.gradient_checkpointing)
    model = get_peft_model(model, peft_config(config, model, model_path))
    if config.method == "prefix_tuning" and config.prompt_init_text:
        init_prefix_from_text(model, loaded.tokenizer, config.prompt_init_text)
    if config.gradient_checkpointing:
        model.enable_input_require_grads()
    return model, loaded


def init_prefix_from_text(model: Any, tokenizer: Any, text: str) -> None:
    """Start a prefix-tuning prefix (no projection) from the base model's own keys and values of ``text``'s first
    tokens (repeated to fill the prefix), instead of peft's N(0, 1) draws, which sit far from any real
    activation. The adapted model then starts as the base model reading ``text`` before every prompt.

    peft's prefix is one row per virtual token, laid out as [layer][key, value][kv head][head dim] (see
    PeftModel.get_prompt); the cache's keys and values are (batch 1, kv heads, tokens, head dim)."""
    import torch

    n = model.active_peft_config.num_virtual_tokens
    ids = tokenizer(text, add_special_tokens=False).input_ids
    ids = (ids * (n // len(ids) + 1))[:n]
    with torch.no_grad(), model.disable_adapter():
        cache = model.get_base_model()(input_ids=torch.tensor([ids], device=model.device), use_cache=True)\
            .past_key_values
        rows = [tensor[0].permute(1, 0, 2).reshape(n, -1)  # (tokens, kv heads x head dim)
                for layer in cache.layers for tensor in (layer.keys, layer.values)]
        weight = model.prompt_encoder[model.active_adapter].embedding.weight
        weight.copy_(torch.cat(rows, dim=1).to(weight.dtype))


def parameter_counts(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as stored elements x 2."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def optimizer_name(config: TrainConfig) -> str:
    if config.base_quantization == "none":
        return "adamw_torch"
    if torch.cuda.is_available():
        return "paged_adamw_8bit"
    log.warning("%s: paged 8-bit AdamW needs CUDA; no CUDA device here, falling back to adamw_torch", config.method)
    return "adamw_torch"


def training_arguments(config: TrainConfig, run_dir: Path, n_rows: int) -> TrainingArguments:
    evaluate = config.eval_steps > 0
    return TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accumulation,
        learning_rate=config.learning_rate,
        lr_scheduler_type="constant" if config.lr_scheduler == "cosine_time" else config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # a float < 1 is a fraction of the steps
        weight_decay=config.weight_decay,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        gradient_checkpointing=config.gradient_checkpointing,
        optim=optimizer_name(config),
        seed=config.seed,
        data_seed=config.seed,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=config.eval_steps if evaluate else None,
        save_strategy="steps" if evaluate and config.save_best else "no",
        # None (with save_strategy "no") is accepted at run time; transformers annotates the field as float
        save_steps=config.eval_steps if evaluate else None,  # type: ignore[arg-type]
        save_total_limit=2,
        load_best_model_at_end=evaluate and config.save_best,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )


# --- the run -------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    adapter_dir: Path  # the trained adapter alone, ready for the registry
    metrics: dict[str, Any]
    log_history: list[dict[str, Any]]
    trainable_params: int
    total_params: int
    loaded: Any  # LoadedGenerator of the base (rope scaling, native context)
    model: Any = None  # the trained peft model (best checkpoint when one was kept)


def run_training(config: TrainConfig, model_path: str, rows: dict[str, list[Row]], run_dir: Path,
                 device: str = "cpu") -> TrainResult:
    """Train, keep the best checkpoint (validation loss), save the adapter to ``run_dir/adapter``."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    model, loaded = load_trainable(config, model_path, device)
    trainable, total = parameter_counts(model)
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    tokenizer = loaded.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    budget = BudgetAndThroughput(config.time_budget_minutes)
    trainer = AnswerOnlyTrainer(
        model=model,
        args=training_arguments(config, run_dir, len(rows["train"])),
        train_dataset=RowDataset(rows["train"]),
        eval_dataset=RowDataset(rows["validation"]) if rows.get("validation") else None,
        data_collator=RowCollator(pad_id),
        callbacks=[budget],
    )
    budget.trainer = trainer
    if config.lr_scheduler == "cosine_time":
        if not config.time_budget_minutes:
            raise ValueError("lr_scheduler cosine_time needs time_budget_minutes")
        trainer.time_budget_s = config.time_budget_minutes * 60
    started = time.perf_counter()
    output = trainer.train()
    elapsed = time.perf_counter() - started
    metrics: dict[str, Any] = dict(output.metrics)
    if trainer.eval_dataset is not None:
        final = trainer.evaluate()  # the kept (best) weights
        metrics.update({f"final_{k}": v for k, v in final.items() if k.startswith("eval_")})
    steps = trainer.state.global_step
    metrics.update({
        "train_seconds": round(elapsed, 1),
        "steps": steps,
        "stopped_by_time_budget": budget.stopped_early,
        "rows_seen": steps * config.batch_size * config.grad_accumulation,
        "examples_seen": trainer.train_examples,
        "row_tokens_seen": trainer.train_tokens,
        "row_tokens_per_s": round(trainer.train_tokens / max(elapsed, 1e-9), 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_eval_loss": trainer.state.best_metric,
    })
    adapter_dir = run_dir / "adapter"
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    trained: Any = trainer.model  # the peft model (typed by transformers as an optional torch Module)
    trained.save_pretrained(str(adapter_dir))
    (adapter_dir / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
    return TrainResult(adapter_dir, metrics, list(trainer.state.log_history), trainable, total, loaded,
                       trainer.model)

