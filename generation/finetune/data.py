"""Training data: SQuAD / JSONL questions turned into the service's own RAG prompts, tokenized and cached.

Each *row* is one context (numbered chunks, packed by :func:`generation.prompt.pack_prompt`) with several
questions about it. Every question is first built as a complete, independent training example with
:func:`generation.prompt.build_training_text` (prompt ids, then answer ids; labels -100 on the prompt).
The examples of a row share their leading tokens (system prompt + context, up to ``Question:``); a row
stores that common prefix once and each example's remainder as a *branch*. The collator gives every
branch the positions and attention it would have alone (prefix + itself, causal), so a row trains
exactly like its separate examples while the context is computed once per row, not once per question.

Contexts, per paragraph of the training articles:
- ``retrieved``: the gold paragraph (with its article title, as the chunker writes chunks) at a random
  position among distractors that the service's own retriever returns for the question from an index of
  the whole articles; distractors sharing text or an answer with the paragraph are skipped. Target
  ``"<answer> [ref of the gold chunk]"``.
- ``gold``: the gold paragraph alone (the setting of gold-mode evaluation).
- ``no_gold``: distractors only; answerable questions become ``"I don't know."`` (abstaining on noise).
- ``off_topic``: the question's retrieved chunks from the *other* articles only (none holding one of the
  row's answers), answerable questions ``"I don't know."``: what an out-of-corpus question meets at
  serving (its article is not indexed).
SQuAD 2.0 unanswerable questions about the paragraph target ``"I don't know."`` in every context.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from generation.prompt import (ABSTAIN_ANSWER, PROMPT_TEMPLATE_VERSION, ContextChunk, build_training_text,
                               format_answer, pack_prompt)
from ingestion.documents import Document

log = logging.getLogger(__name__)

DATA_FORMAT = 2  # 2: off_topic chunks hold no answer. Bump when the way rows are built changes (part of the cache key)
SHINGLE = 8  # words: a distractor sharing any 8-word run with the gold paragraph overlaps it


@dataclass(frozen=True)
class QA:
    qid: str
    question: str
    answers: tuple[str, ...]  # empty when unanswerable
    impossible: bool = False

    @property
    def best_answer(self) -> str:
        """The most frequent annotator answer (shortest on ties): the training target."""
        counts = Counter(self.answers)
        return min(counts, key=lambda a: (-counts[a], len(a)))


@dataclass
class Paragraph:
    context: str
    qas: list[QA] = field(default_factory=list)


@dataclass
class Article:
    title: str
    paragraphs: list[Paragraph] = field(default_factory=list)

    @property
    def display_title(self) -> str:
        return self.title.replace("_", " ")


# --- reading -------------------------------------------------------------------------------------


def file_digest(paths: Sequence[Path]) -> str:
    """sha256 over the files' bytes, in order: the training data hash recorded with an adapter."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def load_articles(paths: Sequence[Path]) -> list[Article]:
    """Articles from SQuAD JSON (v1.1, v2.0) and/or JSONL files, merged by title and paragraph text.

    A question id seen twice (v2.0 repeats the v1.1 questions) is kept once.
    """
    articles: dict[str, Article] = {}
    paragraphs: dict[tuple[str, str], Paragraph] = {}
    seen: set[str] = set()
    for path in paths:
        records = _read_jsonl(path) if Path(path).suffix == ".jsonl" else _read_squad(path)
        for title, context, qa in records:
            if qa.qid in seen:
                continue
            seen.add(qa.qid)
            article = articles.setdefault(title, Article(title))
            key = (title, context)
            if key not in paragraphs:
                paragraphs[key] = Paragraph(context)
                article.paragraphs.append(paragraphs[key])
            paragraphs[key].qas.append(qa)
    return list(articles.values())


def _read_squad(path: Path) -> Iterator[tuple[str, str, QA]]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "data" not in data:
        raise ValueError(f"{path}: not SQuAD JSON (no top-level 'data')")
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            context = paragraph["context"].strip()
            for qa in paragraph["qas"]:
                answers = tuple(a["text"].strip() for a in qa.get("answers", []) if a["text"].strip())
                impossible = bool(qa.get("is_impossible")) or not answers
                yield article["title"], context, QA(qa["id"], qa["question"].strip(),
                                                    () if impossible else answers, impossible)


def _read_jsonl(path: Path) -> Iterator[tuple[str, str, QA]]:
    """Lines of {question, answer, context} (+ optional title, id); an empty or null answer is unanswerable."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = {"question", "context"} - set(row)
            if missing:
                raise ValueError(f"{path}:{number}: missing {', '.join(sorted(missing))}")
            answer = (row.get("answer") or "").strip()
            qid = str(row.get("id") or f"{Path(path).name}:{number}")
            yield (row.get("title") or "", row["context"].strip(),
                   QA(qid, row["question"].strip(), (answer,) if answer else (), not answer))


def article_document_ids(articles: Sequence[Article]) -> dict[str, str]:
    """Article title -> the document id :func:`article_documents` gives it."""
    return {article.title: f"article-{number:04d}" for number, article in enumerate(articles)}


def article_documents(articles: Sequence[Article], source: str) -> list[Document]:
    """One Document per article: paragraphs joined by blank lines, the title as the document title."""
    ids = article_document_ids(articles)
    return [
        Document(document_id=ids[article.title], text="\n\n".join(p.context for p in article.paragraphs),
                 title=article.display_title, source=source, created_at="2016-01-01T00:00:00+00:00")
        for article in articles
    ]


def gold_chunk(article: Article, paragraph: Paragraph) -> ContextChunk:
    """The paragraph written as the chunker writes chunks: the title on its own line, then the text."""
    title = " ".join(article.display_title.split())
    text = f"{title}\n{paragraph.context}" if title else paragraph.context
    return ContextChunk(text=text, chunk_id="gold", document_id=article.title, score=1.0)


# --- rows ------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One context and its questions: ``prefix`` + each branch is one complete training example."""

    prefix: list[int]
    branches: list[dict[str, list[int]]]  # {"ids": [...], "labels": [...]} (labels -100 off the answer)
    kind: str = "retrieved"

    @property
    def n_tokens(self) -> int:
        return len(self.prefix) + sum(len(b["ids"]) for b in self.branches)

    def to_json(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "branches": self.branches, "kind": self.kind}


def share_prefix(examples: Sequence[tuple[list[int], list[int]]], max_tokens: int, kind: str = "retrieved") -> Row:
    """Fold complete (input_ids, labels) examples into one row; branches beyond ``max_tokens`` are dropped."""
    first = examples[0][0]
    n = min(len(ids) for ids, _ in examples)
    for ids, labels in examples:
        first_label = next(i for i, label in enumerate(labels) if label != -100)
        # a branch starts before its first label, so each label's predecessor lies in its own branch
        n = min(n, first_label - 1, next((i for i in range(n) if ids[i] != first[i]), n))
    row = Row(prefix=list(first[:n]), branches=[], kind=kind)
    total = n
    for ids, labels in examples:
        branch = {"ids": list(ids[n:]), "labels": list(labels[n:])}
        if row.branches and total + len(branch["ids"]) > max_tokens:
            break
        row.branches.append(branch)
        total += len(branch["ids"])
    return row


@dataclass
class RowBuilder:
    """Builds rows from paragraphs; ``retrieve(question, k)`` returns the service's ranked chunks."""

    tokenizer: Any
    retrieve: Callable[[str, int], list[ContextChunk]]
    context_window: int
    max_new_tokens: int
    max_seq_length: int
    context_chunks: tuple[int, int] = (3, 5)
    gold_only_fraction: float = 0.2
    no_gold_fraction: float = 0.1
    questions_per_row: int = 6
    impossible_per_row: int = 2
    off_topic_fraction: float = 0.0
    # article title -> its document id in the retriever's index (absent: the title itself)
    document_ids: dict[str, str] = field(default_factory=dict)

    def build(self, article: Article, paragraph: Paragraph, rng: random.Random) -> Row | None:
        answerable = [q for q in paragraph.qas if not q.impossible]
        impossible = [q for q in paragraph.qas if q.impossible]
        rng.shuffle(answerable)
        rng.shuffle(impossible)
        draw = rng.random()
        # gold and no_gold keep the thresholds they had before off_topic (at 0 the rows are the same)
        no_gold_until = self.gold_only_fraction + self.no_gold_fraction
        kind = ("gold" if draw < self.gold_only_fraction
                else "no_gold" if draw < no_gold_until and answerable
                else "off_topic" if draw < no_gold_until + self.off_topic_fraction and answerable
                else "retrieved")
        n_impossible = min(len(impossible), self.impossible_per_row)
        questions = answerable[: self.questions_per_row - n_impossible] + impossible[:n_impossible]
        if not questions:
            return None
        gold = gold_chunk(article, paragraph)
        k = rng.randint(*self.context_chunks)
        if kind == "gold":
            chunks = [gold]
        elif kind == "off_topic":
            own = self.document_ids.get(article.title, article.title)
            chunks = self._distractors(questions[0].question, paragraph, questions, k, other_than=own)[:k]
            if not chunks:
                return None
        else:
            distractors = self._distractors(questions[0].question, paragraph, questions, k)
            if kind == "no_gold":
                chunks = distractors[:k]
            else:
                chunks = distractors[: k - 1]
                chunks.insert(rng.randint(0, len(chunks)), gold)
        rng.shuffle(questions)
        examples = [self._example(q, chunks, kind) for q in questions]
        return share_prefix(examples, self.max_seq_length, kind)

    def _distractors(self, query: str, paragraph: Paragraph, questions: Sequence[QA], k: int,
                     other_than: str | None = None) -> list[ContextChunk]:
        """Retrieved chunks that hold none of the row's answers and are not part of the gold paragraph: no
        shared shingle or, with ``other_than``, not of that document (the paragraph's own; looking deeper)."""
        shingles = _shingles(paragraph.context)
        answers = {a.lower() for q in questions for a in q.answers}
        kept = []
        for chunk in self.retrieve(query, k + (10 if other_than is None else 30)):
            own = chunk.document_id == other_than if other_than is not None else bool(shingles & _shingles(chunk.text))
            if own or any(a in chunk.text.lower() for a in answers):
                continue
            kept.append(chunk)
        return kept

    def _example(self, qa: QA, chunks: list[ContextChunk], kind: str) -> tuple[list[int], list[int]]:
        packed = pack_prompt(self.tokenizer, qa.question, chunks, context_window=self.context_window,
                             max_new_tokens=self.max_new_tokens, template_version=PROMPT_TEMPLATE_VERSION)
        refs = [i for i, c in enumerate(packed.chunks, start=1) if c.chunk_id == "gold"]
        target = ABSTAIN_ANSWER if qa.impossible or not refs else format_answer(qa.best_answer, refs[0])
        return build_training_text(self.tokenizer, packed, target)


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + SHINGLE]) for i in range(max(len(words) - SHINGLE + 1, 0))}


def build_rows(builder: RowBuilder, items: Sequence[tuple[Article, Paragraph]], n_rows: int, seed: int,
               desc: str = "rows") -> list[Row]:
    """Up to ``n_rows`` rows from ``items`` taken in a seeded random order."""
    rng = random.Random(seed)
    order = list(items)
    rng.shuffle(order)
    rows: list[Row] = []
    with tqdm(total=min(n_rows, len(order)), desc=desc, unit="row") as bar:
        for article, paragraph in order:
            if len(rows) >= n_rows:
                break
            row = builder.build(article, paragraph, rng)
            if row is not None:
                rows.append(row)
                bar.update(1)
    return rows


def split_articles(articles: Sequence[Article], n_validation: int, seed: int) -> tuple[list[Article], list[Article]]:
    """(training, validation) articles; validation articles are whole articles never trained on."""
    order = sorted(articles, key=lambda a: a.title)
    random.Random(seed).shuffle(order)
    n_validation = min(n_validation, max(len(order) - 1, 0))
    return order[n_validation:], order[:n_validation]


def paragraphs_of(articles: Sequence[Article]) -> list[tuple[Article, Paragraph]]:
    return [(a, p) for a in articles for p in a.paragraphs]


# --- cache -----------------------------------------------------------------------------------------


def cache_key(**parts: Any) -> str:
    payload = {"format": DATA_FORMAT, "prompt": PROMPT_TEMPLATE_VERSION, **parts}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_rows(path: Path, rows: dict[str, list[Row]], info: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"info": info, **{k: [r.to_json() for r in v] for k, v in rows.items()}}))
    tmp.replace(path)  # atomic: a reader never sees half a cache file


def load_rows(path: Path) -> tuple[dict[str, list[Row]], dict[str, Any]] | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    info = data.pop("info")
    return {k: [Row(**r) for r in v] for k, v in data.items()}, info


# --- the training set ------------------------------------------------------------------------------


@dataclass
class CorpusIndex:
    """The service's index over a set of articles, as the composition root opens it (app/evaluation)."""

    retriever: Any  # retrieval.hybrid.HybridRetriever
    ledger: Any  # ingestion.ledger.Ledger
    generation: int
    embedder: Any  # ingestion.embedder.Embedder
    close: Callable[[], None]

    def retrieve(self, question: str, k: int) -> list[ContextChunk]:
        """The top ``k`` chunks through the service's own retrieval path."""
        from generation.rag import retrieve_context

        return retrieve_context(self.retriever, self.ledger, self.generation, question, k)


# (articles, digest of the files they come from) -> their index, opened by the composition root
OpenCorpusIndex = Callable[[Sequence["Article"], str], CorpusIndex]


def prepare_rows(config: Any, tokenizer: Any, files: Sequence[Path], cache_root: Path, *,
                 open_index: OpenCorpusIndex,
                 retrieval_key: dict[str, Any]) -> tuple[dict[str, list[Row]], dict[str, Any]]:
    """Training and validation rows for ``config``, from the cache when the same inputs built them before.

    ``open_index`` gives the service's index of the articles; ``retrieval_key`` the retrieval settings
    it was built with (they are part of the rows' cache key)."""
    digest = file_digest(files)
    data_settings = {name: getattr(config, name) for name in (
        "base_model", "context_window", "max_new_tokens", "max_seq_length", "seed", "validation_articles",
        "validation_rows", "train_rows", "context_chunks", "gold_only_fraction", "no_gold_fraction",
        "questions_per_row", "impossible_per_row", "off_topic_fraction")}
    # prompts are packed into the window the served adapter leaves them (less any virtual tokens)
    data_settings["context_window"] = config.prompt_window
    key = cache_key(data_sha256=digest, data=data_settings, retrieval=retrieval_key, vocab=len(tokenizer))
    path = cache_root / "rows" / f"{key}.json"
    cached = load_rows(path)
    if cached is not None:
        log.info("training rows from the cache %s", path)
        return cached

    articles = load_articles(files)
    train, validation = split_articles(articles, config.validation_articles, config.seed)
    index = open_index(articles, digest)
    try:
        builder = RowBuilder(tokenizer=tokenizer, retrieve=index.retrieve,
                             context_window=config.prompt_window, max_new_tokens=config.max_new_tokens,
                             max_seq_length=config.max_seq_length, context_chunks=tuple(config.context_chunks),
                             gold_only_fraction=config.gold_only_fraction, no_gold_fraction=config.no_gold_fraction,
                             questions_per_row=config.questions_per_row, impossible_per_row=config.impossible_per_row,
                             off_topic_fraction=config.off_topic_fraction,
                             document_ids=article_document_ids(articles))
        rows = {"train": build_rows(builder, paragraphs_of(train), config.train_rows, config.seed, "train rows"),
                "validation": build_rows(builder, paragraphs_of(validation), config.validation_rows,
                                         config.seed + 1, "validation rows")}
    finally:
        index.close()
    info = {"key": key, "data_sha256": digest, "files": [str(f) for f in files],
            "articles": {"train": [a.title for a in train], "validation": [a.title for a in validation]},
            "rows": {name: len(r) for name, r in rows.items()},
            "examples": {name: sum(len(x.branches) for x in r) for name, r in rows.items()},
            "kinds": dict(Counter(r.kind for r in rows["train"])),
            "abstain_targets": sum(_is_abstain_branch(tokenizer, b) for r in rows["train"] for b in r.branches)}
    save_rows(path, rows, info)
    return rows, info


def _is_abstain_branch(tokenizer: Any, branch: dict[str, list[int]]) -> bool:
    answer: str = tokenizer.decode([t for t in branch["labels"] if t != -100], skip_special_tokens=True)
    return answer.strip() == ABSTAIN_ANSWER
