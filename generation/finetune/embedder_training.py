"""Adapting the embedding model to a corpus: sentence-transformers fine-tuning on labelled queries.

Data: a corpus (the loader's JSONL: ``_id``/``document_id``, ``title``, ``text``) and labelled queries, either
BEIR ``queries.jsonl`` + a qrels ``.tsv`` or a JSONL of ``{"query", "document_id"}`` pairs. Each (query,
judged-relevant document) pair becomes a training row ``(anchor, positive, negative_1..n)``: the negatives
are mined from a BM25 index of the corpus (retrieval/bm25.py, the service's lexical retriever), top
``negative_depth`` minus ranks skipped and minus every document judged relevant to the query.

Loss: MultipleNegativesRankingLoss (each query against its positive, its hard negatives and every other
row's passages of the batch); batches never hold one text twice (a false in-batch negative).
With ``dev_fraction`` > 0 that share of the queries (seeded, by query) is held out, and dense NDCG@10 /
Recall@100 on it are measured before and after over a document pool (BM25 top ``eval_pool`` of each
held-out query plus its positives). Passages are ``title + "\\n" + text``, as chunks start with their header.

The trained model is published into the embedder registry (ingestion/registry.py) with
metadata.json (base model, data digest, config text, metrics, loss history) and a loss-curve PNG.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from generation.finetune.config import read_yaml_config
from ingestion.registry import EmbedderRegistry, RegistryRef
from retrieval.bm25 import BM25Index

log = logging.getLogger(__name__)

Labelled = dict[str, tuple[str, set[str]]]  # query key -> (query text, judged-relevant document ids)


@dataclass
class EmbedderTrainConfig:
    name: str = "embedder"  # registry name: RAG_EMBEDDING_MODEL=embedder:<name>[@vN]
    base_model: str = "bundled:all-MiniLM-L6-v2"  # any RAG_EMBEDDING_MODEL value (a registry ref too)
    # --- data (paths relative to the repository root, or absolute) --------------------------------
    corpus: str = ""
    queries: str | None = None  # BEIR queries.jsonl, with qrels
    qrels: str | None = None
    pairs: str | None = None  # instead of queries + qrels: JSONL {"query": str, "document_id": str}
    dev_fraction: float = 0.0  # share of queries held out for the before/after figures (0: train on all)
    max_queries: int | None = None  # cap on training queries (seeded sample), for smoke runs
    # --- hard negatives from BM25 ------------------------------------------------------------------
    hard_negatives: int = 1  # per row (0: in-batch negatives only)
    negative_depth: int = 30  # BM25 ranks they are drawn from
    negative_skip: int = 3  # top ranks never used (often unjudged relevant documents)
    # --- optimisation ------------------------------------------------------------------------------
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 32
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    scale: float = 20.0  # MultipleNegativesRankingLoss: cosine similarity x scale are the logits
    max_seq_length: int = 256  # tokens per text in training only; the saved model keeps the base's serving length
    freeze_embeddings: bool = True  # the token embeddings stay the base's: the chunker's static breakpoint
    # vectors (ingestion/chunker.py) then cut the corpus exactly as before, so only the vectors change
    query_prefix: str = ""  # as RAG_EMBEDDING_QUERY_PREFIX / _PASSAGE_PREFIX at serving
    passage_prefix: str = ""
    logging_steps: int = 2
    eval_pool: int = 30  # documents per held-out query in the before/after pool (0: no before/after figures)
    seed: int = 42
    num_threads: int | None = None

    @classmethod
    def from_yaml(cls, path: Path, overrides: dict[str, Any] | None = None) -> "EmbedderTrainConfig":
        config = read_yaml_config(cls, path, overrides)
        if not config.corpus:
            raise ValueError(f"{path}: 'corpus' is required")
        if bool(config.pairs) == bool(config.queries and config.qrels):
            raise ValueError(f"{path}: give either 'pairs' or both 'queries' and 'qrels'")
        if not 0 <= config.dev_fraction < 1 or config.batch_size < 2 or config.epochs <= 0:
            raise ValueError(f"{path}: 0 <= dev_fraction < 1, batch_size >= 2 and epochs > 0 are required")
        return config


# --- data ---------------------------------------------------------------------------------------


def _path(value: str, root: Path) -> Path:
    path = (Path(value) if Path(value).is_absolute() else root / value).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"training data file {path} not found")
    return path


def data_files(config: EmbedderTrainConfig, root: Path) -> list[Path]:
    names = [config.corpus] + ([config.pairs] if config.pairs else [config.queries or "", config.qrels or ""])
    return [_path(name, root) for name in names]


def data_digest(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def load_corpus(path: Path) -> dict[str, str]:
    """document id -> passage text (``title\\ntext``, as a chunk with its header)."""
    from ingestion.loaders import load_documents

    return {d.document_id: f"{d.title}\n{d.text}" if d.title else d.text for d in load_documents([path])}


def load_labelled(config: EmbedderTrainConfig, files: list[Path], corpus: dict[str, str]) -> Labelled:
    """Queries with at least one judged-relevant document in the corpus."""
    labelled: Labelled = {}
    if config.pairs:
        for number, line in enumerate(files[1].read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                query, document = str(record["query"]), str(record["document_id"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{files[1]}:{number}: expected {{\"query\", \"document_id\"}} ({exc!r})") from None
            labelled.setdefault(query, (query, set()))[1].add(document)
    else:
        texts = {}
        for line in files[1].read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                texts[str(record["_id"])] = str(record["text"])
        for number, line in enumerate(files[2].read_text(encoding="utf-8").splitlines()):
            parts = line.split()
            if len(parts) < 3 or (number == 0 and not parts[-1].lstrip("-").isdigit()):
                continue
            qid, document, score = parts[0], parts[-2], int(parts[-1])
            if score > 0 and qid in texts:
                labelled.setdefault(qid, (texts[qid], set()))[1].add(document)
    kept = {key: (text, {d for d in docs if d in corpus}) for key, (text, docs) in labelled.items()}
    kept = {key: value for key, value in kept.items() if value[1]}
    if not kept:
        raise ValueError(f"no labelled query names a document of {files[0]}")
    return kept


def split_queries(labelled: Labelled, dev_fraction: float, seed: int) -> tuple[Labelled, Labelled]:
    """(train, dev), split by query, seeded."""
    keys = sorted(labelled)
    random.Random(seed).shuffle(keys)
    n_dev = int(round(dev_fraction * len(keys)))
    return {k: labelled[k] for k in keys[n_dev:]}, {k: labelled[k] for k in keys[:n_dev]}


def corpus_bm25(corpus: dict[str, str]) -> BM25Index:
    ids = list(corpus)
    return BM25Index.build(ids, [corpus[i] for i in ids], {"document_id": ids})


def training_rows(config: EmbedderTrainConfig, train: Labelled, corpus: dict[str, str],
                  bm25: BM25Index) -> list[dict[str, str]]:
    """One row per (query, positive): anchor, positive, negative_1..n (BM25 hard negatives)."""
    rng = random.Random(config.seed)
    rows = []
    for text, positives in train.values():
        ranked = [doc for doc, _ in bm25.search(text, config.negative_depth)]
        candidates = [doc for doc in ranked[config.negative_skip:] if doc not in positives]
        for positive in sorted(positives):
            row = {"anchor": config.query_prefix + text, "positive": config.passage_prefix + corpus[positive]}
            if config.hard_negatives:
                if len(candidates) < config.hard_negatives:
                    continue  # every row of a batch needs the same columns
                for n, doc in enumerate(rng.sample(candidates[:max(config.hard_negatives, 10)],
                                                   config.hard_negatives), start=1):
                    row[f"negative_{n}"] = config.passage_prefix + corpus[doc]
            rows.append(row)
    rng.shuffle(rows)
    return rows


def dense_metrics(model: Any, config: EmbedderTrainConfig, dev: Labelled, corpus: dict[str, str],
                  bm25: BM25Index) -> dict[str, float]:
    """Dense NDCG@10 and Recall@100 of the held-out queries over their document pool."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    pool: set[str] = set()
    for text, positives in dev.values():
        pool |= positives | {doc for doc, _ in bm25.search(text, config.eval_pool)}
    evaluator = InformationRetrievalEvaluator(
        queries={k: config.query_prefix + text for k, (text, _) in dev.items()},
        corpus={d: config.passage_prefix + corpus[d] for d in sorted(pool)},
        relevant_docs={k: docs for k, (_, docs) in dev.items()}, ndcg_at_k=[10], accuracy_at_k=[1],
        precision_recall_at_k=[100], mrr_at_k=[10], map_at_k=[10], show_progress_bar=True, name="dev")
    scores = evaluator(model)
    return {"ndcg@10": round(float(scores["dev_cosine_ndcg@10"]), 4),
            "recall@100": round(float(scores["dev_cosine_recall@100"]), 4), "pool_documents": len(pool)}


# --- training -----------------------------------------------------------------------------------


def train_embedder(config: EmbedderTrainConfig, *, root: Path, registry_root: Path, cache_root: Path,
                   config_text: str | None = None, activate: bool = True) -> RegistryRef:
    """Mine negatives, train, measure, publish ``config.name`` as the next version in ``registry_root``."""
    import torch
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    from ingestion.embedder import resolve_embedding_model

    files = data_files(config, root)
    corpus = load_corpus(files[0])
    labelled = load_labelled(config, files, corpus)
    train, dev = split_queries(labelled, config.dev_fraction, config.seed)
    if config.max_queries:
        train = dict(list(train.items())[: config.max_queries])
    bm25 = corpus_bm25(corpus)
    rows = training_rows(config, train, corpus, bm25)
    if len(rows) < 2:
        raise ValueError(f"{len(rows)} training rows from {files[1]}: need at least 2")

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    model = SentenceTransformer(resolve_embedding_model(config.base_model, registry_root), device="cpu")
    serving_length = model.max_seq_length
    model.max_seq_length = config.max_seq_length
    if config.freeze_embeddings:
        cast(Any, model[0]).auto_model.get_input_embeddings().weight.requires_grad_(False)
    before = dense_metrics(model, config, dev, corpus, bm25) if dev and config.eval_pool else {}

    run_dir = cache_root / "runs" / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    args = SentenceTransformerTrainingArguments(
        output_dir=str(run_dir / "trainer"), num_train_epochs=config.epochs, max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size, learning_rate=config.learning_rate,
        warmup_ratio=config.warmup_ratio, weight_decay=config.weight_decay, seed=config.seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES, logging_steps=config.logging_steps, save_strategy="no",
        report_to="none", use_cpu=True,  # the last, smaller batch is kept: NO_DUPLICATES may leave many
        disable_tqdm=False)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                         loss=MultipleNegativesRankingLoss(model, scale=config.scale))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    history = [{"step": int(h["step"]), "loss": float(h["loss"])} for h in trainer.state.log_history if "loss" in h]
    after = dense_metrics(model, config, dev, corpus, bm25) if dev and config.eval_pool else {}

    model.max_seq_length = serving_length
    out = run_dir / "model"
    model.save(str(out))
    metadata = {
        "name": config.name, "kind": "sentence-transformers embedder", "base_model": config.base_model,
        "dimension": int(model.get_embedding_dimension() or 0), "max_seq_length": serving_length,
        "query_prefix": config.query_prefix, "passage_prefix": config.passage_prefix,
        "training_data": {"files": [str(f) for f in files], "sha256": data_digest(files),
                          "queries": {"train": len(train), "dev": len(dev)}, "rows": len(rows),
                          "hard_negatives": config.hard_negatives, "documents": len(corpus)},
        "metrics": {"dev_dense_before": before, "dev_dense_after": after,
                    "dev_note": ("dense NDCG@10 / Recall@100 of the held-out queries over a pool of documents "
                                 "(BM25 top eval_pool per query + positives)") if dev else "no held-out queries",
                    "steps": trainer.state.global_step, "train_seconds": round(seconds, 1),
                    "first_loss": history[0]["loss"] if history else None,
                    "last_loss": history[-1]["loss"] if history else None},
        "loss_history": history, "config": dataclasses.asdict(config),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__,
    }
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    plot_loss(history, out / "training_curve.png", config.name)
    if config_text is not None:
        (out / "train_config.yaml").write_text(config_text)
    ref = EmbedderRegistry(registry_root).publish(config.name, out, activate=activate)
    log.info("published embedder %s -> %s (dev dense %s -> %s)", ref.label, ref.path, before, after)
    return ref


def plot_loss(history: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("MultipleNegativesRankingLoss")
    ax.set_title(f"{title}: embedder fine-tuning (in-batch + BM25 hard negatives)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
