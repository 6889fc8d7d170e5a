"""Training the reranker (retrieval/cross_encoder.py) on pairs the service's own retriever produces.

No cross-encoder weights ship on PyPI, so the project trains one: sentence-transformers' ``CrossEncoder``
initialised from the bundled all-MiniLM-L6-v2 encoder (a new one-logit head), trained with its
``CrossEncoderTrainer`` and ``BinaryCrossEntropyLoss`` on (question, chunk, label) pairs:

- **SciFact** train judgments (optionally a seeded sample of queries over a sampled corpus: the full corpus
  is ~22k chunks, an hour to index on 2 busy cores): ``train_fraction`` of the judged train queries (split by
  query id with ``seed``; the rest is held out for ``bench/reranker.py`` and recorded in the metadata).
  Positive: the best-ranked chunk of a relevant document (its corpus text when the hybrid retriever missed
  it). Hard negatives: the best-ranked chunks of documents not judged relevant.
- **SQuAD** train questions of ``squad_articles`` sampled articles, indexed by the service's pipeline.
  Positive: the best-ranked chunk holding a gold answer (the gold paragraph when none was retrieved); hard
  negatives: the best-ranked chunks holding none. With ``squad_unanswerable``, SQuAD 2.0's unanswerable
  questions add negatives that are on topic: the chunk retrieved first for each and its own paragraph
  (configs/train/minilm-answerability.yaml trains the gate's answerability model this way).

Pairs are kept in ``.cache/finetune/pairs`` under a digest of the data settings (cached_training_pairs).

A few of the training queries (``validation_queries``) give a validation set for the curve (loss and
average precision). A model is a sentence-transformers folder (~90 MB) with ``metadata.json`` (base model,
data hash, config, metrics) and ``training_curve.png``, published to a registry like the adapters
(``rerankers/<name>/<version>``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from generation.finetune.config import read_yaml_config
from generation.finetune.data import (Article, CorpusIndex, OpenCorpusIndex, file_digest, gold_chunk,
                                     load_articles)

log = logging.getLogger(__name__)

Pair = tuple[str, str, float]  # (question, chunk text, label 1.0 / 0.0)
Qrels = dict[str, dict[str, int]]  # query id -> document id -> relevance


@dataclass
class BeirSet:
    """A BEIR folder opened by the composition root: its service index, queries and train judgments."""

    index: CorpusIndex
    queries: dict[str, str]
    qrels: Qrels
    corpus_text: dict[str, str]  # document id -> text as the loader titles it (a positive nobody retrieved)
    digest: str  # sha256 over corpus, queries and qrels


OpenBeir = Callable[..., BeirSet]  # (folder, n_queries, n_documents, seed) -> BeirSet


@dataclass
class RerankerConfig:
    name: str = "minilm-rerank"
    base_model: str = "bundled:all-MiniLM-L6-v2"
    max_length: int = 256  # question + chunk tokens
    learning_rate: float = 5e-5
    warmup_ratio: float = 0.1
    batch_size: int = 16
    epochs: float = 1.0
    time_budget_minutes: float | None = 22.0
    eval_steps: int = 100
    seed: int = 42
    num_threads: int | None = None
    retrieve_depth: int = 30  # chunks retrieved per question to find the positive and hard negatives
    # SciFact (BEIR folder: corpus.jsonl, queries.jsonl, qrels/train.tsv); empty: not used
    scifact_dir: str = ""
    scifact_queries: int = 0  # judged train queries sampled (seeded; 0: all)
    scifact_documents: int = 0  # corpus sampled: the sampled queries' judged documents, filled to this (0: all)
    train_fraction: float = 0.8  # of the train queries, by query id; the rest is held out for evaluation
    scifact_negatives: int = 4
    # SQuAD-format training files; empty: not used
    squad_files: list[str] = field(default_factory=list)
    squad_articles: int = 20  # articles sampled (seeded) and indexed
    squad_questions: int = 800
    squad_negatives: int = 2
    # SQuAD 2.0 unanswerable questions sampled from the same articles: each is a negative with the chunk
    # retrieved first for it and with its own paragraph (on topic, written to look answerable): the pairs
    # that teach the model answerability rather than topical relevance
    squad_unanswerable: int = 0
    # an adapter's metadata.json (relative to the repository root): its validation articles, on which
    # `rag adapters calibrate` chooses the gate's thresholds, are never trained on
    exclude_validation_of: str = ""
    validation_queries: int = 40  # of the SciFact training queries (else SQuAD), for the curve only

    @classmethod
    def from_yaml(cls, path: Path, overrides: dict[str, Any] | None = None) -> "RerankerConfig":
        config = read_yaml_config(cls, path, overrides)
        problems = []
        if config.batch_size < 1 or config.max_length < 32 or config.epochs <= 0:
            problems.append("batch_size >= 1, max_length >= 32 and epochs > 0 are required")
        if not 0.0 < config.train_fraction <= 1.0:
            problems.append("train_fraction must be in (0, 1]")
        if not config.scifact_dir and not config.squad_files:
            problems.append("no training data: set scifact_dir and/or squad_files")
        if config.squad_unanswerable < 0 or config.squad_questions < 0:
            problems.append("squad_questions and squad_unanswerable must be >= 0")
        if config.learning_rate <= 0 or config.retrieve_depth < 2:
            problems.append("learning_rate > 0 and retrieve_depth >= 2 are required")
        if problems:
            raise ValueError(f"{path}: {'; '.join(problems)}")
        return config


def split_queries(query_ids: Sequence[str], train_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held out) query ids: a seeded shuffle of the sorted ids, cut at ``train_fraction``."""
    ids = sorted(query_ids)
    random.Random(seed).shuffle(ids)
    cut = round(len(ids) * train_fraction)
    return sorted(ids[:cut]), sorted(ids[cut:])


def _retrieved(index: CorpusIndex, questions: Sequence[str], depth: int,
               desc: str) -> list[list[tuple[str, str]]]:
    """Per question, its top ``depth`` chunks as (document id, text), through the service's retrieval."""
    vectors = index.embedder.embed_queries(list(questions))  # (n, d), batched
    out = []
    for question, vector in tqdm(list(zip(questions, vectors)), desc=desc, unit="q"):
        hits = index.retriever.search(question, depth, query_vector=vector)
        rows = index.ledger.get_chunks(index.generation, [h.chunk_id for h in hits])
        out.append([(rows[h.chunk_id].document_id, rows[h.chunk_id].text) for h in hits if h.chunk_id in rows])
    return out


def scifact_pairs(beir: BeirSet, query_ids: Sequence[str], config: RerankerConfig) -> list[Pair]:
    """1 positive + ``scifact_negatives`` hard negatives per query (see module doc)."""
    questions = [beir.queries[q] for q in query_ids]
    pairs: list[Pair] = []
    for qid, question, chunks in zip(query_ids, questions,
                                     _retrieved(beir.index, questions, config.retrieve_depth, "pairs: scifact")):
        relevant = {d for d, score in beir.qrels[qid].items() if score > 0}
        positive = next((text for doc, text in chunks if doc in relevant), None)
        if positive is None:
            positive = next((beir.corpus_text[d] for d in sorted(relevant) if d in beir.corpus_text), None)
        if positive is None:
            continue
        pairs.append((question, positive, 1.0))
        negatives = [text for doc, text in chunks if doc not in relevant][: config.scifact_negatives]
        pairs += [(question, text, 0.0) for text in negatives]
    return pairs


def squad_pairs(articles: Sequence[Article], index: CorpusIndex, config: RerankerConfig,
                seed: int) -> list[list[Pair]]:
    """Per sampled question, its pairs: an answerable one gives 1 positive + ``squad_negatives`` hard
    negatives; an unanswerable one (``squad_unanswerable`` of them) gives its first retrieved chunk and its
    own paragraph, both negative (see module doc)."""
    rng = random.Random(seed)
    answerable = [(a, p, qa) for a in articles for p in a.paragraphs for qa in p.qas if qa.answers]
    unanswerable = [(a, p, qa) for a in articles for p in a.paragraphs for qa in p.qas if not qa.answers]
    rng.shuffle(answerable)
    rng.shuffle(unanswerable)
    items = answerable[: config.squad_questions] + unanswerable[: config.squad_unanswerable]
    rng.shuffle(items)
    retrieved = _retrieved(index, [qa.question for _, _, qa in items], config.retrieve_depth, "pairs: squad")
    groups: list[list[Pair]] = []
    for (article, paragraph, qa), chunks in zip(items, retrieved):
        own = gold_chunk(article, paragraph).text
        if not qa.answers:
            texts = list(dict.fromkeys([text for _, text in chunks[:1]] + [own]))
            groups.append([(qa.question, text, 0.0) for text in texts])
            continue
        answers = [a.lower() for a in qa.answers]
        holding = [text for _, text in chunks if any(a in text.lower() for a in answers)]
        lacking = [text for _, text in chunks if not any(a in text.lower() for a in answers)]
        groups.append([(qa.question, holding[0] if holding else own, 1.0)]
                      + [(qa.question, text, 0.0) for text in lacking[: config.squad_negatives]])
    return groups


def excluded_titles(config: RerankerConfig, root: Path) -> set[str]:
    """The validation articles recorded in ``exclude_validation_of`` (empty when unset)."""
    if not config.exclude_validation_of:
        return set()
    from generation.finetune.calibrate import validation_titles

    return validation_titles(json.loads(_resolve([config.exclude_validation_of], root)[0].read_text()))


def _resolve(paths: Sequence[str], root: Path) -> list[Path]:
    files = [Path(p) if Path(p).is_absolute() else (root / p).resolve() for p in paths]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"reranker config: not found: {', '.join(missing)}")
    return files


def build_training_pairs(config: RerankerConfig, *, root: Path, open_beir: OpenBeir,
                         open_index: OpenCorpusIndex) -> tuple[list[Pair], list[Pair], dict[str, Any]]:
    """(train pairs, validation pairs, what they came from) from the configured sources."""
    rng = random.Random(config.seed)
    train: list[Pair] = []
    validation: list[Pair] = []
    info: dict[str, Any] = {}
    digests = []
    if config.scifact_dir:
        folder = _resolve([config.scifact_dir], root)[0]
        beir = open_beir(folder, config.scifact_queries, config.scifact_documents, config.seed)
        try:
            judged = [q for q in beir.qrels if q in beir.queries]
            train_ids, held_out = split_queries(judged, config.train_fraction, config.seed)
            shuffled = train_ids[:]
            rng.shuffle(shuffled)
            val_ids = sorted(shuffled[: config.validation_queries])
            fit_ids = sorted(shuffled[config.validation_queries:])
            train += scifact_pairs(beir, fit_ids, config)
            validation += scifact_pairs(beir, val_ids, config)
        finally:
            beir.index.close()
        digests.append(beir.digest)
        info["scifact"] = {"folder": folder.name, "sampled_queries": config.scifact_queries,
                           "sampled_documents": config.scifact_documents, "train_queries": len(fit_ids),
                           "validation_queries": len(val_ids), "held_out_queries": held_out,
                           "split": f"{config.train_fraction:.0%} of the judged train queries by id, "
                                    f"seed {config.seed}"}
    if config.squad_files:
        files = _resolve(config.squad_files, root)
        excluded = excluded_titles(config, root)
        articles = [a for a in load_articles(files) if a.title not in excluded]
        articles = random.Random(config.seed).sample(articles, min(config.squad_articles, len(articles)))
        index = open_index(articles, file_digest(files))
        try:
            groups = squad_pairs(articles, index, config, config.seed)
        finally:
            index.close()
        if not validation:
            validation = [pair for group in groups[: config.validation_queries] for pair in group]
            groups = groups[config.validation_queries:]
        pairs = [pair for group in groups for pair in group]
        train += pairs
        digests.append(file_digest(files))
        info["squad"] = {"files": [f.name for f in files], "articles": sorted(a.title for a in articles),
                         "questions": len(groups), "answerable": sum(1 for *_, y in pairs if y == 1.0),
                         "excluded_articles": sorted(excluded)}
    rng.shuffle(train)
    info["sha256"] = hashlib.sha256("".join(digests).encode()).hexdigest()
    info["pairs"] = {"train": len(train), "validation": len(validation),
                     "positives": {"train": int(sum(y for *_, y in train)),
                                   "validation": int(sum(y for *_, y in validation))}}
    return train, validation, info


TRAINING_KNOBS = {"name", "max_length", "learning_rate", "warmup_ratio", "batch_size", "epochs",
                  "time_budget_minutes", "eval_steps", "num_threads"}


def cached_training_pairs(config: RerankerConfig, *, root: Path, open_beir: OpenBeir, open_index: OpenCorpusIndex,
                          cache_root: Path) -> tuple[list[Pair], list[Pair], dict[str, Any]]:
    """build_training_pairs, kept in ``cache_root/pairs`` under a digest of the data settings, so that a
    rerun with other training knobs skips indexing and retrieval (and trains in a process that never
    loaded the embedding model)."""
    data_settings = {k: v for k, v in sorted(dataclasses.asdict(config).items()) if k not in TRAINING_KNOBS}
    sources = _resolve([*config.squad_files, *([config.exclude_validation_of] if config.exclude_validation_of
                                               else [])], root)
    if config.scifact_dir:
        folder = _resolve([config.scifact_dir], root)[0]
        sources += [folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels" / "train.tsv"]
    data_settings["sources_sha256"] = file_digest([p for p in sources if p.is_file()])  # edited data: new pairs
    key = hashlib.sha256(json.dumps(data_settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_root / "pairs" / f"{key}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        log.info("training pairs from %s", path)
        return ([tuple(p) for p in saved["train"]], [tuple(p) for p in saved["validation"]],
                saved["info"])
    train, validation, info = build_training_pairs(config, root=root, open_beir=open_beir, open_index=open_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"train": train, "validation": validation, "info": info}))
    tmp.replace(path)
    return train, validation, info


def train_reranker(config: RerankerConfig, *, root: Path, registry_root: Path, cache_root: Path,
                   open_beir: OpenBeir, open_index: OpenCorpusIndex, config_text: str | None = None,
                   activate: bool = True) -> Any:
    """Build pairs, train, write the model with metadata and curve, publish it to ``registry_root``."""
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import (CrossEncoder, CrossEncoderTrainer,
                                                     CrossEncoderTrainingArguments)
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderClassificationEvaluator
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
    from transformers import TrainerCallback

    from ingestion.registry import RerankerRegistry
    from ingestion.embedder import resolve_embedding_model
    from retrieval.cross_encoder import METADATA

    train, validation, data_info = cached_training_pairs(config, root=root, open_beir=open_beir,
                                                         open_index=open_index, cache_root=cache_root)
    if not train:
        raise ValueError(f"{config.name}: no training pairs were built")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    model = CrossEncoder(resolve_embedding_model(config.base_model), num_labels=1, max_length=config.max_length)

    def dataset(pairs: Sequence[Pair]) -> Any:
        return Dataset.from_dict({"query": [q for q, _, _ in pairs], "passage": [t for _, t, _ in pairs],
                                  "label": [y for _, _, y in pairs]})

    evaluator = CrossEncoderClassificationEvaluator([[q, t] for q, t, _ in validation],
                                                    [int(y) for *_, y in validation], name="validation",
                                                    batch_size=32, show_progress_bar=False) if validation else None
    run_dir = cache_root / "runs" / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.perf_counter()

    class TimeBudget(TrainerCallback):
        stopped = False

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            budget = config.time_budget_minutes
            if budget is not None and time.perf_counter() - started > 60 * budget:
                TimeBudget.stopped = True
                control.should_training_stop = True
                control.should_evaluate = True
            return control

    args = CrossEncoderTrainingArguments(
        output_dir=str(run_dir), num_train_epochs=config.epochs, per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=32, learning_rate=config.learning_rate, warmup_ratio=config.warmup_ratio,
        eval_strategy="steps" if validation else "no", eval_steps=config.eval_steps, logging_steps=10,
        save_strategy="no", seed=config.seed, use_cpu=True, report_to=[], dataloader_num_workers=0,
        disable_tqdm=False)
    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=dataset(train),
                                  eval_dataset=dataset(validation) if validation else None,
                                  loss=BinaryCrossEntropyLoss(model), evaluator=evaluator, callbacks=[TimeBudget()])
    trainer.train()
    final = evaluator(model) if evaluator is not None else {}
    seconds = time.perf_counter() - started
    history = [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in trainer.state.log_history]
    out = run_dir / "model"
    model.save_pretrained(str(out))
    steps = int(trainer.state.global_step)
    metadata = {
        "name": config.name, "kind": "cross-encoder", "library": "sentence-transformers",
        "base_model": config.base_model, "max_length": config.max_length,
        "label": "P(chunk is relevant to / answers the question)",
        "training_data": data_info,
        "metrics": {**{k.removeprefix("validation_"): round(float(v), 4) for k, v in final.items()},
                    "steps": steps, "train_seconds": round(seconds, 1),
                    "pairs_per_s": round(steps * config.batch_size / max(seconds, 1e-9), 2),
                    "stopped_by_time_budget": TimeBudget.stopped},
        "config": dataclasses.asdict(config), "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
    }
    (out / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
    (out / "history.json").write_text(json.dumps(history) + "\n")
    plot_curve(history, out / "training_curve.png", config.name)
    if config_text is not None:
        (out / "train_config.yaml").write_text(config_text)
    ref = RerankerRegistry(registry_root).publish(config.name, out, activate=activate)
    log.info("published %s -> %s (%s)", ref.label, ref.path, metadata["metrics"])
    return ref


def plot_curve(history: Sequence[Mapping[str, float]], path: Path, title: str) -> None:
    """Training loss (every logged step), validation loss and average precision (every evaluation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    val = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    ap = [(h["step"], h["eval_validation_average_precision"]) for h in history
          if "eval_validation_average_precision" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    if ap:
        twin = ax.twinx()
        twin.plot(*zip(*ap), "s--", color="tab:green", label="validation average precision")
        twin.set_ylabel("average precision")
        twin.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("binary cross-entropy")
    ax.set_title(f"{title}: reranker (cross-encoder)", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
