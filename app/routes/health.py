"""GET /health: liveness, plus what the service is serving for callers allowed to see it.

With keys configured, a request without a key gets only ``{"status": "ok"}`` (the process answers); the
full body (document counts, models, generations, queue) needs a key with the ingest-status or admin
scope, unless RAG_PUBLIC_ROUTES holds ``health``. Without keys (loopback only) everyone gets the full body.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from app.deps import OptionalCaller, ServicesDep, is_public
from app.openapi import error_responses
from app.schemas import Health

router = APIRouter(tags=["ops"])
FULL_HEALTH_SCOPES = ("ingest-status", "admin")


class Liveness(BaseModel):
    status: str = "ok"


@router.get("/health", response_model=Health | Liveness, responses=error_responses(401))
def health(request: Request, caller: OptionalCaller, services: ServicesDep) -> Health | Liveness:
    if not is_public(request, "health") and not (caller and any(map(caller.has, FULL_HEALTH_SCOPES))):
        return Liveness()
    generation = services.live.generation
    previous = services.ledger.generations_in("previous")
    refresh_job = services.refresh_job()
    generator = services.generator
    backend = getattr(generator, "backend", services.settings.generator_backend)
    backend_state = generator.state() if backend == "vllm" and generator is not None else None  # short timeout
    return Health(
        status="degraded" if backend_state and not backend_state["reachable"] else "ok",
        documents=services.ledger.count_documents(),
        chunks=services.ledger.count_chunks(generation.generation),
        index_generation=generation.generation,
        index_collection=generation.collection,
        embedding_model=generation.embedding_model,  # the model questions are embedded with (the live generation's)
        generator_model=services.settings.generator_model,
        adapter=getattr(services.generator, "adapter_name", None) if services.generator else services.settings.adapter,
        refresh_running=refresh_job is not None,
        refresh_job_id=refresh_job,
        previous_generation=previous[-1].generation if previous else None,
        generator_loaded=services.generator is not None,
        generator_backend=backend,
        generator_backend_state=backend_state,
        generations_running=services.gate.running,
        generations_waiting=services.gate.waiting,
        queries_rejected=services.gate.rejected,
    )
