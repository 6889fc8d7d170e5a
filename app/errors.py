"""Error responses: every 4xx carries a `detail` a person can read and act on."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


def _where(loc: tuple) -> str:
    return ".".join(str(part) for part in loc if part != "body") or "body"


def describe_validation_errors(errors: list[dict]) -> str:
    return "; ".join(f"{_where(tuple(e.get('loc', ())))}: {e.get('msg', 'invalid')}" for e in errors)


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        ctx = next((e.get("ctx", {}) for e in errors if e.get("type") == "json_invalid"), {})
        detail = f"malformed JSON body: {ctx.get('error', 'cannot parse')}"
        return JSONResponse(status_code=400, content={"detail": detail})
    return JSONResponse(
        status_code=422,
        content={"detail": describe_validation_errors(errors),
                 "errors": [{"field": _where(tuple(e.get("loc", ()))), "message": e.get("msg"), "type": e.get("type")}
                            for e in errors]},
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_error_handler)
