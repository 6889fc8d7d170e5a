"""POST /ingest (signed, idempotent, asynchronous) and GET /jobs/{job_id}.

Order of checks: webhook enabled (503), signature (401), Idempotency-Key shape (400), body (400, 413,
422); only then is anything written: the job and its idempotency claims, in one transaction.
Claims: ``key:<Idempotency-Key>`` (RAG_IDEMPOTENCY_TTL_S), and ``sig:<hash of t and body>`` so an
identical signed request replayed inside the signature window gets the same answer and no second job.
"""

from __future__ import annotations

import hashlib

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from app.audit import audit_of, request_id, requested_by, webhook_actor
from app.deps import IngestStatusKey, ServicesDep, SettingsDep
from app.ingest_payload import PayloadError, parse_ingest_body
from app.openapi import error_responses
from app.schemas import JobStatus
from app.signature import SignatureError, verify_with_secret
from ingestion.jobs import ingest_payload

router = APIRouter(tags=["ingestion"])

MAX_IDEMPOTENCY_KEY = 255


@router.post("/ingest", status_code=status.HTTP_202_ACCEPTED,
             responses=error_responses(400, 401, 409, 413, 422, 503))
async def ingest(request: Request, services: ServicesDep, settings: SettingsDep) -> JSONResponse:
    if not settings.webhook_secret:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "webhook ingestion is disabled: no RAG_WEBHOOK_SECRET is configured")
    body = await request.body()
    try:
        timestamp, secret_index = verify_with_secret(request.headers.get("x-signature"), body,
                                                     settings.webhook_secret, tolerance_s=settings.webhook_tolerance_s)
    except SignatureError as exc:
        _rejected(request, None, status.HTTP_401_UNAUTHORIZED, f"invalid signature: {exc}")
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, f"invalid signature: {exc}") from None
    actor = webhook_actor(request, secret_index)
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
        raise HTTPException(status.HTTP_400_BAD_REQUEST,
                            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    try:
        parsed = await run_in_threadpool(parse_ingest_body, body, max_documents=settings.ingest_max_documents,
                                         max_document_bytes=settings.ingest_max_document_bytes)
    except PayloadError as exc:
        _rejected(request, actor, exc.status, exc.detail)
        return JSONResponse(status_code=exc.status, content={"detail": exc.detail, "errors": exc.errors})

    body_hash = hashlib.sha256(body).hexdigest()
    claims = [("sig:" + hashlib.sha256(f"{timestamp}.".encode() + body).hexdigest(), body_hash,
               2 * settings.webhook_tolerance_s)]
    if key is not None:
        claims.insert(0, ("key:" + key, body_hash, settings.idempotency_ttl_s))

    def respond(job_id: str) -> dict:
        return {"job_id": job_id, "kind": "ingest", "status": "queued", "status_url": f"/jobs/{job_id}",
                "documents": len(parsed.documents), "deletes": len(parsed.deletes)}

    outcome, response = await run_in_threadpool(
        services.ledger.accept_job, "ingest",
        {**ingest_payload(parsed.documents, parsed.deletes), "requested_by": requested_by(request, actor)},
        claims=claims, respond=respond)
    if outcome == "conflict":
        _rejected(request, actor, status.HTTP_409_CONFLICT, "Idempotency-Key already used with a different body")
        raise HTTPException(status.HTTP_409_CONFLICT, "Idempotency-Key was already used with a different body "
                            f"within the last {settings.idempotency_ttl_s} s")
    if outcome == "accepted":
        services.wake_workers()
    audit_of(request).record("ingest_accepted", actor=actor, request_id=request_id(request),
                             job_id=response["job_id"], outcome=outcome, idempotency_key=key,
                             document_ids=[d.document_id for d in parsed.documents], delete_ids=parsed.deletes)
    headers = {"Location": response["status_url"]}
    if outcome == "replayed":
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(status_code=status.HTTP_202_ACCEPTED, content=response, headers=headers)


def _rejected(request: Request, actor: dict | None, code: int, detail: object) -> None:
    audit_of(request).record("ingest_rejected", actor=actor or webhook_actor(request, None),
                             request_id=request_id(request), status=code, error=detail)


@router.get("/jobs/{job_id}", response_model=JobStatus, dependencies=[IngestStatusKey],
            responses=error_responses(401, 403, 404, 422))
def job_status(job_id: str, services: ServicesDep) -> JobStatus:
    job = services.ledger.get_job(job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}")
    return JobStatus(job_id=job.job_id, kind=job.kind, status=job.status, progress=job.progress,
                     counts=job.counts, error=job.error, created_at=job.created_at, started_at=job.started_at,
                     finished_at=job.finished_at)
