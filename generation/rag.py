"""Answer a question: retrieve chunks, pack them into the prompt, generate if they are relevant, verify, cite.

The same path serves HTTP and the CLI, and :func:`grounded_generation` is also what evaluation scores.
Citations list exactly the chunks the generator was given (or would have been given, when nothing was
relevant enough to generate), numbered as in the prompt, so ``[n]`` in the answer points at
``citations[n-1]``. The grounding decision (generation/grounding.py) says whether the answer is returned,
flagged or replaced by the abstention.

Spans (OpenTelemetry API; no-ops unless the service installs a tracer provider): ``rag.answer`` around
``retrieve`` (with ``rerank`` inside it when a reranker is configured: the fused top N reordered by the
cross-encoder, top k kept), ``pack``, ``generate`` (when the gate lets it run) and ``verify``. The reranker's
scores travel on the chunks and are the gate's answerability signal too (generation/grounding.py).
Attributes are counts, scores and outcomes, never the question or the chunks' text.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Annotated, Any

from opentelemetry import trace
from pydantic import Field

from generation.generate import GenerationResult, Generator
from generation.grounding import (Decision, Thresholds, UnsupportedPolicy, abstain_margin_for, has_relevant_context,
                                  measure, relevance_signals, verdict)
from generation.prompt import ContextChunk, PackedPrompt, pack_prompt
from ingestion.ledger import Ledger
from retrieval.acl import Groups, visible
from retrieval.bm25 import Filters
from retrieval.hybrid import HybridRetriever

tracer = trace.get_tracer(__name__)


@dataclass
class Citation:
    """One chunk given to the generator; the same type goes out on the wire (app/schemas.py), so the
    descriptions here are the API's."""

    ref: Annotated[int, Field(description="[ref] in the answer points at this chunk.")]
    chunk_id: str
    document_id: str
    section: str
    source: str
    score: Annotated[float, Field(description="Fused retrieval score (1.0: the best hit of this question).")]
    text: str
    relevance: Annotated[float, Field(description="Share of the question's content terms (idf-weighted) found in "
                                                  "the chunk (generation/grounding.py).")] = 0.0
    rerank_score: Annotated[float | None, Field(
        description="The reranker's probability that the chunk answers the question (RAG_RERANK_MODEL; "
                    "null without one). Chunks are ordered by it when it ran.")] = None
    dense_score: Annotated[float | None, Field(description="Cosine similarity of question and chunk.")] = None
    supports_answer: Annotated[bool, Field(
        description="The answer cites this chunk and the chunk supports it.")] = False


@dataclass
class Answer:
    answer: str
    citations: list[Citation]
    provenance: dict[str, Any]
    timings_ms: dict[str, float] = field(default_factory=dict)
    abstained: bool = False
    abstain_reason: str | None = None
    grounded: bool = False
    grounding_score: float = 0.0
    cited: list[int] = field(default_factory=list)
    removed_citations: int = 0
    citation_repair: str | None = None  # "attached" / "corrected" (generation/grounding.py)
    finish_reason: str | None = None  # the generator's ("stop", "length", "timeout", "cancelled"); None: not run
    generated: str | None = None  # what the generator wrote (citations cleaned), before the grounding decision
    prompt_tokens: int = 0  # the packed prompt given to the generator (0: it did not run)
    completion_tokens: int = 0  # tokens it wrote


@dataclass
class Grounded:
    packed: PackedPrompt
    result: GenerationResult | None  # None: nothing relevant, the generator was not run
    decision: Decision  # its .signals: what was measured


def grounded_generation(generator: Generator, question: str, chunks: list[ContextChunk], *,
                        max_new_tokens: int, timeout_s: float | None = None,
                        unsupported: UnsupportedPolicy = "abstain", thresholds: Thresholds | None = None,
                        abstain_margin: float | None = None, scorer: Any = None,
                        term_weights: Any = None, on_text: Callable[[str], None] | None = None,
                        cancel: threading.Event | None = None) -> Grounded:
    """Pack ``chunks``, generate when one is relevant enough, and decide what to return.

    ``generator`` is any backend (generation.generate.Generator: ``tokenizer``, ``context_window``,
    ``grounding``, ``prompt_template_version``, ``generate``); the prompt is packed with its template version.
    ``scorer`` is the reranker (retrieval/cross_encoder.py), or None, for chunks that carry no
    ``rerank_score`` yet (given chunks, not retrieved ones); ``term_weights``
    the live index's idf (``BM25Index.idf``) for the relevance signal.
    ``on_text`` receives the raw answer as it is generated; the decision may still withdraw it.
    """
    thresholds = thresholds or generator.grounding
    with tracer.start_as_current_span("pack") as span:
        packed = pack_prompt(generator.tokenizer, question, chunks,
                             context_window=generator.context_window, max_new_tokens=max_new_tokens,
                             template_version=generator.prompt_template_version)
        span.set_attributes({"rag.chunks_given": len(chunks), "rag.chunks_packed": len(packed.chunks),
                             "rag.prompt_tokens": packed.n_tokens, "rag.prompt_budget": packed.budget})
    unscored = scorer is not None and any(c.rerank_score is None for c in packed.chunks)
    with tracer.start_as_current_span("rerank") if unscored else nullcontext():
        signals = relevance_signals(question, packed.chunks, scorer, term_weights)
    if not has_relevant_context(signals, thresholds):
        return Grounded(packed, None, verdict(signals, thresholds, unsupported))
    if thresholds.margin_slope:
        base = generator.abstain_margin if abstain_margin is None else abstain_margin
        abstain_margin = abstain_margin_for(base, signals, thresholds)
    with tracer.start_as_current_span("generate") as span:
        result = generator.generate(packed, max_new_tokens=max_new_tokens, timeout_s=timeout_s,
                                    abstain_margin=abstain_margin, on_text=on_text, cancel=cancel)
        span.set_attributes({"rag.prompt_tokens": result.n_prompt_tokens,
                             "rag.completion_tokens": result.n_new_tokens, "rag.finish_reason": result.finish_reason})
    with tracer.start_as_current_span("verify") as span:
        signals = measure(question, packed.chunks, result.text, confidence=result.mean_logprob,
                          abstain_preference=result.abstain_preference, finish_reason=result.finish_reason,
                          signals=signals)
        decision = verdict(signals, thresholds, unsupported)
        span.set_attributes({"rag.grounded": decision.grounded, "rag.abstained": decision.abstained})
    return Grounded(packed, result, decision)


def retrieve_context(retriever: HybridRetriever, ledger: Ledger, generation: int, question: str, top_k: int, *,
                     filters: Filters | None = None, alpha: float | None = None,
                     groups: Groups = None, reranker: Any = None, rerank_top_n: int = 0) -> list[ContextChunk]:
    """The top chunks `groups` may see (None: every chunk; retrieval/acl.py) as prompt context, best first.

    With a `reranker` (retrieval.cross_encoder.CrossEncoderReranker), the fused top ``max(rerank_top_n,
    top_k)`` are reordered by its score and the best `top_k` kept, each with its ``rerank_score``.

    Both indexes filter by `groups` before fusion. Each hit is checked again against its ledger row, the
    source of truth: a hit whose chunk left the ledger, or whose acl there no longer admits `groups` (an
    index behind its ledger for a moment, while a job runs), is dropped.
    """
    depth = max(rerank_top_n, top_k) if reranker is not None else top_k
    hits = retriever.search(question, depth, filters=filters, alpha=alpha, groups=groups)
    rows = ledger.get_chunks(generation, [h.chunk_id for h in hits])
    chunks = [
        ContextChunk(text=rows[h.chunk_id].text, chunk_id=h.chunk_id, document_id=rows[h.chunk_id].document_id,
                     section=rows[h.chunk_id].section, source=rows[h.chunk_id].source, score=h.score,
                     dense_score=h.dense_score, bm25_score=h.bm25_score)
        for h in hits if h.chunk_id in rows and visible(rows[h.chunk_id].acl, groups)
    ]
    if reranker is None:
        return chunks
    with tracer.start_as_current_span("rerank") as span:
        ranked = reranker.rerank(question, [c.text for c in chunks], top_k)
        span.set_attributes({"rag.rerank_candidates": len(chunks), "rag.top_k": top_k})
    return [replace(chunks[i], rerank_score=round(score, 4)) for i, score in ranked]


def answer_question(question: str, *, retriever: HybridRetriever, ledger: Ledger, generation: int,
                    generator: Generator, provenance: dict[str, Any], top_k: int, max_new_tokens: int,
                    timeout_s: float | None = None, filters: Filters | None = None,
                    alpha: float | None = None, unsupported: UnsupportedPolicy = "abstain",
                    reranker: Any = None, rerank_top_n: int = 0, on_text: Callable[[str], None] | None = None,
                    cancel: threading.Event | None = None, groups: Groups = None) -> Answer:
    """`groups`: the caller's (app.access.Caller.groups); only chunks they may see are retrieved, given to
    the generator and cited. `reranker`: the reranking stage (see retrieve_context), whose scores are also
    the gate's answerability signal."""
    with tracer.start_as_current_span("rag.answer") as span:
        started = time.perf_counter()
        with tracer.start_as_current_span("retrieve") as retrieve_span:
            context = retrieve_context(retriever, ledger, generation, question, top_k, filters=filters,
                                       alpha=alpha, groups=groups, reranker=reranker,
                                       rerank_top_n=rerank_top_n)
            retrieve_span.set_attributes({"rag.index_generation": generation, "rag.top_k": top_k,
                                          "rag.chunks_found": len(context), "rag.filtered": bool(filters)})
        retrieved = time.perf_counter()
        grounded = grounded_generation(generator, question, context, max_new_tokens=max_new_tokens,
                                       timeout_s=timeout_s, unsupported=unsupported, scorer=reranker,
                                       term_weights=retriever.bm25.idf, on_text=on_text, cancel=cancel)
        finished = time.perf_counter()
        decision = grounded.decision
        span.set_attributes({"rag.abstained": decision.abstained, "rag.grounded": decision.grounded,
                             "rag.generated": grounded.result is not None,
                             "rag.adapter": str(provenance.get("adapter") or "none")})
        if decision.abstain_reason:
            span.set_attribute("rag.abstain_reason", decision.abstain_reason)
    citations = [
        Citation(ref=i, chunk_id=c.chunk_id, document_id=c.document_id, section=c.section, source=c.source,
                 score=round(c.score, 6), text=c.text, relevance=decision.relevance[i - 1],
                 rerank_score=decision.answerability[i - 1],
                 dense_score=None if c.dense_score is None else round(c.dense_score, 6),
                 supports_answer=decision.grounded and i in decision.cited)
        for i, c in enumerate(grounded.packed.chunks, start=1)
    ]
    return Answer(
        answer=decision.answer,
        citations=citations,
        provenance={**provenance, "prompt_template_version": grounded.packed.template_version},
        timings_ms={
            "retrieval": round((retrieved - started) * 1000, 1),
            "generation": round((finished - retrieved) * 1000, 1),
            "total": round((finished - started) * 1000, 1),
        },
        abstained=decision.abstained,
        abstain_reason=decision.abstain_reason,
        grounded=decision.grounded,
        grounding_score=decision.grounding_score,
        cited=decision.cited,
        removed_citations=decision.removed_citations,
        citation_repair=decision.citation_repair,
        finish_reason=grounded.result.finish_reason if grounded.result else None,
        prompt_tokens=grounded.result.n_prompt_tokens if grounded.result else 0,
        completion_tokens=grounded.result.n_new_tokens if grounded.result else 0,
    )
