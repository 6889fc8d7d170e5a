"""Training the answerability cross-encoder (retrieval/cross_encoder.py) on the service's own retrieval.

Pairs come from SQuAD-format training files, retrieved by the service's own index of the training
articles (the same chunker, embedder, BM25 and fusion as serving), so the model sees chunks as the
service cuts them:

- answerable question + the best-ranked chunk of its own article that holds a gold answer: label 1
  (its gold paragraph, titled like a chunk, when retrieval missed it);
- answerable question + the best-ranked chunk of its own article without an answer: label 0;
- SQuAD 2.0 unanswerable question + the best-ranked chunk of its own article: label 0 (on topic, but
  it does not answer);
- any question + the best-ranked chunk of another article: label 0 (what an out-of-corpus question meets).

Articles listed in ``exclude_articles`` (the generator adapter's validation articles, on which the
grounding thresholds are calibrated) are never used; ``validation_articles`` more are held out to pick
the best checkpoint by ROC AUC. Training: LoRA on the bundled encoder with a new one-logit head, binary
cross-entropy, linear warm-up and decay, a wall-clock budget; progress on a tqdm bar.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from generation.finetune.config import read_yaml_config
from generation.finetune.data import (Article, CorpusIndex, OpenCorpusIndex, article_documents, file_digest,
                                     gold_chunk, load_articles, split_articles)

log = logging.getLogger(__name__)


@dataclass
class RerankerConfig:
    name: str = "squad-answerability"
    base_model: str = "bundled:all-MiniLM-L6-v2"
    max_length: int = 256  # question + chunk tokens
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["query", "key", "value", "dense"])
    learning_rate: float = 5e-4
    warmup_ratio: float = 0.06
    batch_size: int = 16
    epochs: float = 1.0
    time_budget_minutes: float | None = 20.0
    eval_steps: int = 100
    seed: int = 42
    num_threads: int | None = None
    train_files: list[str] = field(default_factory=list)
    exclude_articles: list[str] = field(default_factory=list)  # never trained or validated on
    validation_articles: int = 1
    max_questions: int = 3500  # sampled training questions (each gives 2 or 3 pairs)
    retrieve_depth: int = 10

    @classmethod
    def from_yaml(cls, path: Path, overrides: dict[str, Any] | None = None) -> "RerankerConfig":
        config = read_yaml_config(cls, path, overrides)
        if config.batch_size < 1 or config.max_length < 32 or config.epochs <= 0:
            raise ValueError(f"{path}: batch_size >= 1, max_length >= 32 and epochs > 0 are required")
        return config


Pair = tuple[str, str, float]  # (question, chunk text, label)


def build_pairs(config: RerankerConfig, articles: list[Article], index: CorpusIndex, titles: dict[str, str],
                seed: int, desc: str = "pairs") -> list[Pair]:
    """Labelled pairs for every (sampled) question of ``articles``, retrieved from ``index`` (see module doc).

    ``index`` holds ``article_documents(corpus)``; ``titles`` maps its document ids back to article titles.
    """
    questions = [(a, p, q) for a in articles for p in a.paragraphs for q in p.qas]
    rng = random.Random(seed)
    rng.shuffle(questions)
    questions = questions[: config.max_questions]
    vectors = index.embedder.embed_queries([q.question for _, _, q in questions])  # (n, d), batched
    pairs: list[Pair] = []
    for (article, paragraph, qa), vector in tqdm(list(zip(questions, vectors)), desc=desc, unit="q"):
        hits = index.retriever.search(qa.question, config.retrieve_depth, query_vector=vector)
        rows = index.ledger.get_chunks(index.generation, [h.chunk_id for h in hits])
        chunks = [(titles.get(rows[h.chunk_id].document_id), rows[h.chunk_id].text) for h in hits
                  if h.chunk_id in rows]
        own = [text for title, text in chunks if title == article.title]
        other = [text for title, text in chunks if title != article.title]
        answers = [a.lower() for a in qa.answers]
        if qa.impossible:
            if own:
                pairs.append((qa.question, own[0], 0.0))
        else:
            holding = [t for t in own if any(a in t.lower() for a in answers)]
            pairs.append((qa.question, holding[0] if holding else gold_chunk(article, paragraph).text, 1.0))
            lacking = [t for t in own if not any(a in t.lower() for a in answers)]
            if lacking:
                pairs.append((qa.question, lacking[0], 0.0))
        if other:
            pairs.append((qa.question, other[0], 0.0))
    rng.shuffle(pairs)
    return pairs


def train_reranker(config: RerankerConfig, *, open_index: OpenCorpusIndex, root: Path, registry_root: Path,
                   cache_root: Path, config_text: str | None = None, activate: bool = True) -> Any:
    """Build pairs, train, save the adapter + head with metadata and a curve, publish to ``registry_root``.

    ``open_index`` gives the service's index of the training articles (app/evaluation/indexes.py)."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from sklearn.metrics import roc_auc_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    from generation.adapters import AdapterRegistry
    from generation.finetune.pipeline import resolve_files
    from ingestion.embedder import resolve_embedding_model

    files = resolve_files(config, root)  # type: ignore[arg-type]
    articles = load_articles(files)
    corpus = list({a.title: a for a in reversed(articles)}.values())[::-1]  # one copy of each title
    excluded = set(config.exclude_articles)
    usable = [a for a in corpus if a.title not in excluded]
    _, validation = split_articles(usable, config.validation_articles, config.seed)
    held = {a.title for a in validation} | excluded
    train_articles = [a for a in articles if a.title not in held]
    validation_articles = [a for a in articles if a.title in {v.title for v in validation}]

    index = open_index(corpus, file_digest(files))
    titles = {doc.document_id: a.title for doc, a in zip(article_documents(corpus, source="squad"), corpus)}
    try:
        train_pairs = build_pairs(config, train_articles, index, titles, config.seed, "pairs: train")
        val_pairs = build_pairs(dataclasses.replace(config, max_questions=300), validation_articles, index, titles,
                                config.seed + 1, "pairs: validation")
    finally:
        index.close()

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    base_path = resolve_embedding_model(config.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1)
    model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=config.r, lora_alpha=config.lora_alpha,
                                            lora_dropout=config.lora_dropout, target_modules=config.target_modules))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_steps = max(1, int(len(train_pairs) * config.epochs / config.batch_size))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    schedule = get_linear_schedule_with_warmup(  # type: ignore[no-untyped-call]  # unannotated in transformers
        optimizer, int(config.warmup_ratio * total_steps), total_steps)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def encode(batch: list[Pair]) -> Any:
        return tokenizer([q for q, _, _ in batch], [t for _, t, _ in batch], truncation="only_second",
                         max_length=config.max_length, padding=True, return_tensors="pt")

    def validate() -> tuple[float, float]:
        model.eval()
        scores, losses = [], []
        with torch.inference_mode():
            for start in range(0, len(val_pairs), 64):
                batch = val_pairs[start:start + 64]
                logits = model(**encode(batch)).logits[:, 0]
                labels = torch.tensor([y for _, _, y in batch])
                losses.append(float(loss_fn(logits, labels)) * len(batch))
                scores += logits.tolist()
        model.train()
        auc = float(roc_auc_score([y for _, _, y in val_pairs], scores)) if len({y for *_, y in val_pairs}) > 1 else 0.0
        return auc, sum(losses) / max(len(val_pairs), 1)

    run_dir = cache_root / "runs" / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    best_dir = run_dir / "best"
    history: list[dict[str, float]] = []
    best_auc, started, step, stopped_by_time = -1.0, time.perf_counter(), 0, False
    model.train()
    order = [train_pairs[i % len(train_pairs)] for i in range(total_steps * config.batch_size)]
    with tqdm(total=total_steps, desc="train reranker", unit="step") as bar:
        for step in range(1, total_steps + 1):
            batch = order[(step - 1) * config.batch_size: step * config.batch_size]
            logits = model(**encode(batch)).logits[:, 0]  # (batch,)
            loss = loss_fn(logits, torch.tensor([y for _, _, y in batch]))
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            history.append({"step": step, "loss": loss.item()})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", best_auc=f"{best_auc:.3f}")
            out_of_time = (config.time_budget_minutes is not None
                           and time.perf_counter() - started > 60 * config.time_budget_minutes)
            if step % config.eval_steps == 0 or step == total_steps or out_of_time:
                auc, val_loss = validate()
                history.append({"step": step, "val_auc": auc, "val_loss": val_loss})
                if auc > best_auc:
                    best_auc = auc
                    model.save_pretrained(str(best_dir))
            if out_of_time:
                stopped_by_time = True
                break
    seconds = time.perf_counter() - started
    metadata = {
        "name": config.name, "kind": "cross-encoder", "base_model": config.base_model, "max_length": config.max_length,
        "label": "P(chunk answers question)", "trainable_params": trainable,
        "training_data": {"files": [f.name for f in files], "sha256": file_digest(files),
                          "pairs": {"train": len(train_pairs), "validation": len(val_pairs)},
                          "positives": {"train": int(sum(y for *_, y in train_pairs)),
                                        "validation": int(sum(y for *_, y in val_pairs))},
                          "articles": {"validation": sorted(a.title for a in validation),
                                       "excluded": sorted(excluded)}},
        "metrics": {"best_val_auc": round(best_auc, 4), "steps": step, "train_seconds": round(seconds, 1),
                    "pairs_per_s": round(step * config.batch_size / seconds, 2),
                    "stopped_by_time_budget": stopped_by_time},
        "config": dataclasses.asdict(config), "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
    }
    (best_dir / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    (best_dir / "history.json").write_text(json.dumps(history) + "\n")
    plot_reranker_curve(history, best_dir / "training_curve.png", config.name)
    if config_text is not None:
        (best_dir / "train_config.yaml").write_text(config_text)
    ref = AdapterRegistry(registry_root).publish(config.name, best_dir, activate=activate)
    log.info("published %s -> %s (validation AUC %.4f)", ref.label, ref.path, best_auc)
    return ref


def plot_reranker_curve(history: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["val_loss"], h["val_auc"]) for h in history if "val_auc" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        window = 20
        smooth = [sum(loss for _, loss in train[max(0, i - window + 1): i + 1])
                  / len(train[max(0, i - window + 1): i + 1])
                  for i in range(len(train))]
        ax.plot([s for s, _ in train], smooth, label="train loss (20-step mean)")
    if val:
        ax.plot([s for s, _, _ in val], [loss for _, loss, _ in val], "o-", label="validation loss")
        twin = ax.twinx()
        twin.plot([s for s, _, _ in val], [a for _, _, a in val], "s--", color="tab:green", label="validation AUC")
        twin.set_ylabel("ROC AUC")
        twin.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("binary cross-entropy")
    ax.set_title(f"{title}: answerability cross-encoder", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
