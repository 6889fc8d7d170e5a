"""Strict JSON for request bodies: duplicate keys, NaN/Infinity and runaway nesting are malformed (400).

Both ``/ingest`` (parsed by hand after its signature check) and the JSON routes (through
:class:`StrictJSONRoute`, which FastAPI uses to read their bodies) parse with :func:`loads_strict`, so
the same body gets the same answer everywhere.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute

MAX_DEPTH = 64  # objects and arrays inside each other; deeper bodies are refused before validation


class MalformedJSON(ValueError):
    pass


def loads_strict(body: bytes | str) -> Any:
    """The parsed body, or MalformedJSON saying what is wrong and where.

    Undecodable bytes become lone surrogates, so a caller can trace them to a field (see ingest_payload).
    """
    text = body.decode("utf-8", errors="surrogateescape") if isinstance(body, bytes) else body
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise MalformedJSON(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise MalformedJSON(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise MalformedJSON(str(exc)) from None
    if _depth(data) > MAX_DEPTH:
        raise MalformedJSON(f"nested deeper than {MAX_DEPTH} levels")
    return data


def _depth(value: Any) -> int:
    # iterative, so a body just under the interpreter's recursion limit cannot overflow it here
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            if level <= MAX_DEPTH:
                stack.extend((child, level + 1) for child in item)
    return deepest


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r} in an object")
        seen[key] = value
    return seen


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class _StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = loads_strict(await self.body())
            except MalformedJSON as exc:
                # FastAPI turns this into its json_invalid validation error; app.errors answers 400
                raise json.JSONDecodeError(str(exc), "", 0) from None
        return self._json


class StrictJSONRoute(APIRoute):
    """An APIRoute whose JSON body is read with :func:`loads_strict`."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict_handler(request: Request):
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict_handler
