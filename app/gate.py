"""Bounded concurrency for generation: a few run, a short queue waits, the rest are told to retry."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from collections.abc import Iterator


class Busy(RuntimeError):
    """Every generation slot and queue place is taken."""


class GenerationGate:
    def __init__(self, concurrent: int, queue: int) -> None:
        self._slots = threading.BoundedSemaphore(concurrent)
        self._admitted = threading.BoundedSemaphore(concurrent + queue)  # running + waiting

    @contextmanager
    def slot(self, wait_s: float | None = None) -> Iterator[None]:
        if not self._admitted.acquire(blocking=False):
            raise Busy("generation capacity and queue are full")
        try:
            if not self._slots.acquire(timeout=wait_s if wait_s is not None else -1):
                raise Busy("timed out waiting for a generation slot")
            try:
                yield
            finally:
                self._slots.release()
        finally:
            self._admitted.release()
