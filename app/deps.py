"""Request dependencies: the shared Services object and the caller's identity, as Annotated aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from app.access import LOCAL_OPERATOR, Caller, KeyRing
from app.audit import record_rejected_key
from app.container import Services
from app.settings import Settings


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_settings_from_app(request: Request) -> Settings:
    return request.app.state.settings


ServicesDep = Annotated[Services, Depends(get_services)]
SettingsDep = Annotated[Settings, Depends(get_settings_from_app)]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def identify(request: Request) -> Caller | None:
    """The caller of this request (stored on ``request.state.caller``), or None for a missing or unknown key.

    Without any configured key every request is the local operator (the server then binds loopback only).
    """
    keyring: KeyRing = request.app.state.keyring
    caller = keyring.identify(_bearer(request)) if keyring.configured else LOCAL_OPERATOR
    if caller is not None:
        request.state.caller = caller
    return caller


def require_scope(scope: str):
    """A dependency: a valid `Authorization: Bearer <key>` whose key holds `scope`; returns the Caller."""

    def check(request: Request) -> Caller:
        caller = identify(request)
        if caller is None:
            record_rejected_key(request, status.HTTP_401_UNAUTHORIZED, "missing or invalid API key")
            raise HTTPException(status.HTTP_401_UNAUTHORIZED,
                                "missing or invalid API key (Authorization: Bearer <key>)",
                                headers={"WWW-Authenticate": "Bearer"})
        if not caller.has(scope):
            record_rejected_key(request, status.HTTP_403_FORBIDDEN, f"lacks the {scope!r} scope")
            held = ", ".join(sorted(caller.scopes))
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                f"key {caller.name!r} lacks the {scope!r} scope (it has: {held})")
        return caller

    check.__name__ = f"require_{scope.replace('-', '_')}_scope"
    return check


QueryCaller = Annotated[Caller, Depends(require_scope("query"))]
IngestStatusCaller = Annotated[Caller, Depends(require_scope("ingest-status"))]
AdminCaller = Annotated[Caller, Depends(require_scope("admin"))]
ApiKey = Depends(require_scope("query"))
IngestStatusKey = Depends(require_scope("ingest-status"))
AdminKey = Depends(require_scope("admin"))
