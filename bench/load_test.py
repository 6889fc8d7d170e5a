"""Load test: many concurrent clients against a real server for a fixed time; every answer must be
200, or 503 with Retry-After, and /health must stay fast (p95 <= 100 ms) throughout.

Without ``--url`` it starts its own server (``rag setup`` into a temporary data dir, then ``rag serve``
on a free loopback port) with the default profile; with ``--url`` it loads an already running one.
Clients ask the demo questions (demo/questions.jsonl) in turn; a client that gets a 503 waits its
Retry-After (capped at 1 s, so the queue stays full) and asks again. A poller asks /health every 100 ms.

    python bench/load_test.py --clients 16 --duration 120
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from common import REPO, percentiles, update_section
from tests.net import free_port

QUESTIONS = REPO / "demo" / "questions.jsonl"


def start_server(data_dir: Path, **env_extra: str) -> tuple[subprocess.Popen, str]:
    """`rag setup` into `data_dir`, then `rag serve` on a free port (with `env_extra` set); (process, url)."""
    rag = str(Path(sys.executable).with_name("rag"))
    env = {**os.environ, "RAG_DATA_DIR": str(data_dir), "RAG_MODEL_CACHE_DIR": str(REPO / ".cache" / "models"),
           **env_extra}
    subprocess.run([rag, "setup"], env=env, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    port = free_port()
    server = subprocess.Popen([rag, "serve", "--port", str(port)], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not answer /health within 300 s")


@contextmanager
def served(data_dir: Path, **env_extra: str) -> Iterator[str]:
    """`start_server` for the length of a block: its url; the server is stopped at the end."""
    server, url = start_server(data_dir, **env_extra)
    try:
        yield url
    finally:
        server.terminate()
        server.wait(60)


async def client_loop(client: httpx.AsyncClient, questions: list[str], offset: int, until: float,
                      results: list[tuple[int, float, bool]]) -> None:
    i = offset
    while time.monotonic() < until:
        started = time.perf_counter()
        try:
            response = await client.post("/query", json={"question": questions[i % len(questions)]})
            status, retry_after = response.status_code, response.headers.get("retry-after")
        except httpx.HTTPError:
            status, retry_after = 0, None  # no answer at all: a failure
        results.append((status, 1000 * (time.perf_counter() - started), retry_after is not None))
        if status == 503:
            await asyncio.sleep(min(float(retry_after or 1), 1.0))
        i += 1


async def health_loop(client: httpx.AsyncClient, until: float, latencies: list[float], failures: list[int]) -> None:
    while time.monotonic() < until:
        started = time.perf_counter()
        try:
            status = (await client.get("/health", timeout=10)).status_code
        except httpx.HTTPError:
            status = 0
        latencies.append(1000 * (time.perf_counter() - started))
        if status != 200:
            failures.append(status)
        await asyncio.sleep(0.1)


async def run(url: str, clients: int, duration_s: float, headers: dict) -> dict:
    questions = [json.loads(line)["question"] for line in QUESTIONS.read_text().splitlines() if line.strip()]
    results: list[tuple[int, float, bool]] = []
    health: list[float] = []
    health_failures: list[int] = []
    until = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits, headers=headers) as client:
        await asyncio.gather(health_loop(client, until, health, health_failures),
                             *(client_loop(client, questions, i, until, results) for i in range(clients)))
    return {"results": results, "health": health, "health_failures": health_failures}


def report(outcome: dict, clients: int, duration_s: float) -> tuple[str, bool]:
    results, health = outcome["results"], outcome["health"]
    statuses = Counter(status for status, _, _ in results)
    ok = [ms for status, ms, _ in results if status == 200]
    busy_without_retry_after = sum(1 for status, _, has in results if status == 503 and not has)
    unexpected = sum(n for status, n in statuses.items() if status not in (200, 503))
    health_p50, health_p95 = percentiles(health)
    query_p50, query_p95 = percentiles(ok) if ok else (float("nan"), float("nan"))
    passed = (unexpected == 0 and busy_without_retry_after == 0 and health_p95 <= 100
              and not outcome["health_failures"])
    body = "\n".join([
        f"### Load: {clients} concurrent clients for {duration_s:g} s against one server (default profile)",
        "",
        "| responses | 200 | 503 (all with Retry-After) | other | answered/s | /query p50 / p95 (200s) | "
        "/health p50 / p95 / max | verdict |",
        "|---|---|---|---|---|---|---|---|",
        f"| {len(results)} | {statuses.get(200, 0)} | {statuses.get(503, 0)} "
        f"({'yes' if not busy_without_retry_after else f'{busy_without_retry_after} without'}) | {unexpected} | "
        f"{statuses.get(200, 0) / duration_s:.2f} | {query_p50:.0f} / {query_p95:.0f} ms | "
        f"{health_p50:.1f} / {health_p95:.1f} / {max(health):.1f} ms ({len(health)} polls) | "
        f"{'pass' if passed else 'FAIL'} |",
        "",
        "One generation slot and a queue of 4 (the defaults): the rest are told to retry, at once. "
        "Pass: every response 200 or 503 with Retry-After, /health p95 <= 100 ms.",
    ])
    return body, passed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start one on the demo corpus)")
    parser.add_argument("--api-key", default=os.environ.get("RAG_BENCH_API_KEY"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with tempfile.TemporaryDirectory(prefix="rag-load-") as tmp, ExitStack() as stack:
        url = args.url or stack.enter_context(served(Path(tmp)))
        outcome = asyncio.run(run(url, args.clients, args.duration, headers))
    finish("load", *report(outcome, args.clients, args.duration), write=not args.no_write)


def finish(section: str, body: str, passed: bool, *, write: bool) -> None:
    """Print the table, put it in BENCHMARKS.md (unless told not to), exit 1 if it failed."""
    print(body)
    if write:
        update_section(section, body)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
