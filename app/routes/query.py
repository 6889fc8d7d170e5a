"""POST /query: a question in, a grounded answer with citations out."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status
from fastapi.concurrency import run_in_threadpool

from app.deps import ApiKey, ServicesDep, SettingsDep
from app.gate import Busy
from app.schemas import QueryRequest, QueryResponse
from generation.adapters import AdapterMismatch
from generation.rag import answer_question

router = APIRouter(tags=["query"])


@router.post("/query", response_model=QueryResponse, dependencies=[ApiKey])
async def query(body: QueryRequest, services: ServicesDep, settings: SettingsDep) -> QueryResponse:
    if len(body.question) > settings.max_question_chars:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"question: longer than {settings.max_question_chars} characters ({len(body.question)})")
    if services.generator is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "this service runs without a generator (RAG_LOAD_GENERATOR=false)")
    try:
        generator = services.generator_for(body.adapter)
    except LookupError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except AdapterMismatch as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    try:
        live = services.live  # one consistent generation for the whole request, whatever switches meanwhile
        with services.gate.slot(wait_s=settings.generation_timeout_s):
            result = await run_in_threadpool(
                answer_question, body.question, retriever=live.retriever, ledger=services.ledger,
                generation=live.generation.generation, generator=generator,
                provenance=services.provenance(generator, live), top_k=body.top_k or settings.top_k,
                max_new_tokens=settings.max_new_tokens, timeout_s=settings.generation_timeout_s,
                filters=body.filters.as_dict() if body.filters else None, alpha=body.alpha,
                unsupported=settings.unsupported, scorer=services.reranker,
            )
    except Busy as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"busy: {exc}; retry shortly",
                            headers={"Retry-After": "5"}) from None
    except ValueError as exc:  # e.g. the question alone overflows the context window
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return QueryResponse.from_answer(result)
