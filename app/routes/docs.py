"""GET /openapi.json, /docs and /redoc, behind a key unless RAG_PUBLIC_ROUTES opens them.

FastAPI's own routes for these are switched off (create_app) so that these, which check the caller,
are the only ones. Any valid key may read them; with no keys configured they are open.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from app.deps import unauthorized, is_public, optional_caller

OPENAPI_URL = "/openapi.json"


def _allowed(route: str):
    def check(request: Request) -> None:
        if not is_public(request, route) and optional_caller(request) is None:
            raise unauthorized()

    return Depends(check)


router = APIRouter(include_in_schema=False)


@router.get(OPENAPI_URL, dependencies=[_allowed("openapi")])
def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs", dependencies=[_allowed("docs")])
def swagger(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url=OPENAPI_URL, title=f"{request.app.title} - docs")


@router.get("/redoc", dependencies=[_allowed("docs")])
def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url=OPENAPI_URL, title=f"{request.app.title} - ReDoc")


