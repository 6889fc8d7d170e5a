"""Request and response models of the HTTP API. Unknown fields are rejected everywhere."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from generation.adapters import ADAPTER_REF_RE
from generation.grounding import AbstainReason
from generation.rag import Citation
from ingestion.indexer import IngestCounts

MAX_QUESTION_CHARS = 8000  # hard cap; the configured limit (RAG_MAX_QUESTION_CHARS) is checked in the route


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QueryFilters(Strict):
    """Equality filters; a list means any of. Filters apply to BM25 and dense retrieval alike."""

    document_id: str | list[str] | None = None
    source: str | list[str] | None = None
    section: str | list[str] | None = None

    @field_validator("document_id", "source", "section")
    @classmethod
    def _non_empty(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and not value:
            raise ValueError("an empty list matches nothing; leave the filter out instead")
        return value

    def as_dict(self) -> dict[str, list[str]]:
        return {k: ([v] if isinstance(v, str) else v) for k, v in self.model_dump(exclude_none=True).items()}


class QueryRequest(Strict):
    question: str = Field(..., max_length=MAX_QUESTION_CHARS)
    # strict: true/false are not numbers here
    top_k: int | None = Field(None, ge=1, le=50, strict=True,
                              description="Chunks given to the generator (default from settings).")
    filters: QueryFilters | None = None
    alpha: float | None = Field(None, ge=0.0, le=1.0, strict=True,
                                description="Weight of the dense score in convex fusion.")
    adapter: str | None = Field(None, min_length=1, max_length=160, pattern=ADAPTER_REF_RE.pattern,
                                description="Adapter from the registry, name or name@version (default from "
                                            "settings; \"none\": the base model). Never a path.")
    stream: bool = Field(False, strict=True, description="Answer as server-sent events (also with "
                                                         "Accept: text/event-stream).")

    @field_validator("question")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("question must not be empty")
        return value


class Provenance(BaseModel):
    index_collection: str
    index_generation: int
    embedding_model: str
    generator_model: str
    adapter: str | None
    reranker: str | None = None  # the reranker (RAG_RERANK_MODEL), when one is configured
    prompt_template_version: str


class Timings(BaseModel):
    retrieval: float
    generation: float
    total: float



class QueryResponse(BaseModel):
    answer: str = Field(description="A short answer citing [n], or \"I don't know.\" when abstained.")
    abstained: bool = Field(description="True when the service declined to answer (see abstain_reason).")
    abstain_reason: AbstainReason | None = Field(
        description="no_relevant_context: no retrieved chunk was relevant enough, the generator did not run; "
                    "model_abstained: the generator said it does not know; unsupported_answer: the answer's "
                    "citations did not support it (RAG_UNSUPPORTED=abstain); empty_answer: nothing was generated; "
                    "incomplete_answer: the answer was cut off (finish_reason length, timeout or cancelled).")
    grounded: bool = Field(description="A cited chunk holds the answer, with the question's terms around it.")
    grounding_score: float = Field(description="Support x evidence of the best cited chunk, 0..1.")
    cited: list[int] = Field(description="Refs the returned answer cites (citations[ref-1]).")
    removed_citations: int = Field(0, description="[n] in the generated text that named no given chunk, removed.")
    citation_repair: Literal["attached", "corrected"] | None = Field(
        None, description="attached: the answer cited nothing and the chunk that supports it was cited; "
                          "corrected: citations that did not support the answer were replaced by the one that does.")
    finish_reason: Literal["stop", "length", "timeout", "cancelled"] | None = Field(
        None, description="Why generation ended: stop (complete), length (RAG_MAX_NEW_TOKENS reached), timeout "
                          "(RAG_GENERATION_TIMEOUT_S), cancelled (the client left); null: the generator did not run. "
                          "Only a complete answer can be grounded.")
    citations: list[Citation] = Field(description="Every chunk given to (or, without generation, considered "
                                                  "for) the generator, numbered as in the prompt.")
    provenance: Provenance
    timings_ms: Timings

    @classmethod
    def from_answer(cls, answer: Any) -> "QueryResponse":
        """From a generation.rag.Answer (same field names)."""
        return cls.model_validate({name: getattr(answer, name) for name in cls.model_fields})


class Health(BaseModel):
    status: str
    documents: int
    chunks: int
    index_generation: int
    index_collection: str
    embedding_model: str
    generator_model: str
    adapter: str | None
    refresh_running: bool = False
    refresh_job_id: str | None = None
    previous_generation: int | None = None
    generator_loaded: bool = True
    generator_backend: str = "transformers"
    generations_running: int = Field(0, description="Queries generating now (at most RAG_MAX_CONCURRENT_GENERATIONS).")
    generations_waiting: int = Field(0, description="Queries queued for a slot (at most RAG_GENERATION_QUEUE_SIZE).")
    queries_rejected: int = Field(0, description="Queries answered 503 busy since the service started.")
    # vLLM backend only: {"url", "model", "reachable", "adapter_loaded", "error"}, checked with a short timeout
    generator_backend_state: dict[str, Any] | None = None


class JobAccepted(BaseModel):
    job_id: str
    kind: str
    status: str
    status_url: str


class JobStatus(BaseModel):
    job_id: str
    kind: str
    status: str  # queued | running | succeeded | failed
    progress: dict
    counts: IngestCounts  # the ingestion stage's own type: a new counter reaches the API by itself
    error: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
