"""The vLLM backend's own logic against a small fake of vLLM's completions API (no vLLM needed): the abstention
margin emulated from first-token log-probabilities, deadlines, and 502/503/504 naming RAG_VLLM_URL when vLLM is
broken, down or slow. The real vLLM: tests/app/test_vllm_backend.py."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from generation.bundled import resolve_generator_model
from generation.generate import abstain_token_id
from generation.prompt import ContextChunk, pack_prompt
from generation.vllm_backend import (VllmBadResponse, VllmTimeout, VllmUnavailable, abstain_preference,
                                     connect_vllm, Token)
from tests.app.conftest import MODEL_CACHE
from tests.app.vllm_server import services_on
from tests.net import free_port

VACATION = "How many vacation days do full-time employees get?"


class FakeVllm(ThreadingHTTPServer):
    """/v1/models, /v1/load_lora_adapter and a streamed /v1/completions whose tokens ``script(body)`` gives
    as (token id, logprob, {token id: logprob}); ``mode`` breaks it on purpose."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode = "ok"
        self.script = lambda body: []
        self.completions: list[dict] = []
        self.loras: list[str] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeVllm

    def log_message(self, *args) -> None:
        pass

    def _json(self, status: int, data) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        models = [{"id": "fake", "parent": None, "max_model_len": 2048}]
        models += [{"id": name, "parent": "fake"} for name in self.server.loras]
        self._json(200, {"object": "list", "data": models})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if self.path == "/v1/load_lora_adapter":
            self.server.loras.append(body["lora_name"])
            return self._json(200, {})
        self.server.completions.append(body)
        mode = self.server.mode
        if mode == "error":
            return self._json(500, {"error": {"message": "engine dead"}})
        if mode == "slow":
            time.sleep(2)
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        if mode == "garbage":
            self.wfile.write(b"data: {not json\n\n")
            return
        tokens = self.server.script(body)
        for i, (token, logprob, top) in enumerate(tokens):
            if mode == "stall" and i == 1:
                time.sleep(2)
            choice = {"index": 0, "text": "", "finish_reason": "stop" if i == len(tokens) - 1 else None,
                      "logprobs": {"tokens": [f"token_id:{token}"], "token_logprobs": [logprob],
                                   "top_logprobs": [{f"token_id:{t}": v for t, v in top.items()}]}}
            self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            self.wfile.flush()
        usage = {"choices": [], "usage": {"completion_tokens": len(tokens)}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())


@pytest.fixture
def fake():
    server = FakeVllm()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def model_dir():
    return resolve_generator_model("bundled:SmolLM2-135M-Instruct", MODEL_CACHE)


def generator_for(url: str, model_dir: str, **kwargs):
    return connect_vllm(model_dir, url=url, context_window=2048, **{"read_timeout_s": 0.5, "retries": 1, **kwargs})


def packed_prompt(tokenizer):
    chunk = ContextChunk(text="Employees get 28 vacation days per year.", chunk_id="c", document_id="d",
                         section="s", source="x", score=1.0)
    return pack_prompt(tokenizer, VACATION, [chunk], context_window=2048, max_new_tokens=16)


def test_abstention_margin_gives_the_best_other_token_as_in_process(fake, model_dir):
    generator = generator_for(fake.url, model_dir)
    tokenizer, eos = generator.tokenizer, generator.stops[0]
    abstain = abstain_token_id(tokenizer)
    two, eight = tokenizer.encode("28", add_special_tokens=False)  # digits are single tokens
    packed = packed_prompt(tokenizer)

    def script(body):
        if body["prompt"] == packed.input_ids:  # the first answer token: the abstention, by 1.0 logit
            return [(abstain, -0.5, {abstain: -0.5, two: -1.5, 7: -3.0}), (eos, -0.1, {eos: -0.1})]
        assert body["prompt"] == [*packed.input_ids, two] and body["max_tokens"] == 15
        return [(eight, -0.2, {eight: -0.2}), (eos, -0.1, {eos: -0.1})]

    fake.script = script
    kept = generator.generate(packed, max_new_tokens=16, abstain_margin=0.5)  # 1.0 > 0.5: abstains
    assert kept.abstain_preference == pytest.approx(1.0) and len(fake.completions) == 1
    assert kept.text == tokenizer.decode([abstain], skip_special_tokens=True).strip()
    deltas = []
    moved = generator.generate(packed, max_new_tokens=16, abstain_margin=2.5, on_text=deltas.append)
    assert len(fake.completions) == 3  # the first request, then its continuation after the best other token
    assert moved.text == tokenizer.decode([two, eight]).strip() == "".join(deltas)
    assert moved.token_logprobs == [-1.5, -0.2] and moved.abstain_preference == pytest.approx(1.0)
    assert moved.n_new_tokens == 3 and moved.finish_reason == "stop"
    body = fake.completions[0]
    assert body["temperature"] == 0 and body["return_tokens_as_token_ids"] and body["stream"]
    assert body["model"] == "fake" and eos in body["stop_token_ids"]


def test_a_negative_margin_starts_the_abstention_as_in_process(fake, model_dir):
    """Calibration may choose a margin below 0 (with margin_slope, where retrieval is weak): the abstention is
    then started when greedy preferred another token by less than the margin's size."""
    from generation.prompt import ABSTAIN_ANSWER

    generator = generator_for(fake.url, model_dir)
    tokenizer, eos = generator.tokenizer, generator.stops[0]
    abstain = abstain_token_id(tokenizer)
    rest = tokenizer.encode(ABSTAIN_ANSWER, add_special_tokens=False)[1:]
    two, _ = tokenizer.encode("28", add_special_tokens=False)
    packed = packed_prompt(tokenizer)

    def script(body):
        if body["prompt"] == packed.input_ids:  # "2" first, the abstention 0.5 logit behind
            return [(two, -0.5, {two: -0.5, abstain: -1.0}), (eos, -0.1, {eos: -0.1})]
        assert body["prompt"] == [*packed.input_ids, abstain]
        return [*((t, -0.1, {t: -0.1}) for t in rest), (eos, -0.1, {eos: -0.1})]

    fake.script = script
    spoke = generator.generate(packed, max_new_tokens=16, abstain_margin=-0.25)  # -0.5 <= -0.25: answers
    assert spoke.abstain_preference == pytest.approx(-0.5) and len(fake.completions) == 1
    forced = generator.generate(packed, max_new_tokens=16, abstain_margin=-1.0)  # -0.5 > -1.0: abstains
    assert forced.text == ABSTAIN_ANSWER and forced.token_logprobs[0] == pytest.approx(-1.0)
    assert len(fake.completions) == 3 and forced.finish_reason == "stop"


def test_preference_when_the_abstention_is_not_among_the_top_tokens():
    preference, best = abstain_preference(Token(5, -0.1, {5: -0.1, 6: -2.0}), abstain_id=9)
    assert best == 5 and preference == pytest.approx(-1.9)  # bounded above by the lowest top token


def test_adapter_is_registered_once_and_named_in_requests(fake, model_dir, tmp_path):
    generator = generator_for(fake.url, model_dir, adapter_name="smollm2-squad@v9", adapter_path=str(tmp_path))
    fake.script = lambda body: [(generator.stops[0], -0.1, {generator.stops[0]: -0.1})]
    packed = packed_prompt(generator.tokenizer)
    generator.generate(packed, max_new_tokens=4)
    generator.generate(packed, max_new_tokens=4)
    assert fake.loras == ["smollm2-squad@v9"]
    assert [body["model"] for body in fake.completions] == ["smollm2-squad@v9"] * 2


def test_a_stalled_stream_ends_at_the_deadline_with_the_text_so_far(fake, model_dir):
    generator = generator_for(fake.url, model_dir, read_timeout_s=10)
    word = generator.tokenizer.encode("Hello", add_special_tokens=False)[0]
    fake.mode, fake.script = "stall", lambda body: [(word, -0.1, {word: -0.1})] * 3
    started = time.monotonic()
    result = generator.generate(packed_prompt(generator.tokenizer), max_new_tokens=8, timeout_s=0.6)
    assert result.finish_reason == "timeout" and result.text == "Hello"
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize(("mode", "error", "mentions"), [
    ("error", VllmBadResponse, "engine dead"),
    ("garbage", VllmBadResponse, "unreadable"),
    ("slow", VllmTimeout, "did not answer"),
])
def test_broken_or_slow_vllm_raises_a_clear_error(fake, model_dir, mode, error, mentions):
    generator = generator_for(fake.url, model_dir)
    fake.mode = mode
    with pytest.raises(error) as raised:
        generator.generate(packed_prompt(generator.tokenizer), max_new_tokens=8)
    assert mentions in str(raised.value) and "RAG_VLLM_URL" in str(raised.value)


def test_vllm_down_raises_unavailable_after_retries(model_dir):
    generator = generator_for(f"http://127.0.0.1:{free_port()}", model_dir)
    with pytest.raises(VllmUnavailable, match="RAG_VLLM_URL.*after 2 attempts"):
        generator.generate(packed_prompt(generator.tokenizer), max_new_tokens=8)
    assert generator.state()["reachable"] is False


@pytest.mark.parametrize(("mode", "status"), [("down", 503), ("slow", 504), ("garbage", 502)])
def test_query_maps_vllm_failures_to_502_503_504(demo_services, fake, mode, status):
    url = f"http://127.0.0.1:{free_port()}" if mode == "down" else fake.url
    fake.mode = mode
    services = services_on(demo_services, generator_backend="vllm", vllm_url=url, vllm_retries=1,
                           vllm_read_timeout_s=0.5)
    with TestClient(create_app(services.settings, services=services)) as client:
        response = client.post("/query", json={"question": VACATION})
        assert response.status_code == status, response.text
        assert "RAG_VLLM_URL" in response.json()["detail"]
        streamed = client.post("/query", json={"question": VACATION, "stream": True}).text
        last = streamed.strip().split("\n\n")[-1]
        assert last.startswith("event: error") and f'"status": {status}' in last and "RAG_VLLM_URL" in last
        health = client.get("/health").json()
        assert health["generator_backend"] == "vllm"
        assert health["generator_backend_state"]["reachable"] is (mode != "down")
        assert health["status"] == ("degraded" if mode == "down" else "ok")
