"""Per-key rate limits: requests and generated tokens per minute, 429 with an accurate Retry-After.

The first tests drive app/rate_limits.py on the `limits` library's real memory storage (with a short window
where waiting for it matters); the rest go through the service over HTTP with the demo services (real
MiniLM, Chroma, BM25 and SmolLM2), and the last over a real uvicorn server with two keys at once.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from httpx_sse import connect_sse

from app.access import Caller, KeyEntry, KeyRing, key_digest, write_keys_file
from app.main import create_app
from app.rate_limits import RateLimited, RateLimits, RateLimitStorageError
from tests.app.conftest import make_settings
from tests.app.test_serving import Server

GATED = "Who won the 2018 FIFA World Cup?"  # nothing relevant in the demo corpus: answered without generating
VACATION = "How many vacation days do employees get?"


def caller_for(name: str, **limits: int) -> Caller:
    return Caller(name=name, scopes=frozenset({"query"}), groups=frozenset(), key_id=key_digest(name)[:12], **limits)


def test_requests_over_the_limit_are_refused_with_an_accurate_retry_after() -> None:
    limits = RateLimits(requests_per_minute=3, tokens_per_minute=0, window_s=4)
    small, other = caller_for("small"), caller_for("other")
    first = time.time()
    for _ in range(3):
        limits.admit(small)
    with pytest.raises(RateLimited) as refused:
        limits.admit(small)
    assert refused.value.limit == "requests" and "'small'" in refused.value.detail
    assert "3 requests per minute" in refused.value.detail
    assert abs(refused.value.retry_after_s - math.ceil(first + 4 - time.time())) <= 1  # the oldest ages out then
    limits.admit(other)  # another key's budget is its own
    time.sleep(refused.value.retry_after_s)
    limits.admit(small)  # waiting Retry-After was enough


def test_tokens_are_charged_afterwards_and_a_spent_budget_refuses_until_the_window_ends() -> None:
    limits = RateLimits(requests_per_minute=0, tokens_per_minute=100, window_s=3)
    key = caller_for("tokens")
    limits.admit(key)
    started = time.time()
    limits.charge(key, 60)
    limits.admit(key)  # 40 left: admitted, whatever it will generate
    limits.charge(key, 60)  # 120: the overshoot is charged too
    with pytest.raises(RateLimited) as refused:
        limits.admit(key)
    assert refused.value.limit == "tokens" and "100 generated tokens per minute" in refused.value.detail
    assert abs(refused.value.retry_after_s - math.ceil(started + 3 - time.time())) <= 1
    time.sleep(refused.value.retry_after_s)
    limits.admit(key)


def test_per_key_overrides_defaults_and_the_local_operator() -> None:
    limits = RateLimits(requests_per_minute=1, tokens_per_minute=1)
    unlimited = caller_for("batch", requests_per_minute=0, tokens_per_minute=0)
    for _ in range(50):
        limits.admit(unlimited)
        limits.charge(unlimited, 1000)
    roomy = caller_for("roomy", requests_per_minute=5)
    for _ in range(5):
        limits.admit(roomy)
    with pytest.raises(RateLimited):
        limits.admit(roomy)
    operator = Caller(name="local", scopes=frozenset({"query"}), groups=None)  # no keys configured
    for _ in range(50):
        limits.admit(operator)
        limits.charge(operator, 1000)
    assert limits.limits_for(operator) == (0, 0)


def test_limits_hold_across_threads() -> None:
    limits = RateLimits(requests_per_minute=100, tokens_per_minute=0)
    key, admitted, barrier = caller_for("busy"), Counter(), threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        for _ in range(50):
            try:
                limits.admit(key)
                admitted["yes"] += 1
            except RateLimited:
                admitted["no"] += 1

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert admitted == {"yes": 100, "no": 300}


def test_a_bad_storage_setting_is_one_line_naming_it() -> None:
    with pytest.raises(RateLimitStorageError, match="RAG_RATE_LIMIT_STORAGE 'nosuch://x'"):
        RateLimits(60, 0, "nosuch://x")


# --- over HTTP ---------------------------------------------------------------------------------------

KEYS = {"small": "small-" + "s" * 24, "thrifty": "thrifty-" + "t" * 24, "big": "big-" + "b" * 24}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("limits") / "keys.yaml"
    write_keys_file(path, [
        KeyEntry(name="small", sha256=key_digest(KEYS["small"]), scopes=["query"], requests_per_minute=2),
        KeyEntry(name="thrifty", sha256=key_digest(KEYS["thrifty"]), scopes=["query"], tokens_per_minute=1),
        KeyEntry(name="big", sha256=key_digest(KEYS["big"]), scopes=["query"]),
    ])
    return path


def limited_app(demo_services, tmp_path_factory, **settings):
    return create_app(make_settings(tmp_path_factory.mktemp("unused"), **settings), services=demo_services)


def test_http_429_names_the_limit_and_other_keys_still_pass(demo_services, keys_file, tmp_path_factory) -> None:
    app = limited_app(demo_services, tmp_path_factory, keys_file=keys_file)
    with TestClient(app) as client:
        answers = [client.post("/query", json={"question": GATED}, headers=bearer("small")) for _ in range(3)]
        other = client.post("/query", json={"question": GATED}, headers=bearer("big"))
    assert [r.status_code for r in answers] == [200, 200, 429]
    refused = answers[-1]
    assert "'small'" in refused.json()["detail"] and "2 requests per minute" in refused.json()["detail"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert other.status_code == 200


def test_generated_tokens_are_charged_streamed_or_not(demo_services, keys_file, tmp_path_factory) -> None:
    app = limited_app(demo_services, tmp_path_factory, keys_file=keys_file)
    with TestClient(app) as client:
        first = client.post("/query", json={"question": VACATION}, headers=bearer("thrifty"))
        spent = client.post("/query", json={"question": GATED}, headers=bearer("thrifty"))
    assert first.status_code == 200 and first.json()["finish_reason"] is not None  # the generator ran
    assert spent.status_code == 429 and "1 generated tokens per minute" in spent.json()["detail"]
    assert int(spent.headers["retry-after"]) <= 60

    app = limited_app(demo_services, tmp_path_factory, keys_file=keys_file)  # a fresh budget
    with TestClient(app) as client:
        with connect_sse(client, "POST", "/query", json={"question": VACATION, "stream": True},
                         headers=bearer("thrifty")) as source:
            events = [event.event for event in source.iter_sse()]
        after_stream = client.post("/query", json={"question": GATED}, headers=bearer("thrifty"))
    assert "delta" in events and events[-1] == "answer"
    assert after_stream.status_code == 429 and "tokens" in after_stream.json()["detail"]


def test_the_local_operator_is_not_limited(demo_services, tmp_path_factory) -> None:
    app = limited_app(demo_services, tmp_path_factory, rate_limit_requests_per_minute=1,
                      rate_limit_tokens_per_minute=1)
    with TestClient(app) as client:
        statuses = [client.post("/query", json={"question": q}).status_code for q in (VACATION, GATED, GATED)]
    assert statuses == [200, 200, 200]


def test_two_keys_over_real_http_only_the_one_over_its_limit_gets_429(demo_services, keys_file,
                                                                          tmp_path_factory) -> None:
    """The load test in small: 3 clients on a key limited to 2 requests, 2 clients on a roomy key."""
    app = limited_app(demo_services, tmp_path_factory, keys_file=keys_file)

    async def run(url: str) -> dict[str, list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async def ask(name: str, n: int) -> list[httpx.Response]:
                return [await client.post("/query", json={"question": GATED}, headers=bearer(name)) for _ in range(n)]

            clients = await asyncio.gather(*(ask("small", 3) for _ in range(3)), *(ask("big", 5) for _ in range(2)))
            return {"small": [r for rs in clients[:3] for r in rs], "big": [r for rs in clients[3:] for r in rs]}

    with Server(app) as server:
        responses = asyncio.run(run(server.url))
    small = Counter(r.status_code for r in responses["small"])
    assert small == {200: 2, 429: 7}, small
    assert all(r.headers.get("retry-after", "").isdigit() for r in responses["small"] if r.status_code == 429)
    assert Counter(r.status_code for r in responses["big"]) == {200: 10}


def test_keyring_limits_reach_the_caller(keys_file) -> None:
    callers = {c.name: c for c in KeyRing(keys_file=keys_file).callers()}
    assert callers["small"].requests_per_minute == 2 and callers["small"].tokens_per_minute is None
    assert callers["thrifty"].tokens_per_minute == 1
