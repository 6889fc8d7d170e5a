"""Webhook signatures: ``X-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>...]``.

v1 is the HMAC-SHA256, in hex, of ``"<t>.<raw body bytes>"`` under a webhook secret. Several secrets
may be configured (rotation: a signature under any of them passes) and the header may carry several
v1 values (a sender signing with old and new secret during a rotation). Every (secret, v1) pair is
compared in constant time, without stopping at the first match. Other keys in the header are ignored.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence


class SignatureError(ValueError):
    """Why a request's signature is refused (the message is safe to return)."""


def signature_hex(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(body: bytes, secret: str, timestamp: int | None = None) -> str:
    """The X-Signature header value for `body` (senders and tests)."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    return f"t={timestamp},v1={signature_hex(secret, timestamp, body)}"


def parse_header(header: str) -> tuple[int, list[str]]:
    """(timestamp, v1 values) of a header; SignatureError when malformed."""
    timestamps, signatures = [], []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            raise SignatureError("malformed X-Signature header (expected t=<unix seconds>,v1=<hex>)")
        if key == "t":
            timestamps.append(value.strip())
        elif key == "v1":
            signatures.append(value.strip().lower())
    if len(timestamps) != 1 or not timestamps[0].isascii() or not timestamps[0].isdigit():
        raise SignatureError("X-Signature needs exactly one t=<unix seconds>")
    if not signatures:
        raise SignatureError("X-Signature carries no v1 signature")
    return int(timestamps[0]), signatures


def verify(header: str | None, body: bytes, secrets: Sequence[str], *, tolerance_s: int,
           now: float | None = None) -> int:
    """The signed timestamp when the header is valid for `body` under one of `secrets`, else SignatureError."""
    return verify_with_secret(header, body, secrets, tolerance_s=tolerance_s, now=now)[0]


def verify_with_secret(header: str | None, body: bytes, secrets: Sequence[str], *, tolerance_s: int,
                       now: float | None = None) -> tuple[int, int]:
    """(signed timestamp, index in `secrets` of the first secret that signed it), else SignatureError."""
    if not secrets:
        raise SignatureError("no webhook secret is configured")
    if not header:
        raise SignatureError("missing X-Signature header")
    timestamp, given = parse_header(header)
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance_s:
        raise SignatureError(f"X-Signature timestamp is more than {tolerance_s} s away from the server's clock")
    matched: int | None = None
    for index, secret in enumerate(secrets):
        expected = signature_hex(secret, timestamp, body).encode()
        for candidate in given:
            if hmac.compare_digest(expected, candidate.encode("utf-8", "replace")) and matched is None:
                matched = index
    if matched is None:
        raise SignatureError("X-Signature does not match the body under any configured secret")
    return timestamp, matched
