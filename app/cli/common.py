"""What every `rag` command shares: settings or a clear exit, one-line failures, the running service."""

from __future__ import annotations

import ipaddress

import typer
from pydantic import ValidationError

from app.settings import SHIPPED, Settings

DEMO_CORPUS = (SHIPPED / "demo" / "corpus").resolve()


def load_settings(**overrides) -> Settings:
    """Settings from the environment, or a clear exit naming every invalid RAG_ variable; logging is set up
    from them (RAG_LOG_FORMAT, RAG_LOG_LEVEL)."""
    from app.logs import configure_logging

    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        for error in exc.errors():
            name = "RAG_" + "_".join(str(p) for p in error["loc"]).upper() if error["loc"] else "settings"
            typer.secho(f"invalid setting {name}: {error['msg']}", err=True, fg="red")
        raise typer.Exit(2) from None
    configure_logging(settings.log_format, settings.log_level)
    return settings


def cli_audit(settings: Settings):
    """The audit trail as this command writes it (appends, never rotates; actor: "cli" and the OS user),
    or a one-line exit naming RAG_AUDIT_LOG."""
    from app.audit import AuditLog, AuditLogError, process_actor

    try:
        return AuditLog.from_settings(settings, actor=process_actor("cli"))
    except AuditLogError as exc:
        fail(str(exc), code=2)


def fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", err=True, fg="red")
    raise typer.Exit(code)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_url(settings: Settings) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"http://{host}:{settings.port}"


def running_service(settings: Settings):
    """An httpx client for the service on settings.host:port if one answers /health, else None."""
    import httpx

    headers = {}
    key = settings.client_api_key or next(iter(settings.admin_api_keys or settings.api_keys), None)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    client = httpx.Client(base_url=server_url(settings), headers=headers, timeout=600)
    try:
        client.get("/health", timeout=2).raise_for_status()
        return client
    except httpx.HTTPError:
        client.close()
        return None
