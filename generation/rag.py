"""Answer a question: retrieve chunks, pack them into the prompt, generate, and cite.

The same path serves HTTP and the CLI. Citations list exactly the chunks the generator was given,
numbered as in the prompt, so ``[n]`` in the answer points at ``citations[n-1]``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from generation.generate import generate_answer
from generation.loading import LoadedGenerator
from generation.prompt import PROMPT_TEMPLATE_VERSION, ContextChunk, pack_prompt
from ingestion.ledger import Ledger
from retrieval.bm25 import Filters
from retrieval.hybrid import HybridRetriever


@dataclass
class Citation:
    ref: int
    chunk_id: str
    document_id: str
    section: str
    source: str
    score: float
    text: str


@dataclass
class Answer:
    answer: str
    citations: list[Citation]
    provenance: dict
    timings_ms: dict[str, float] = field(default_factory=dict)


def retrieve_context(retriever: HybridRetriever, ledger: Ledger, generation: int, question: str, top_k: int, *,
                     filters: Filters | None = None, alpha: float | None = None) -> list[ContextChunk]:
    """The top chunks as prompt context, best first (hits whose chunk left the ledger are dropped)."""
    hits = retriever.search(question, top_k, filters=filters, alpha=alpha)
    rows = ledger.get_chunks(generation, [h.chunk_id for h in hits])
    return [
        ContextChunk(text=rows[h.chunk_id].text, chunk_id=h.chunk_id, document_id=rows[h.chunk_id].document_id,
                     section=rows[h.chunk_id].section, source=rows[h.chunk_id].source, score=h.score)
        for h in hits if h.chunk_id in rows
    ]


def answer_question(question: str, *, retriever: HybridRetriever, ledger: Ledger, generation: int,
                    generator: LoadedGenerator, provenance: dict, top_k: int, max_new_tokens: int,
                    timeout_s: float | None = None, filters: Filters | None = None,
                    alpha: float | None = None) -> Answer:
    started = time.perf_counter()
    context = retrieve_context(retriever, ledger, generation, question, top_k, filters=filters, alpha=alpha)
    retrieved = time.perf_counter()
    packed = pack_prompt(generator.tokenizer, question, context,
                         context_window=generator.context_window, max_new_tokens=max_new_tokens)
    result = generate_answer(generator, packed, max_new_tokens=max_new_tokens, timeout_s=timeout_s)
    finished = time.perf_counter()
    citations = [
        Citation(ref=i, chunk_id=c.chunk_id, document_id=c.document_id, section=c.section, source=c.source,
                 score=round(c.score, 6), text=c.text)
        for i, c in enumerate(packed.chunks, start=1)
    ]
    return Answer(
        answer=result.text,
        citations=citations,
        provenance={**provenance, "prompt_template_version": PROMPT_TEMPLATE_VERSION},
        timings_ms={
            "retrieval": round((retrieved - started) * 1000, 1),
            "generation": round((finished - retrieved) * 1000, 1),
            "total": round((finished - started) * 1000, 1),
        },
    )
