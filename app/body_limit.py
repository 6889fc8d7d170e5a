"""ASGI middleware: 413 for request bodies over a size limit, counted on the bytes actually received.

A declared Content-Length over the limit is refused without passing anything to the app; otherwise the
body is read up to the limit (whatever Transfer-Encoding says) and replayed to the app, so a lying or
absent Content-Length cannot slip a larger body through.

Before a 413 is sent, the rest of the body (up to DRAIN_MAX_BYTES) is read and dropped: a client writes
its whole body before it reads, and a connection closed on unread data reaches it as a reset, not as
the 413. A client that sent ``Expect: 100-continue`` gets the 413 without sending its body.
"""

from __future__ import annotations

import json
from collections.abc import Callable

DRAIN_MAX_BYTES = 64 * 1024 * 1024


class BodySizeLimit:
    def __init__(self, app, *, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for  # path -> byte limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        drain = headers.get(b"expect", b"").lower() != b"100-continue"
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(send, receive if drain and int(declared) <= DRAIN_MAX_BYTES else None, limit)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                await _too_large(send, receive if message.get("more_body", False) else None, limit)
                return
            chunks.append(body)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _too_large(send, receive, limit: int) -> None:
    """Answer 413, after reading what is left of the body when ``receive`` is given (see module doc)."""
    drained, more = 0, receive is not None
    while more and drained <= DRAIN_MAX_BYTES:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        drained += len(message.get("body", b""))
        more = message.get("more_body", False)
    payload = json.dumps({"detail": f"request body exceeds the limit of {limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
