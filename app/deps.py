"""Request dependencies: the shared Services object and API-key checks, as Annotated aliases."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

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


def _key_matches(token: str | None, keys: list[str]) -> bool:
    # Compare against every key in constant time, so timing reveals neither a match nor its position.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest((token or "").encode(), key.encode())
    return matched and token is not None


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """With RAG_API_KEYS set, a valid `Authorization: Bearer <key>` is required (admin keys pass too)."""
    keys = settings.api_keys + settings.admin_api_keys
    if keys and not _key_matches(_bearer(request), keys):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or invalid API key (Authorization: Bearer <key>)",
                            headers={"WWW-Authenticate": "Bearer"})


def require_admin_key(request: Request, settings: SettingsDep) -> None:
    """Admin endpoints need a key from RAG_ADMIN_API_KEYS (or RAG_API_KEYS when no admin keys are set)."""
    keys = settings.admin_api_keys or settings.api_keys
    if not keys:
        return  # loopback-only deployment (the server refuses other addresses without keys)
    if not _key_matches(_bearer(request), keys):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or invalid admin API key",
                            headers={"WWW-Authenticate": "Bearer"})


ApiKey = Depends(require_api_key)
AdminKey = Depends(require_admin_key)
