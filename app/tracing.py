"""OpenTelemetry tracing: the SDK set up from settings (RAG_TRACING, off by default).

Once a tracer provider is installed, FastAPI's own telemetry makes a SERVER span per HTTP request
(named by the route template, a child of an incoming W3C ``traceparent``) with spans for dependencies
and the endpoint; the stages add theirs with the OpenTelemetry API alone (generation/rag.py: retrieve,
rerank, pack, generate, verify; app/worker.py: one per job run). All of them are no-ops while tracing
is off. The provider is process-wide (OpenTelemetry's global): the first app in a process that turns
tracing on installs it, later ones add their exporter to it.
"""

from __future__ import annotations

import logging

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from app.settings import Settings

log = logging.getLogger(__name__)


def span_exporter(settings: Settings) -> SpanExporter | None:
    """The exporter RAG_TRACING names (None: off)."""
    if settings.tracing == "console":
        return ConsoleSpanExporter()
    if settings.tracing == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=settings.otlp_endpoint)
    return None


def start_tracing(settings: Settings, processor: SpanProcessor | None = None) -> SpanProcessor | None:
    """Send spans to the configured exporter (or to `processor`); returns the processor to shut down at
    exit (which flushes it), None when tracing is off."""
    if processor is None:
        exporter = span_exporter(settings)
        if exporter is None:
            return None
        processor = BatchSpanProcessor(exporter)
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider(resource=Resource.create({"service.name": settings.tracing_service_name}),
                                  sampler=ParentBased(TraceIdRatioBased(settings.tracing_sample_ratio)))
        trace.set_tracer_provider(provider)
    provider.add_span_processor(processor)
    log.info("tracing on: %s", settings.tracing if settings.tracing != "otlp" else f"otlp {settings.otlp_endpoint}")
    return processor
