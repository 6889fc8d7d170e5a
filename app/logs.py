"""Log lines for the whole process: text or JSON (RAG_LOG_FORMAT), each with the request or job it serves.

The request id (set by app/request_id.py) and the job id (set by the job workers) live in context
variables; a filter on the handler puts them on every record. ``run_in_threadpool`` copies context
variables into the worker thread, so lines logged while a route's work runs off the loop carry the
request id too. With tracing on, JSON lines also carry the current trace and span ids.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import IO, Any

from opentelemetry import trace

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
job_id_var: ContextVar[str | None] = ContextVar("job_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(context)s] %(message)s"
NOISY = {"bm25s": logging.WARNING, "httpx": logging.WARNING, "chromadb": logging.WARNING,
         "bitsandbytes": logging.ERROR}  # bitsandbytes: its CPU kernels notice, on every start
UVICORN = ("uvicorn", "uvicorn.error", "uvicorn.access")
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
_OURS = {"request_id", "job_id", "context", "trace_id", "span_id", "color_message"}  # uvicorn adds color_message


@contextmanager
def log_context(var: ContextVar[str | None], value: str) -> Iterator[None]:
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


class ContextFilter(logging.Filter):
    """Adds request_id, job_id, trace_id, span_id (None when absent) and ``context`` (for text lines)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        record.job_id = job_id_var.get()
        span = trace.get_current_span().get_span_context()
        record.trace_id = format(span.trace_id, "032x") if span.is_valid else None
        record.span_id = format(span.span_id, "016x") if span.is_valid else None
        parts = [f"req={record.request_id}" if record.request_id else None,
                 f"job={record.job_id}" if record.job_id else None]
        record.context = " ".join(p for p in parts if p) or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the context ids that are
    set, every ``extra={...}`` field, and the traceback as ``exception``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        for name in ("request_id", "job_id", "trace_id", "span_id"):
            if getattr(record, name, None):
                entry[name] = getattr(record, name)
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and k not in _OURS})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record comes (a test runner swaps and closes its own)."""

    @property  # type: ignore[override]
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass


def configure_logging(log_format: str = "text", level: str = "INFO", stream: IO[str] | None = None) -> None:
    """One handler on the root logger (stderr unless `stream`), replacing any; uvicorn's loggers hand
    their records to it (run uvicorn with ``log_config=None``)."""
    handler = logging.StreamHandler(stream) if stream is not None else _Stderr()
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name, noisy_level in NOISY.items():
        logging.getLogger(name).setLevel(max(noisy_level, root.level))
    for name in UVICORN:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
