"""GET /health: liveness plus what the service is serving."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import ServicesDep
from app.schemas import Health

router = APIRouter(tags=["ops"])


@router.get("/health", response_model=Health)
def health(services: ServicesDep) -> Health:
    generation = services.generation
    return Health(
        status="ok",
        documents=services.ledger.count_documents(),
        chunks=services.ledger.count_chunks(generation.generation),
        index_generation=generation.generation,
        index_collection=generation.collection,
        embedding_model=services.settings.embedding_model,
        generator_model=services.settings.generator_model,
        adapter=services.settings.adapter,
        refresh_running=services.refresh_running(),
    )
