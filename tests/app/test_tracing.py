"""OpenTelemetry spans over the real answer path (demo services), collected by the SDK's InMemorySpanExporter:
FastAPI's request span, then rag.answer with retrieve, pack, generate, verify (rerank with a scorer), one
trace continuing an incoming traceparent; the exporter chosen by RAG_TRACING."""

import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from app.main import create_app
from app.tracing import span_exporter, start_tracing
from generation.rag import grounded_generation, retrieve_context
from tests.app.conftest import make_settings

REPO = Path(__file__).resolve().parents[2]
TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
QUESTION = "How many vacation days do full-time employees get?"


@pytest.fixture(scope="module")
def spans(demo_services):
    """Spans of this process go to an in-memory exporter (the provider is process-wide: installed once)."""
    exporter = InMemorySpanExporter()
    processor = start_tracing(demo_services.settings, processor=SimpleSpanProcessor(exporter))
    yield exporter
    processor.shutdown()


def by_name(finished) -> dict:
    named: dict = {}
    for span in finished:
        named.setdefault(span.name, []).append(span)
    return named


def test_a_query_is_one_trace_from_the_callers_span_to_generation(spans, demo_services):
    spans.clear()
    with TestClient(create_app(demo_services.settings, services=demo_services)) as client:
        response = client.post("/query", json={"question": QUESTION},
                               headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "x-request-id": "trace-1"})
    assert response.status_code == 200, response.text
    body = response.json()
    finished = spans.get_finished_spans()
    named = by_name(finished)
    for name in ("POST /query", "rag.answer", "retrieve", "pack", "generate", "verify"):
        assert len(named.get(name, [])) == 1, (name, sorted(named))
    assert "rerank" not in named  # no reranker configured
    assert {format(s.context.trace_id, "032x") for s in finished} == {TRACE_ID}

    server = named["POST /query"][0]
    assert format(server.parent.span_id, "016x") == PARENT_ID and server.parent.is_remote
    assert server.attributes["http.route"] == "/query" and server.attributes["http.response.status_code"] == 200
    assert server.attributes["rag.request_id"] == "trace-1"
    ids = {s.context.span_id: s for s in finished}

    def ancestors(span):
        while span.parent is not None and span.parent.span_id in ids:
            span = ids[span.parent.span_id]
            yield span

    answer = named["rag.answer"][0]
    assert server in list(ancestors(answer))
    for stage in ("retrieve", "pack", "generate", "verify"):
        assert named[stage][0].parent.span_id == answer.context.span_id, stage
    retrieve, pack, generate = named["retrieve"][0], named["pack"][0], named["generate"][0]
    assert retrieve.end_time <= pack.start_time and pack.end_time <= generate.start_time
    assert retrieve.attributes["rag.chunks_found"] == len(body["citations"])
    assert pack.attributes["rag.chunks_packed"] == len(body["citations"])
    assert generate.attributes["rag.prompt_tokens"] == pack.attributes["rag.prompt_tokens"] > 0
    assert 1 <= generate.attributes["rag.completion_tokens"] <= demo_services.settings.max_new_tokens
    assert generate.attributes["rag.finish_reason"] == body["finish_reason"]
    assert answer.attributes["rag.abstained"] == body["abstained"]
    assert answer.attributes["rag.grounded"] == body["grounded"]
    assert answer.attributes["rag.adapter"] == (body["provenance"]["adapter"] or "none")
    assert all(QUESTION not in str(v) for s in finished for v in s.attributes.values())  # no question text


def test_no_generate_span_when_nothing_is_relevant(spans, demo_services):
    spans.clear()
    with TestClient(create_app(demo_services.settings, services=demo_services)) as client:
        body = client.post("/query", json={"question": "What is the capital of France?"}).json()
    assert body["abstain_reason"] == "no_relevant_context"
    named = by_name(spans.get_finished_spans())
    assert "retrieve" in named and "pack" in named and "generate" not in named and "verify" not in named
    answer = named["rag.answer"][0]
    assert answer.attributes["rag.generated"] is False
    assert answer.attributes["rag.abstain_reason"] == "no_relevant_context"


class ConstantScorer:
    """The reranker's scoring interface (retrieval.cross_encoder.CrossEncoderReranker.score), for chunks given
    without a rerank_score; the span only needs the call."""

    def score(self, question: str, texts: list[str]) -> list[float]:
        return [0.9] * len(texts)


def test_rerank_span_when_a_cross_encoder_scores_the_chunks(spans, demo_services):
    live = demo_services.live
    chunks = retrieve_context(live.retriever, demo_services.ledger, live.generation.generation, QUESTION, 3)
    spans.clear()
    grounded_generation(demo_services.generator, QUESTION, chunks, max_new_tokens=8, scorer=ConstantScorer(),
                        term_weights=live.retriever.bm25.idf)
    named = by_name(spans.get_finished_spans())
    rerank, pack = named["rerank"][0], named["pack"][0]
    assert pack.end_time <= rerank.start_time
    assert "generate" in named and named["generate"][0].start_time >= rerank.end_time


def test_the_exporter_follows_the_setting(tmp_path):
    assert span_exporter(make_settings(tmp_path)) is None  # off by default
    assert start_tracing(make_settings(tmp_path)) is None
    assert isinstance(span_exporter(make_settings(tmp_path, tracing="console")), ConsoleSpanExporter)
    otlp = span_exporter(make_settings(tmp_path, tracing="otlp", otlp_endpoint="http://127.0.0.1:4317"))
    assert isinstance(otlp, OTLPSpanExporter)
    otlp.shutdown()


def test_console_tracing_prints_the_stage_spans_at_shutdown(tmp_path):
    """In a fresh process (the provider is process-wide): RAG_TRACING=console, a span of the stages' tracer,
    flushed by the processor's shutdown as the lifespan does."""
    script = ("from app.settings import Settings\n"
              "from app.tracing import start_tracing\n"
              "import generation.rag as rag\n"
              "processor = start_tracing(Settings(_env_file=None))\n"
              "with rag.tracer.start_as_current_span('retrieve'):\n"
              "    pass\n"
              "processor.shutdown()\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={"RAG_TRACING": "console", "RAG_TRACING_SERVICE_NAME": "rag-test",
                                 "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"name": "retrieve"' in result.stdout and '"service.name": "rag-test"' in result.stdout
