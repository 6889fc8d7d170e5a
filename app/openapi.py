"""What the OpenAPI document says about errors: every error body is ``{"detail": "<what is wrong>"}``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    detail: str = Field(description="What is wrong, in words a person can act on.")


class FieldError(BaseModel):
    field: str
    message: str
    type: str


class ValidationErrorBody(ErrorBody):
    errors: list[FieldError] = Field(default_factory=list, description="One entry per invalid field.")


_MEANING = {
    400: "Malformed JSON (syntax, duplicate keys, NaN, nesting deeper than 64) or a bad header.",
    401: "Missing or invalid API key (or webhook signature, on /ingest).",
    403: "The key is valid but lacks the scope this route needs (query, ingest-status or admin).",
    404: "The named adapter, job or resource does not exist.",
    409: "Conflict: an adapter that does not match or does not load, a reused Idempotency-Key, a running refresh.",
    413: "The body (or a document in it) is over its size limit.",
    422: "Valid JSON that is not a valid request; `errors` names each field.",
    429: "Over a rate limit; retry after `Retry-After` seconds.",
    502: "The generator backend (vLLM, RAG_VLLM_URL) answered with an error or something unreadable.",
    503: "Busy (every generation slot and queue place taken; retry after `Retry-After` seconds) or a part "
         "of the service is not available (for example the vLLM server at RAG_VLLM_URL).",
    504: "The generator backend (vLLM, RAG_VLLM_URL) did not answer in time.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: the listed error statuses with their body model and meaning."""
    return {code: {"model": ValidationErrorBody if code == 422 else ErrorBody, "description": _MEANING[code]}
            for code in codes}
