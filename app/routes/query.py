"""POST /query: a question in, a grounded answer with citations out, whole or streamed.

Nothing here blocks the event loop: adapter loading, retrieval and generation run in worker threads,
and admission (app/gate.py) is awaited. A streamed answer (``"stream": true`` or
``Accept: text/event-stream``) is a server-sent event stream:

- ``event: delta``, ``data: {"text": "..."}``: the generated text as it comes (joined, the raw answer);
- ``event: answer``: the whole QueryResponse, as a non-streamed request gets it. Its ``answer`` is the
  one to show: when the grounding decision withdraws what was streamed (unsupported, cut off), it is
  "I don't know." with ``abstained: true``;
- ``event: error``, ``data: {"status": ..., "detail": ...}``: the request failed after the stream began.

A client that disconnects cancels its generation; its slot is freed once the generator has stopped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio
from fastapi import APIRouter, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from app.audit import record_query
from app.deps import QueryBudget, QueryCaller, ServicesDep, SettingsDep
from app.gate import Busy
from app.json_body import StrictJSONRoute
from app.openapi import error_responses
from app.schemas import QueryRequest, QueryResponse
from generation.adapters import AdapterBroken, AdapterMismatch, AdapterNotFound
from generation.rag import answer_question
from generation.vllm_backend import VllmError
from retrieval.dense import ChromaUnavailable

log = logging.getLogger(__name__)
router = APIRouter(tags=["query"], route_class=StrictJSONRoute)

RETRY_AFTER_S = "5"


def _busy(exc: Busy) -> HTTPException:
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"busy: {exc}; retry shortly",
                         headers={"Retry-After": RETRY_AFTER_S})


def _answer_error(exc: Exception) -> HTTPException | None:
    """The HTTP error for what answering raised; None when it is not the request's fault."""
    if isinstance(exc, AdapterNotFound):
        return HTTPException(status.HTTP_404_NOT_FOUND, str(exc))
    if isinstance(exc, (AdapterMismatch, AdapterBroken)):
        return HTTPException(status.HTTP_409_CONFLICT, str(exc))
    if isinstance(exc, VllmError):  # the vLLM backend down (503), slow (504) or answering nonsense (502)
        return HTTPException(exc.status, str(exc))
    if isinstance(exc, ChromaUnavailable):  # the Chroma server went away: not the request's fault, but named
        log.error("query failed: %s", exc)
        return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc), headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(exc, ValueError):  # e.g. the question alone overflows the context window
        return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc))
    return None


@router.post("/query", response_model=QueryResponse,
             responses={**error_responses(400, 401, 403, 404, 409, 413, 422, 429, 502, 503, 504),
                        200: {"content": {"text/event-stream": {"description": "With \"stream\": true: delta "
                                                                               "events, then one answer event."}}}})
async def query(body: QueryRequest, request: Request, caller: QueryCaller, budget: QueryBudget,
                services: ServicesDep, settings: SettingsDep) -> Any:
    """Answers, and records the request in the audit trail (app/audit.py) with what came back."""
    try:
        response = await _query(body, request, caller, budget, services, settings)
    except HTTPException as exc:
        record_query(request, body, status=exc.status_code, error=str(exc.detail))
        raise
    if isinstance(response, _AnswerStream):
        response.on_finish = lambda *outcome: record_query(request, body, *outcome, streamed=True)
    else:
        record_query(request, body, response)
    return response


async def _query(body: QueryRequest, request: Request, caller: QueryCaller, budget: QueryBudget,
                 services: ServicesDep, settings: SettingsDep) -> Any:
    if len(body.question) > settings.max_question_chars:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"question: longer than {settings.max_question_chars} characters ({len(body.question)})")
    if services.generator is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "this service runs without a generator (RAG_LOAD_GENERATOR=false)")
    try:  # loaded once per adapter, off the loop; concurrent first users wait for the same load
        generator = await run_in_threadpool(services.generator_for, body.adapter)
    except (AdapterNotFound, AdapterMismatch, AdapterBroken) as exc:
        raise _answer_error(exc) from None
    live = services.live  # one consistent generation for the whole request, whatever switches meanwhile
    cancel = threading.Event()

    def answer(on_text: Callable[[str], None] | None = None):
        result = answer_question(
            body.question, retriever=live.retriever, ledger=services.ledger, generation=live.generation.generation,
            generator=generator, provenance=services.provenance(generator, live), top_k=body.top_k or settings.top_k,
            max_new_tokens=settings.max_new_tokens, timeout_s=settings.generation_timeout_s,
            filters=body.filters.as_dict() if body.filters else None, alpha=body.alpha,
            unsupported=settings.unsupported, reranker=services.reranker, rerank_top_n=settings.rerank_top_n,
            on_text=on_text, cancel=cancel,
            groups=caller.groups)
        budget.charge(result.completion_tokens)  # streamed or not, cancelled included: what was generated
        return result

    metrics = request.app.state.metrics
    admission = AsyncExitStack()
    try:
        await admission.enter_async_context(services.gate.slot(wait_s=settings.queue_wait_s))
    except Busy as exc:
        metrics.observe_rejection(exc.reason)
        raise _busy(exc) from None
    if body.stream or "text/event-stream" in request.headers.get("accept", ""):
        return _AnswerStream(answer, cancel, admission, on_answer=metrics.observe_answer)
    async with admission:
        try:
            result = await run_in_threadpool(answer)
        except (ValueError, VllmError, ChromaUnavailable) as exc:
            raise _answer_error(exc) from None
    metrics.observe_answer(result)
    return QueryResponse.from_answer(result)


def _event(name: str, data: Any) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class _AnswerStream(StreamingResponse):
    """Relays one answer as server-sent events; owns the request's admission slot until the end.

    Whatever ends the response (the last event, a client disconnect, a cancelled task), ``__call__``
    sets ``cancel``, waits for the generator thread to stop, and only then frees the slot.
    """

    def __init__(self, answer: Callable, cancel: threading.Event, admission: AsyncExitStack,
                 on_answer: Callable[[Any], None]) -> None:
        self._answer, self._cancel, self._admission, self._on_answer = answer, cancel, admission, on_answer
        self._work: asyncio.Future | None = None
        # called once with (response, status, error) when the stream ends, however it ends
        self.on_finish: Callable[..., None] | None = None
        super().__init__(self._events(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._finish(None, 499, "the client went away before the answer")
            self._cancel.set()
            with anyio.CancelScope(shield=True):  # anyio re-cancels every await of a cancelled task
                if self._work is not None:
                    await asyncio.wait([self._work])
                await self._admission.aclose()

    async def _events(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[str | None] = asyncio.Queue()

        def run():
            try:
                return self._answer(lambda text: loop.call_soon_threadsafe(deltas.put_nowait, text))
            finally:
                loop.call_soon_threadsafe(deltas.put_nowait, None)

        self._work = asyncio.ensure_future(run_in_threadpool(run))
        while (text := await deltas.get()) is not None:
            yield _event("delta", {"text": text})
        try:
            result = await self._work
        except Exception as exc:  # headers are sent: the error travels as an event
            error = _answer_error(exc)
            if error is None:
                log.exception("streamed query failed")
                error = HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, "internal error; see the server log")
            self._finish(None, error.status_code, str(error.detail))
            yield _event("error", {"status": error.status_code, "detail": error.detail})
            return
        self._on_answer(result)
        response = QueryResponse.from_answer(result)
        self._finish(response, 200, None)
        yield _event("answer", response.model_dump(mode="json"))

    def _finish(self, response: QueryResponse | None, status_code: int, error: str | None) -> None:
        finish, self.on_finish = self.on_finish, None
        if finish is not None:
            finish(response, status_code, error)
