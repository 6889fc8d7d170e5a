"""Request dependencies: the shared Services object, the caller's identity and its rate-limit budget,
as Annotated aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from app.access import LOCAL_OPERATOR, Caller, KeyRing
from app.audit import record_rejected_key
from app.container import Services
from app.rate_limits import Budget, RateLimited, RateLimits
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


def unauthorized() -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or invalid API key (Authorization: Bearer <key>)",
                         headers={"WWW-Authenticate": "Bearer"})


def optional_caller(request: Request) -> Caller | None:
    """The caller when a key is presented (401 if it is unknown) or none is configured; None without a key."""
    if request.app.state.keyring.configured and _bearer(request) is None:
        return None
    caller = identify(request)
    if caller is None:
        raise unauthorized()
    return caller


def is_public(request: Request, route: str) -> bool:
    """Whether RAG_PUBLIC_ROUTES opens `route` (health, docs, openapi) to callers without a key."""
    public = request.app.state.settings.public_routes
    return route in public or (route == "openapi" and "docs" in public)  # the docs pages need the schema


def require_scope(scope: str):
    """A dependency: a valid `Authorization: Bearer <key>` whose key holds `scope`; returns the Caller."""

    def check(request: Request) -> Caller:
        caller = identify(request)
        if caller is None:
            record_rejected_key(request, status.HTTP_401_UNAUTHORIZED, "missing or invalid API key")
            raise unauthorized()
        if not caller.has(scope):
            record_rejected_key(request, status.HTTP_403_FORBIDDEN, f"lacks the {scope!r} scope")
            held = ", ".join(sorted(caller.scopes))
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                f"key {caller.name!r} lacks the {scope!r} scope (it has: {held})")
        return caller

    check.__name__ = f"require_{scope.replace('-', '_')}_scope"
    return check


QueryCaller = Annotated[Caller, Depends(require_scope("query"))]
OptionalCaller = Annotated[Caller | None, Depends(optional_caller)]
IngestStatusCaller = Annotated[Caller, Depends(require_scope("ingest-status"))]
AdminCaller = Annotated[Caller, Depends(require_scope("admin"))]
ApiKey = Depends(require_scope("query"))
IngestStatusKey = Depends(require_scope("ingest-status"))
AdminKey = Depends(require_scope("admin"))


def admit_query(request: Request, caller: QueryCaller) -> Budget:
    """Counts the request against its key's limits (429 with Retry-After when over one); the returned
    budget is charged the tokens the answer generates."""
    limits: RateLimits = request.app.state.rate_limits
    try:
        limits.admit(caller)
    except RateLimited as exc:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, exc.detail,
                            headers={"Retry-After": str(exc.retry_after_s)}) from None
    return Budget(limits, caller)


QueryBudget = Annotated[Budget, Depends(admit_query)]
