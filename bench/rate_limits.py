"""Rate limits under load: three keys against one real server for a fixed time, over HTTP.

- ``limited``: 4 clients on a key allowed ``requests_per_minute`` (default 2), asking without pause;
- ``thrifty``: 1 client on a key allowed ``tokens_per_minute`` (default 4 generated tokens: spent by one short answer);
- ``steady``: 1 client on a key with the defaults (60 requests, 20,000 tokens a minute), one question at a time.

A client told 429 waits its Retry-After (capped at 2 s, so the pressure stays on) and asks again.
Pass: ``steady`` gets only 200s; ``limited`` never more than its limit in any 60 s and ``thrifty`` stops
once its tokens are spent, every 429 with Retry-After and a message naming its limit; no 5xx anywhere.

It starts its own server (``rag setup`` into a temporary data dir, ``rag serve`` on a free port, a keys file
written by the same code as ``rag keys create``).

    PYTHONPATH=. python bench/rate_limits.py --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from common import REPO
from load_test import finish, served

from app.access import KeyEntry, key_digest, write_keys_file

QUESTIONS = [json.loads(line)["question"] for line in (REPO / "demo" / "questions.jsonl").read_text().splitlines()
             if line.strip()]


def keys(requests_per_minute: int, tokens_per_minute: int) -> dict[str, tuple[str, dict]]:
    """name -> (key, per-key limits)."""
    return {"limited": ("limited-" + "l" * 32, {"requests_per_minute": requests_per_minute}),
            "thrifty": ("thrifty-" + "t" * 32, {"tokens_per_minute": tokens_per_minute}),
            "steady": ("steady-" + "s" * 32, {})}


async def client_loop(client: httpx.AsyncClient, name: str, key: str, offset: int, until: float,
                      results: list[dict]) -> None:
    i = offset
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            response = await client.post("/query", json={"question": QUESTIONS[i % len(QUESTIONS)]},
                                         headers={"Authorization": f"Bearer {key}"})
            status, retry_after = response.status_code, response.headers.get("retry-after")
            detail = response.json().get("detail") if status != 200 else None
        except httpx.HTTPError:
            status, detail, retry_after = 0, None, None
        results.append({"key": name, "status": status, "at": started, "retry_after": retry_after, "detail": detail})
        if status not in (200, 429):
            print(f"{name}: {status} {detail}", file=sys.stderr)
        if status in (429, 503):
            await asyncio.sleep(min(float(retry_after or 1), 2.0))
        i += 1


async def run(url: str, duration_s: float, clients: dict[str, tuple[str, int]]) -> list[dict]:
    results: list[dict] = []
    until = time.monotonic() + duration_s
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await asyncio.gather(*(client_loop(client, name, key, i, until, results)
                               for name, (key, n) in clients.items() for i in range(n)))
    return results


def max_in_any_minute(times: list[float]) -> int:
    times = sorted(times)
    return max((sum(1 for u in times if t <= u < t + 60) for t in times), default=0)


def report(results: list[dict], duration_s: float, limits: dict[str, dict], clients: dict[str, int],
           max_new_tokens: int) -> tuple[str, bool]:
    rows, passed = [], True
    for name, per_key in limits.items():
        mine = [r for r in results if r["key"] == name]
        statuses = Counter(r["status"] for r in mine)
        refused = [r for r in mine if r["status"] == 429]
        waits = [int(r["retry_after"]) for r in refused if r["retry_after"]]
        named = Counter("tokens" if "tokens" in (r["detail"] or "") else "requests" for r in refused)
        admitted = max_in_any_minute([r["at"] for r in mine if r["status"] == 200])
        ok = (len(waits) == len(refused) and not any(s >= 500 or s == 0 for s in statuses)
              and (name != "steady" or set(statuses) == {200})
              and admitted <= per_key.get("requests_per_minute", 60)
              and (name != "thrifty" or named.get("tokens", 0) > 0) and (name != "limited" or bool(refused)))
        passed &= ok
        limit = ", ".join(f"{v} {k.replace('_per_minute', '')}/min" for k, v in per_key.items()) or "defaults"
        other = ", ".join(f"{n}x {s or 'no answer'}" for s, n in sorted(statuses.items()) if s not in (200, 429))
        rows.append(f"| {name} | {clients[name]} | {limit} | {len(mine)} | {statuses.get(200, 0)} | "
                    f"{len(refused)} ({', '.join(f'{k} {v}' for k, v in sorted(named.items())) or '-'}) | "
                    f"{other or 0} | "
                    f"{f'{min(waits)}-{max(waits)} s' if waits else '-'} | {admitted} | {'pass' if ok else 'FAIL'} |")
    body = "\n".join([
        f"### Rate limits: three keys for {duration_s:g} s against one server (default profile)",
        "",
        "| key | clients | its limit | responses | 200 | 429 (limit named) | other | Retry-After | "
        "most 200s in any 60 s | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Pass: the key within its limits gets only 200s while the others are refused; every 429 carries "
        "Retry-After and names its limit; no 5xx. One generation slot and a queue of 4 (the defaults); "
        f"RAG_MAX_NEW_TOKENS {max_new_tokens}, and RAG_QUEUE_WAIT_S raised so that admitted requests wait "
        "their turn instead of a 503.",
    ])
    return body, passed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds")
    parser.add_argument("--requests-per-minute", type=int, default=2, help="the limited key's limit")
    parser.add_argument("--tokens-per-minute", type=int, default=4, help="the thrifty key's limit")
    parser.add_argument("--queue-wait", type=float, default=120.0,
                        help="RAG_QUEUE_WAIT_S: how long admitted requests wait for the slot")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="RAG_MAX_NEW_TOKENS: shorter answers, so that each key gets several in a short run")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    named = keys(args.requests_per_minute, args.tokens_per_minute)
    clients = {"limited": 4, "thrifty": 1, "steady": 1}
    with tempfile.TemporaryDirectory(prefix="rag-limits-") as tmp:
        keys_file = Path(tmp) / "keys.yaml"
        write_keys_file(keys_file, [KeyEntry(name=name, sha256=key_digest(key), scopes=["query"], **per_key)
                                    for name, (key, per_key) in named.items()])
        with served(Path(tmp) / "data", RAG_KEYS_FILE=str(keys_file), RAG_REFRESH_CRON="",
                    RAG_QUEUE_WAIT_S=str(args.queue_wait), RAG_MAX_NEW_TOKENS=str(args.max_new_tokens)) as url:
            results = asyncio.run(run(url, args.duration, {n: (named[n][0], clients[n]) for n in named}))
    limits = {name: per_key for name, (_, per_key) in named.items()}
    finish("rate-limits", *report(results, args.duration, limits, clients, args.max_new_tokens),
           write=not args.no_write)


if __name__ == "__main__":
    main()
