"""Per-key rate limits on /query: requests per minute and generated tokens per minute (the `limits` library).

- Requests: a moving 60 s window. A request is admitted when the key made fewer than its limit in the
  last 60 s; Retry-After is when the oldest of those ages out.
- Tokens: how many tokens an answer generates is known only afterwards, so answers are charged after
  generation into a fixed 60 s window that starts at the key's first charge, and a request is refused
  while that window's budget is spent. Requests admitted together may overshoot the budget by what they
  generate (at most RAG_MAX_NEW_TOKENS each); the overshoot is charged all the same.

A key's ``requests_per_minute`` / ``tokens_per_minute`` (keys file) override the RAG_RATE_LIMIT_* defaults;
0 means unlimited. The local operator (no keys configured) is not limited.

Budgets live in RAG_RATE_LIMIT_STORAGE: ``memory://`` is this process's own, shared by its worker threads;
``redis://...`` is one budget for every process and replica that points at it. When that storage fails
at run time, requests are admitted (and the failure logged): the limits protect capacity, they are not
access control.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Literal

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.errors import ConfigurationError, StorageError
from limits.storage import MemoryStorage, storage_from_string
from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

from app.access import Caller

log = logging.getLogger(__name__)
NAMESPACE = "rag"  # prefix of every counter (a shared Redis may hold others')


class RateLimitStorageError(ValueError):
    """RAG_RATE_LIMIT_STORAGE is not a usable storage; the message names the setting."""


@dataclass
class RateLimited(Exception):
    """A request over one of its key's limits."""

    limit: Literal["requests", "tokens"]
    retry_after_s: int
    detail: str


class RateLimits:
    """Admits and charges /query requests of each key against its budgets; safe across threads."""

    def __init__(self, requests_per_minute: int, tokens_per_minute: int, storage_uri: str = "memory://",
                 window_s: int = 60) -> None:
        self.requests_per_minute, self.tokens_per_minute = requests_per_minute, tokens_per_minute
        self.window_s = window_s  # a minute; tests shorten it
        try:
            storage = storage_from_string(storage_uri, wrap_exceptions=True)
        except (ConfigurationError, ValueError) as exc:
            raise RateLimitStorageError(f"RAG_RATE_LIMIT_STORAGE {storage_uri!r}: {exc}") from None
        if not storage.check():
            raise RateLimitStorageError(f"RAG_RATE_LIMIT_STORAGE {storage_uri!r}: the storage does not answer")
        self._requests = MovingWindowRateLimiter(storage)
        self._tokens = FixedWindowRateLimiter(storage)  # the one strategy that records a charge past the limit
        # Memory storage swaps its per-key locks out when a window expires; one lock keeps each check-and-count
        # whole. Redis runs each as one script, so there it is not needed.
        self._lock: AbstractContextManager[object] = (
            threading.Lock() if isinstance(storage, MemoryStorage) else nullcontext())

    def _item(self, amount: int) -> RateLimitItem:
        return RateLimitItemPerSecond(amount, multiples=self.window_s, namespace=NAMESPACE)

    def limits_for(self, caller: Caller) -> tuple[int, int]:
        """(requests, tokens) per minute for this caller; 0: unlimited."""
        if caller.key_id is None:  # the local operator
            return 0, 0
        requests = self.requests_per_minute if caller.requests_per_minute is None else caller.requests_per_minute
        tokens = self.tokens_per_minute if caller.tokens_per_minute is None else caller.tokens_per_minute
        return requests, tokens

    def admit(self, caller: Caller) -> None:
        """Count one request, or raise RateLimited (the token budget is looked at first, so a request
        refused for tokens does not spend a request)."""
        requests, tokens = self.limits_for(caller)
        key = str(caller.key_id)
        try:
            with self._lock:
                if tokens:
                    item = self._item(tokens)
                    if not self._tokens.test(item, "tokens", key):
                        wait = _seconds_until(self._tokens.get_window_stats(item, "tokens", key).reset_time)
                        raise RateLimited("tokens", wait, f"rate limit: key {caller.name!r} has spent its {tokens} "
                                                          f"generated tokens per minute; retry in {wait} s")
                if requests:
                    item = self._item(requests)
                    if not self._requests.hit(item, "requests", key):
                        wait = _seconds_until(self._requests.get_window_stats(item, "requests", key).reset_time)
                        raise RateLimited("requests", wait, f"rate limit: key {caller.name!r} made its {requests} "
                                                            f"requests per minute; retry in {wait} s")
        except StorageError as exc:
            log.warning("rate limit storage failed, request admitted: %s", exc)

    def charge(self, caller: Caller, generated_tokens: int) -> None:
        """Charge an answer's generated tokens to its key's budget for the current window."""
        _, tokens = self.limits_for(caller)
        if not tokens or generated_tokens <= 0:
            return
        try:
            with self._lock:
                self._tokens.hit(self._item(tokens), "tokens", str(caller.key_id),
                                 cost=generated_tokens)
        except StorageError as exc:
            log.warning("rate limit storage failed, %d tokens not charged: %s", generated_tokens, exc)


def _seconds_until(when: float) -> int:
    """Whole seconds (at least 1) until ``when`` (epoch seconds), as Retry-After wants them."""
    return max(1, math.ceil(when - time.time()))


@dataclass(frozen=True)
class Budget:
    """One admitted request's handle on its key's token budget."""

    limits: RateLimits
    caller: Caller

    def charge(self, generated_tokens: int) -> None:
        self.limits.charge(self.caller, generated_tokens)
