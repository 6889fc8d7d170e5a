"""Bounded concurrency for generation: a few run, a short queue waits, the rest are told to retry.

The gate lives on the event loop and never blocks it: a queued request awaits its slot, so the request
holding the slot keeps running and ``/health`` keeps answering. State is a plain counter plus an
``asyncio.Semaphore``, touched only from the loop thread (one gate per process and loop).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Busy(RuntimeError):
    """Every generation slot and queue place is taken (reason "queue_full"), or the wait for a slot ran
    out ("wait_timeout")."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class GenerationGate:
    def __init__(self, concurrent: int, queue: int) -> None:
        self.concurrent, self.queue = concurrent, queue
        self.admitted = 0  # running + waiting
        self.running = 0
        self.rejected = 0  # requests turned away since start
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new loop (a restarted app in the same process): fresh, empty gate
            self._loop, self._slots = loop, asyncio.Semaphore(self.concurrent)
            self.admitted = self.running = 0
        return self._slots

    @property
    def waiting(self) -> int:
        return max(self.admitted - self.running, 0)

    @asynccontextmanager
    async def slot(self, wait_s: float | None = None) -> AsyncIterator[None]:
        slots = self._semaphore()
        if self.admitted >= self.concurrent + self.queue:
            self.rejected += 1
            raise Busy(f"all {self.concurrent} generation slots and {self.queue} queue places are taken", "queue_full")
        self.admitted += 1
        try:
            try:
                await asyncio.wait_for(slots.acquire(), wait_s)
            except TimeoutError:
                self.rejected += 1
                raise Busy(f"no generation slot became free within {wait_s:g} s", "wait_timeout") from None
            self.running += 1
            try:
                yield
            finally:
                self.running -= 1
                slots.release()
        finally:
            self.admitted -= 1
