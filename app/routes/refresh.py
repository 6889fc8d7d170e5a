"""Admin: POST /refresh (a full refresh) and POST /refresh/rollback, each answered with a job.

One refresh or rollback at a time: while one is queued or running, both answer 409 with its job_id.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from app.audit import caller_actor, request_id
from app.container import Services
from app.deps import AdminKey, ServicesDep
from app.openapi import error_responses
from app.worker import submit_refresh

router = APIRouter(tags=["ops"], dependencies=[AdminKey])


async def _submit(services: Services, kind: str, request: Request, embedding_model: str | None = None) -> JSONResponse:
    try:
        outcome, response = await run_in_threadpool(submit_refresh, services, kind, actor=caller_actor(request),
                                                     request_id=request_id(request), embedding_model=embedding_model)
    except ValueError as exc:  # the requested embedding model is not there
        return JSONResponse(status_code=status.HTTP_422_UNPROCESSABLE_CONTENT, content={"detail": str(exc)})
    if outcome == "active":
        return JSONResponse(status_code=status.HTTP_409_CONFLICT,
                            content={"detail": "a refresh or rollback is already queued or running",
                                     "job_id": response["job_id"], "status_url": f"/jobs/{response['job_id']}"})
    return JSONResponse(status_code=status.HTTP_202_ACCEPTED, content=response,
                        headers={"Location": response["status_url"]})


@router.post("/refresh", status_code=status.HTTP_202_ACCEPTED, responses=error_responses(401, 403, 409, 422))
async def refresh(services: ServicesDep, request: Request, embedding_model: str | None = None) -> JSONResponse:
    """A full refresh; `embedding_model` (e.g. embedder:scifact) builds the new generation with that model
    instead of RAG_EMBEDDING_MODEL: after the switch questions are embedded with it, after a rollback with the old."""
    return await _submit(services, "refresh", request, embedding_model)


@router.post("/refresh/rollback", status_code=status.HTTP_202_ACCEPTED, responses=error_responses(401, 403, 409))
async def rollback(services: ServicesDep, request: Request) -> JSONResponse:
    return await _submit(services, "rollback", request)
