"""The FastAPI application factory. Heavy objects are built in the lifespan, never at import.

The lifespan holds the data directory's writer lock, reconciles the live generation, reclaims what
retired generations left, starts the job workers (which resume interrupted jobs) and the refresh
schedule; on shutdown the workers stop after their current step, leaving their jobs resumable.

Outermost first: FastAPI's request span (when tracing is on, app/tracing.py), the request id
(app/request_id.py), metrics and the access log (app/metrics.py), the body limit. Each app has its own
metrics registry.
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from app.access import KeyRing
from app.audit import AuditLog, process_actor
from app.body_limit import BodySizeLimit
from app.container import Services, build_services
from app.errors import install_error_handlers
from app.metrics import Metrics, ObserveRequests
from app.rate_limits import RateLimits
from app.request_id import RequestId
from app.routes import docs, health, ingest, metrics, query, refresh
from app.settings import Settings, get_settings
from app.tracing import start_tracing
from app.worker import start_scheduler, start_workers
from ingestion.ledger import writer_lock

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    """Build the app. Pass `services` to reuse already-built components (tests); else the lifespan builds them."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with AsyncExitStack() as stack:
            spans = start_tracing(settings)
            if spans is not None:
                stack.callback(spans.shutdown)  # flushes the spans still buffered
            if services is None:
                stack.enter_context(writer_lock(settings.data_dir))  # this process writes the data dir
                app.state.services = await run_in_threadpool(build_services, settings, reconcile=True)
                stack.callback(app.state.services.ledger.close)
            else:
                app.state.services = services
            current = app.state.services
            audit, current.audit = current.audit, app.state.audit  # jobs run by this app record to its trail
            stack.callback(app.state.audit.close)  # last: the workers, stopped before it, may still record
            stack.callback(setattr, current, "audit", audit)
            await run_in_threadpool(current.collect_garbage)
            for worker in start_workers(current, on_end=app.state.metrics.observe_job):
                stack.callback(worker.stop)  # before the ledger closes (callbacks run last-in, first-out)
            scheduler = start_scheduler(current)
            if scheduler is not None:
                stack.callback(scheduler.shutdown, wait=False)
            log.info("serving generation %s", current.generation.generation)
            yield

    # FastAPI's own /docs, /redoc and /openapi.json are off: app/routes/docs.py serves them behind a key
    app = FastAPI(title="RAG service", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None,
                  telemetry={"metrics": False})  # spans when tracing is on; metrics are Prometheus (/metrics)
    app.state.settings = settings
    app.state.keyring = KeyRing(settings.api_keys, settings.admin_api_keys, settings.keys_file)
    app.state.rate_limits = RateLimits(settings.rate_limit_requests_per_minute,
                                       settings.rate_limit_tokens_per_minute, settings.rate_limit_storage)
    app.state.metrics = Metrics(lambda: getattr(app.state, "services", None))
    # opened here, so that a path it cannot write stops the start (AuditLogError, naming RAG_AUDIT_LOG)
    app.state.audit = AuditLog.from_settings(settings, actor=process_actor("service"), rotate=True)
    install_error_handlers(app)
    app.include_router(query.router)
    app.include_router(health.router)
    app.include_router(ingest.router)
    app.include_router(refresh.router)
    app.include_router(metrics.router)
    app.include_router(docs.router)

    def body_limit_for(path: str) -> int:
        return settings.ingest_max_body_bytes if path == "/ingest" else settings.max_body_bytes

    app.add_middleware(BodySizeLimit, limit_for=body_limit_for)
    app.add_middleware(ObserveRequests, metrics=app.state.metrics)
    app.add_middleware(RequestId)  # added last: runs first
    return app
