"""Chunking on long documents: the semantic chunker against fixed-size windows of the same size and overlap.

Each SQuAD article becomes one document (its paragraphs joined, paragraph breaks kept, the article
title as the document title); its questions are asked against all articles of the file. A question
is answered at k when one of the top-k chunks contains a gold answer (case-insensitive substring of
the chunk body, the title header left out so that a title alone never counts as an answer).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.settings import Settings
from ingestion.chunker import effective_limit, fixed_size_chunks
from ingestion.documents import Chunk, Document
from app.evaluation.indexes import DEFAULT_CACHE, EvalIndex, file_digest, index_key, key_hash, open_index
from app.evaluation.retrieval import embed_queries, eval_retriever, run_method
from app.evaluation.scoring import latency_summary

KS = (1, 3, 5, 10)
CHUNKERS = ("semantic", "fixed")
METHODS = {"hybrid": {}, "bm25": {"method": "bm25"}, "dense": {"method": "dense"}}


@dataclass(frozen=True)
class Question:
    question_id: str
    document_id: str
    text: str
    answers: tuple[str, ...]


class FixedSizeChunker:
    """``fixed_size_chunks`` behind the chunker interface the indexer expects."""

    def __init__(self, embedder, *, max_tokens: int, overlap_tokens: int) -> None:
        self.embedder = embedder
        self.max_tokens = max_tokens
        self.overlap_tokens = overlap_tokens
        self.limit = effective_limit(embedder, max_tokens, overlap_tokens)  # the semantic chunker's limit too

    def chunk(self, document: Document) -> list[Chunk]:
        return fixed_size_chunks(document, self.embedder, self.max_tokens, self.overlap_tokens)


def squad_articles(path: Path, limit: int | None = None) -> tuple[list[Document], list[Question]]:
    """One Document per article (paragraphs joined by blank lines) and every answerable question."""
    data = json.loads(path.read_text(encoding="utf-8"))["data"][:limit]
    documents, questions = [], []
    for number, article in enumerate(data):
        document_id = f"squad-{number:03d}"
        title = article["title"].replace("_", " ")
        paragraphs = [p["context"].strip() for p in article["paragraphs"]]
        documents.append(Document(document_id=document_id, text="\n\n".join(paragraphs), title=title,
                                  source=str(path), created_at="2016-01-01T00:00:00+00:00"))
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = tuple(dict.fromkeys(a["text"].strip() for a in qa["answers"] if a["text"].strip()))
                if answers and not qa.get("is_impossible"):
                    questions.append(Question(qa["id"], document_id, qa["question"], answers))
    return documents, questions


def chunk_body(chunk: Chunk, title: str) -> str:
    """The chunk text without its title header line."""
    header = " ".join(title.split()) + "\n"
    return chunk.text[len(header):] if chunk.text.startswith(header) else chunk.text


def answer_recall(hits: Mapping[str, list], questions: Sequence[Question], bodies: Mapping[str, str],
                  ks: Sequence[int] = KS) -> dict[str, float]:
    """Share of questions with a gold answer inside one of their top-k chunks, for each k."""
    found = {k: 0 for k in ks}
    for question in questions:
        answers = [a.lower() for a in question.answers]
        ranked = [bodies[h.chunk_id].lower() for h in hits[question.question_id][:max(ks)]]
        first = next((i for i, body in enumerate(ranked) if any(a in body for a in answers)), None)
        for k in ks:
            found[k] += first is not None and first < k
    return {f"recall@{k}": round(found[k] / max(len(questions), 1), 4) for k in ks}


def chunk_stats(index: EvalIndex) -> dict[str, Any]:
    sizes = [c.chunk_size_tokens for c in index.services.ledger.iter_chunks(index.services.generation.generation)]
    return {"chunks": len(sizes), "mean_tokens": round(float(np.mean(sizes)), 1) if sizes else 0.0,
            "median_tokens": float(np.median(sizes)) if sizes else 0.0}


def open_chunking_index(kind: str, squad: Path, settings: Settings, documents: list[Document],
                        limit: int | None, cache_root: Path) -> EvalIndex:
    key = {**index_key(file_digest(squad), settings, chunker=kind), "squad_articles": limit}
    build = None
    if kind == "fixed":
        def build(services):
            return FixedSizeChunker(services.embedder, max_tokens=settings.chunk_max_tokens,
                                    overlap_tokens=settings.chunk_overlap_tokens)
    return open_index(settings, cache_root / key_hash(key), key, lambda: documents, chunker=build, owned=True)


def evaluate_chunking(squad: Path, settings: Settings, *, limit: int | None = None,
                      cache_root: Path | None = None) -> dict[str, Any]:
    """Answer recall@k per chunker and retrieval method, with chunk counts and sizes."""
    documents, questions = squad_articles(squad, limit)
    titles = {d.document_id: d.title for d in documents}
    report: dict[str, Any] = {"squad": str(squad), "articles": len(documents), "questions": len(questions),
                              "chunk_max_tokens": settings.chunk_max_tokens,
                              "chunk_overlap_tokens": settings.chunk_overlap_tokens, "chunkers": {}}
    vectors = None
    for kind in CHUNKERS:
        index = open_chunking_index(kind, squad, settings, documents, limit, cache_root or DEFAULT_CACHE)
        try:
            if vectors is None:
                vectors, _ = embed_queries(index.services.embedder, [q.text for q in questions])
            bodies = {c.chunk_id: chunk_body(c, titles[c.document_id])
                      for c in index.services.ledger.iter_chunks(index.services.generation.generation)}
            retriever = eval_retriever(index, settings, max(settings.candidates, max(KS)))
            texts = {q.question_id: q.text for q in questions}
            entry = {**chunk_stats(index), "effective_limit_tokens": index.services.chunker.limit, "methods": {}}
            for method, options in METHODS.items():
                hits, latencies = run_method(retriever, texts, vectors, max(KS), f"{kind}/{method}", **options)
                entry["methods"][method] = {**answer_recall(hits, questions, bodies), **latency_summary(latencies)}
            report["chunkers"][kind] = entry
        finally:
            index.close()
    return report


def format_chunking(report: Mapping[str, Any]) -> str:
    lines = [f"{report['squad']}: {report['articles']} articles as long documents, {report['questions']} questions; "
             f"chunks of at most {report['chunk_max_tokens']} tokens, {report['chunk_overlap_tokens']} overlap",
             "", "| chunker | chunks | mean tokens | method | recall@1 | recall@3 | recall@5 | recall@10 |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, entry in report["chunkers"].items():
        for method, m in entry["methods"].items():
            lines.append(f"| {kind} | {entry['chunks']} | {entry['mean_tokens']:.0f} | {method} | {m['recall@1']:.4f} "
                         f"| {m['recall@3']:.4f} | {m['recall@5']:.4f} | {m['recall@10']:.4f} |")
    return "\n".join(lines)
