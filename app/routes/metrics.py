"""Admin: GET /metrics, the app's Prometheus metrics (app/metrics.py) in the text exposition format."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import AdminKey
from app.openapi import error_responses

router = APIRouter(tags=["ops"], dependencies=[AdminKey])


@router.get("/metrics", response_class=Response, responses={
    **error_responses(401, 403), 200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."}})
def metrics(request: Request) -> Response:  # sync: the scrape reads the ledger, off the event loop
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
