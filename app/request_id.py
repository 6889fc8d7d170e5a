"""ASGI middleware: every request gets an id, on ``request.state.request_id``, the ``X-Request-ID``
response header and every log line logged while it is served.

A well-formed incoming ``X-Request-ID`` (1 to 128 of ``A-Z a-z 0-9 . _ - : / + = @ ~``, e.g. a UUID or
a proxy's id) is kept, so one id follows a request through a proxy and this service; anything else is
replaced by a fresh one (a random UUID, hex), never refused. The id is set before any other middleware
runs, so the body limit's 413 carries it too. An exception no handler turned into a response is logged
here, with the id, and answered 500 naming the id (one traceback in the log, not the server's too).
"""

from __future__ import annotations

import json
import logging
import re
import uuid

from opentelemetry import trace

from app.logs import request_id_var

log = logging.getLogger(__name__)

HEADER = b"x-request-id"
WELL_FORMED = re.compile(r"[A-Za-z0-9._\-:/+=@~]{1,128}")


def incoming_id(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == HEADER:
            text = value.decode("latin-1")
            return text if WELL_FORMED.fullmatch(text) else None
    return None


class RequestId:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = incoming_id(scope.get("headers") or []) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id  # what request.state.request_id reads
        trace.get_current_span().set_attribute("rag.request_id", request_id)  # FastAPI's request span, if any
        started = False

        async def send_with_id(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, request_id.encode())]}
            await send(message)

        token = request_id_var.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if started:  # too late for a 500: the server ends the connection and logs it
                raise
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            body = json.dumps({"detail": f"internal error; see the server log (request id {request_id})"})
            await send_with_id({"type": "http.response.start", "status": 500,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode())]})
            await send_with_id({"type": "http.response.body", "body": body.encode()})
        finally:
            request_id_var.reset(token)
