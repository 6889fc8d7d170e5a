"""GET /health: liveness plus what the service is serving."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import ServicesDep
from app.schemas import Health

router = APIRouter(tags=["ops"])


@router.get("/health", response_model=Health)
def health(services: ServicesDep) -> Health:
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
        embedding_model=services.settings.embedding_model,
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
