"""Prometheus metrics: one registry per app, served at GET /metrics (app/routes/metrics.py).

What is counted where:
- HTTP requests (route template, method, status) and their latency, by ``ObserveRequests`` (ASGI
  middleware), which also writes the access log line;
- answers (latency per stage, tokens in and out, abstentions, grounded or not) by the query route, from
  the ``Answer`` the stage returned; generation-gate rejections where the route refuses a request;
- jobs by kind and status, and ingest documents and chunks written and removed, from the job's own
  counts as the ledger recorded them when it ended (``Metrics.observe_job``, called by the job workers),
  so a resumed job is counted once, by the process that finishes it; refresh duration and outcome there too;
- what is read at scrape time (``ServiceCollector``): the live generation and its chunk and document
  counts, the generation gate's running and waiting requests, unfinished jobs, and what is served
  (models, adapter) as an info metric.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import Match

from app.worker import ALL_KINDS, INGEST_KINDS

log = logging.getLogger(__name__)
access_log = logging.getLogger("app.access")

UNMATCHED = "<unmatched>"  # the route label of a path no route matches (no label per unknown path)
QUIET_ROUTES = ("/health", "/metrics")  # polled: their access lines are DEBUG
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
REFRESH_BUCKETS = (10, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400)
INGEST_DOCUMENT_COUNTS = ("added", "updated", "unchanged", "deleted")


def _leaf_routes(routes: Any) -> Iterator[Any]:
    for route in routes:
        included = getattr(route, "original_router", None)  # FastAPI's include_router entry
        yield from _leaf_routes(included.routes) if included is not None else (route,)


def route_template(scope: dict[str, Any]) -> str:
    """The matched route's path template ("/jobs/{job_id}"), also for a request answered before routing
    (the body limit's 413); UNMATCHED for a path no route has. (Routers are included without prefixes.)"""
    route = scope.get("route")
    if route is None and scope.get("app") is not None:
        route = next((r for r in _leaf_routes(scope["app"].router.routes) if r.matches(scope)[0] != Match.NONE),
                     None)
    return getattr(route, "path", None) or UNMATCHED


class Metrics:
    """The app's metrics and the registry /metrics serves. `services()` gives the live Services (or None)."""

    def __init__(self, services: Callable[[], Any]) -> None:
        disable_created_metrics()  # no *_created series beside every counter (process-wide switch)
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("rag_http_requests", "HTTP requests by route template, method and status.",
                                ["route", "method", "status"], registry=registry)
        self.request_seconds = Histogram("rag_http_request_duration_seconds", "HTTP request latency (a streamed "
                                         "answer: until its last event).", ["route", "method"],
                                         buckets=HTTP_BUCKETS, registry=registry)
        self.query_seconds = Histogram("rag_query_duration_seconds", "Answer latency by stage: retrieval, "
                                       "generation (packing, gate, generator, verification), total.", ["stage"],
                                       buckets=STAGE_BUCKETS, registry=registry)
        self.answers = Counter("rag_answers", "Answers returned, by adapter, abstained or not, grounded or not.",
                               ["adapter", "abstained", "grounded"], registry=registry)
        self.abstentions = Counter("rag_abstentions", "Abstentions by reason.", ["reason"], registry=registry)
        self.prompt_tokens = Counter("rag_prompt_tokens", "Prompt tokens given to the generator.", registry=registry)
        self.completion_tokens = Counter("rag_completion_tokens", "Tokens the generator wrote.", registry=registry)
        self.rejections = Counter("rag_generation_rejections", "Queries refused 503 by the generation gate: "
                                  "queue_full (every slot and queue place taken) or wait_timeout "
                                  "(RAG_QUEUE_WAIT_S passed).", ["reason"], registry=registry)
        self.jobs = Counter("rag_jobs", "Jobs ended, by kind and status (succeeded, failed, interrupted).",
                            ["kind", "status"], registry=registry)
        self.ingest_documents = Counter("rag_ingest_documents", "Documents of ended ingest jobs: added, updated, "
                                        "unchanged, deleted.", ["action"], registry=registry)
        self.ingest_chunks = Counter("rag_ingest_chunks", "Chunks ended ingest jobs wrote or removed.", ["action"],
                                     registry=registry)
        self.refresh_seconds = Histogram("rag_refresh_duration_seconds", "Refresh and rollback runs by outcome "
                                         "(succeeded, failed).", ["kind", "outcome"], buckets=REFRESH_BUCKETS,
                                         registry=registry)
        self.refresh_chunks = Counter("rag_refresh_chunks_written", "Chunks refreshes wrote into new generations.",
                                      registry=registry)
        self.refresh_last_success = Gauge("rag_refresh_last_success_timestamp_seconds", "When a refresh or "
                                          "rollback last succeeded (Unix time).", ["kind"], registry=registry)
        registry.register(ServiceCollector(services))
        for reason in ("queue_full", "wait_timeout"):  # series exist from the start: rate() and dashboards see 0
            self.rejections.labels(reason)
        for kind in ALL_KINDS:
            for status in ("succeeded", "failed", "interrupted"):
                self.jobs.labels(kind, status)
        for action in INGEST_DOCUMENT_COUNTS:
            self.ingest_documents.labels(action)
        for action in ("written", "removed"):
            self.ingest_chunks.labels(action)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route, method).observe(seconds)

    def observe_answer(self, answer: Any) -> None:
        """A generation.rag.Answer returned to a client."""
        for stage in ("retrieval", "generation", "total"):
            self.query_seconds.labels(stage).observe(answer.timings_ms[stage] / 1000)
        adapter = answer.provenance.get("adapter") or "none"
        self.answers.labels(adapter, str(answer.abstained).lower(), str(answer.grounded).lower()).inc()
        if answer.abstained:
            self.abstentions.labels(answer.abstain_reason or "unknown").inc()
        self.prompt_tokens.inc(answer.prompt_tokens)
        self.completion_tokens.inc(answer.completion_tokens)

    def observe_rejection(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    def observe_job(self, job: Any, status: str, seconds: float) -> None:
        """A job run ended (an ingestion.ledger.JobRow as the ledger holds it now; status 'running': interrupted,
        it resumes at the next start and is counted then)."""
        if status == "running":
            self.jobs.labels(job.kind, "interrupted").inc()
            return
        self.jobs.labels(job.kind, status).inc()
        if job.kind in INGEST_KINDS:
            for action in INGEST_DOCUMENT_COUNTS:
                self.ingest_documents.labels(action).inc(job.counts.get(action, 0))
            self.ingest_chunks.labels("written").inc(job.counts.get("chunks_written", 0))
            self.ingest_chunks.labels("removed").inc(job.counts.get("chunks_removed", 0))
            return
        self.refresh_seconds.labels(job.kind, status).observe(seconds)
        self.refresh_chunks.inc(job.progress.get("chunks_written", 0))
        if status == "succeeded":
            self.refresh_last_success.labels(job.kind).set(time.time())


class ServiceCollector(Collector):
    """Gauges read from the services at scrape time (nothing to keep in step)."""

    def __init__(self, services: Callable[[], Any]) -> None:
        self.services = services

    def collect(self) -> Iterator[Metric]:
        services = self.services()
        if services is None or services.live is None:
            return
        live = services.live
        yield GaugeMetricFamily("rag_index_generation", "The live index generation.", value=live.generation.generation)
        gate = services.gate
        yield GaugeMetricFamily("rag_generations_running", "Queries generating now.", value=gate.running)
        yield GaugeMetricFamily("rag_generation_queue_depth", "Queries waiting for a generation slot.",
                                value=gate.waiting)
        yield GaugeMetricFamily("rag_generation_slots", "RAG_MAX_CONCURRENT_GENERATIONS.", value=gate.concurrent)
        yield GaugeMetricFamily("rag_generation_queue_size", "RAG_GENERATION_QUEUE_SIZE.", value=gate.queue)
        audit = getattr(services, "audit", None)
        if audit is not None:
            yield CounterMetricFamily("rag_audit_write_failures", "Audit lines that could not be written "
                                      "(the request went on; the server log names the path).", value=audit.failures)
        generator = services.generator
        yield InfoMetricFamily("rag_serving", "What answers come from: models, backend, default adapter.", value={
            "embedding_model": services.settings.embedding_model,
            "generator_model": services.settings.generator_model,
            "generator_backend": getattr(generator, "backend", services.settings.generator_backend),
            "adapter": (getattr(generator, "adapter_name", None) or "none") if generator else "not loaded",
            "reranker": getattr(services.reranker, "name", None) or "none"})
        try:  # the ledger: a failing read leaves these out of the scrape, not the whole scrape
            chunks = services.ledger.count_chunks(live.generation.generation)
            documents = services.ledger.count_documents()
            unfinished = services.ledger.unfinished_jobs(ALL_KINDS)
        except Exception as exc:  # noqa: BLE001 - reported, then the scrape goes on
            log.warning("metrics: ledger not readable: %s", exc)
            return
        yield GaugeMetricFamily("rag_index_chunks", "Chunks in the live generation.", value=chunks)
        yield GaugeMetricFamily("rag_index_documents", "Live documents.", value=documents)
        jobs = GaugeMetricFamily("rag_jobs_unfinished", "Jobs queued or running, by kind.", labels=["kind"])
        for kind in ALL_KINDS:
            jobs.add_metric([kind], sum(job.kind == kind for job in unfinished))
        yield jobs


class ObserveRequests:
    """ASGI middleware: counts and times every HTTP request by route template, and logs it (app.access)."""

    def __init__(self, app, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception before the response started ends as the 500 app/request_id.py sends

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - started
            route, method = route_template(scope), scope["method"]
            self.metrics.observe_request(route, method, status, seconds)
            client = scope.get("client")
            access_log.log(logging.DEBUG if route in QUIET_ROUTES else logging.INFO, "%s %s %d %.1f ms", method,
                           scope["path"], status, seconds * 1000,
                           extra={"method": method, "path": scope["path"], "route": route, "status": status,
                                  "duration_ms": round(seconds * 1000, 1), "client": client[0] if client else None})
