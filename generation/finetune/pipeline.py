"""One training run end to end: data -> PEFT training (any method of generation/methods.py) -> compact adapter +
metadata (the method included) + curve -> registry."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from generation.adapters import METADATA, AdapterRef, AdapterRegistry
from generation.finetune.config import TrainConfig
from generation.finetune.data import OpenCorpusIndex, Row, prepare_rows
from generation.finetune.train import RowCollator, TrainResult, answer_hidden, causal_lm
from generation.methods import method_spec
from generation.prompt import PROMPT_TEMPLATE_VERSION

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def resolve_files(config: TrainConfig, root: Path) -> list[Path]:
    """Training files as absolute paths (relative ones are taken from ``root``, the repository)."""
    if not config.train_files:
        raise ValueError("train_files: no training data given")
    files = [Path(f) if Path(f).is_absolute() else (root / f).resolve() for f in config.train_files]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"train_files: not found: {', '.join(missing)}")
    return files


def train_from_config(config: TrainConfig, *, models_path: Path, open_index: OpenCorpusIndex,
                      retrieval_key: dict[str, Any], root: Path, registry_root: Path, cache_root: Path,
                      config_text: str | None = None, activate: bool = True, device: str = "cpu") -> AdapterRef:
    """Rows from the service's retrieval (``open_index``, see prepare_rows), training, metadata, publication.

    ``models_path`` is where bundled base models are converted (RAG_MODEL_CACHE_DIR)."""
    from transformers import AutoTokenizer

    from generation.bundled import resolve_generator_model
    from generation.finetune.train import run_training

    files = resolve_files(config, root)
    model_path = resolve_generator_model(config.base_model, models_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rows, data_info = prepare_rows(config, tokenizer, files, cache_root, open_index=open_index,
                                   retrieval_key=retrieval_key)
    log.info("training data: %s", json.dumps({k: data_info[k] for k in ("rows", "examples", "kinds")}))
    run_dir = cache_root / "runs" / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = run_training(config, model_path, rows, run_dir, device)
    reload_diff = compact_adapter(result, model_path, rows["validation"] or rows["train"], config)
    metadata = build_metadata(config, result, data_info, files, reload_diff)
    (result.adapter_dir / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
    plot_curve(result.log_history, result.adapter_dir / "training_curve.png", config.name)
    if config_text is not None:
        (result.adapter_dir / "train_config.yaml").write_text(config_text)
    ref = AdapterRegistry(registry_root).publish(config.name, result.adapter_dir, activate=activate)
    log.info("published %s -> %s", ref.label, ref.path)
    return ref


def compact_adapter(result: TrainResult, model_path: str, rows: list[Row], config: TrainConfig) -> float | None:
    """Store float32 adapter weights as float16 (half the size) if that reloads to the same answer logits.

    Returns the largest absolute logit difference between the trained model and base + reloaded adapter,
    or None where the adapter was kept as trained (quantized bases, or a difference over tolerance).
    """
    from safetensors.torch import load_file, save_file

    if config.base_quantization != "none":
        return None
    weights_path = result.adapter_dir / ADAPTER_WEIGHTS
    weights = load_file(str(weights_path))
    if any(t.is_floating_point() and t.abs().max() > 6e4 for t in weights.values()):
        return None  # out of float16 range
    original = weights_path.read_bytes()
    save_file({k: t.half() if t.dtype == torch.float32 else t for k, t in weights.items()}, str(weights_path))
    diff = reload_difference(result, model_path, rows[:1], config)
    if diff > 1e-2:
        log.warning("float16 adapter differs by %.2e in logits: keeping float32", diff)
        weights_path.write_bytes(original)
        return None
    return diff


def reload_difference(result: TrainResult, model_path: str, rows: list[Row], config: TrainConfig) -> float:
    from generation.loading import load_generator

    reloaded = load_generator(model_path, context_window=config.context_window, adapter_path=str(result.adapter_dir))
    batch = RowCollator(pad_id=0)(rows)
    a, b = answer_logits(result.model, batch), answer_logits(reloaded.model, batch)
    return float((a - b).abs().max())


@torch.no_grad()
def answer_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(n_answer_tokens, V) logits at the answer positions of a collated batch, in eval mode."""
    was_training = model.training
    model.eval()
    lm = causal_lm(model)
    device = lm.get_input_embeddings().weight.device
    batch = {k: v.to(device) for k, v in batch.items()}
    hidden = answer_hidden(model, batch)
    keep = batch["labels"][:, 1:] != -100
    logits = lm.lm_head(hidden[:, :-1][keep]).float()
    model.train(was_training)
    scores: torch.Tensor = logits.cpu()
    return scores


def build_metadata(config: TrainConfig, result: TrainResult, data_info: dict[str, Any], files: list[Path],
                   reload_diff: float | None) -> dict[str, Any]:
    loaded = result.loaded
    return {
        "name": config.name,
        "base_model": config.base_model,
        "method": config.method,
        "quantization": config.base_quantization,
        "mergeable": method_spec(config.method).mergeable,
        "num_virtual_tokens": config.virtual_tokens,
        "native_context": loaded.native_context,
        "context_window": config.context_window,
        "rope_scaling": loaded.rope_scaling,
        "prompt_template_version": PROMPT_TEMPLATE_VERSION,
        "max_new_tokens": config.max_new_tokens,
        "context_chunks_trained": list(config.context_chunks),
        "training_data": {"files": [f.name for f in files], "sha256": data_info["data_sha256"],
                          "rows": data_info["rows"], "examples": data_info["examples"],
                          "kinds": data_info["kinds"], "abstain_targets": data_info.get("abstain_targets"),
                          "articles": data_info["articles"]},
        "config": config.as_dict(),
        "metrics": result.metrics,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "adapter_dtype": "float16" if reload_diff is not None else "as trained",
        "reload_max_abs_logit_diff": reload_diff,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
    }


def plot_curve(history: list[dict[str, Any]], out: Path, title: str) -> None:
    """Training loss, validation loss and validation answer match against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    match = [(h["step"], h["eval_answer_match"]) for h in history if "eval_answer_match" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss (answer tokens)", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.legend(loc="upper left")
    if match:
        twin = ax.twinx()
        twin.plot(*zip(*match), "s--", color="tab:green", label="validation answer match")
        twin.set_ylabel("answers reproduced exactly (teacher-forced)")
        twin.set_ylim(0, 1)
        twin.legend(loc="upper right")
    ax.set_title(f"{title}: training curve")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)

