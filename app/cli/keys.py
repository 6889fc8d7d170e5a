"""`rag keys create | list | revoke`: named, scoped API keys in the keys file (RAG_KEYS_FILE, app/access.py).

`create` prints the new key once, on stdout (nothing else goes there), and stores only its sha256. Each
change rewrites the file atomically under a lock on its folder, so a running service picks it up within a
second and never reads half a file, and two `rag keys` commands never lose each other's entries.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError

from app.access import ALL_SCOPES, KeyEntry, KeyRing, KeysFileError, key_digest, read_keys_file, write_keys_file
from app.cli.common import fail, load_settings

keys_app = typer.Typer(help="API keys with names, scopes and groups (the keys file, RAG_KEYS_FILE).",
                       no_args_is_help=True)
FileOption = Annotated[Optional[Path], typer.Option("--file", help="The keys file (default: RAG_KEYS_FILE).")]


def register(cli: typer.Typer) -> None:
    cli.add_typer(keys_app, name="keys")


def _keys_file(file: Path | None) -> Path:
    path = file or load_settings().keys_file
    if path is None:
        fail("no keys file: pass --file PATH or set RAG_KEYS_FILE")
    assert path is not None
    return path


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


@contextmanager
def _locked(path: Path) -> Iterator[list[KeyEntry]]:
    """The file's entries ([] if it does not exist yet), with its folder locked against other `rag keys`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        try:
            yield read_keys_file(path) if path.exists() else []
        except KeysFileError as exc:
            fail(str(exc))
    finally:
        os.close(folder)  # releases the lock


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Option(help="A unique name for the key (who uses it).")],
    scopes: Annotated[str, typer.Option(help="Comma-separated: query, ingest-status, admin.")] = "query",
    groups: Annotated[str, typer.Option(help="Comma-separated access groups ('*': every document).")] = "",
    requests_per_minute: Annotated[Optional[int], typer.Option(
        min=0, help="Override RAG_RATE_LIMIT_REQUESTS_PER_MINUTE for this key (0: unlimited).")] = None,
    tokens_per_minute: Annotated[Optional[int], typer.Option(
        min=0, help="Override RAG_RATE_LIMIT_TOKENS_PER_MINUTE for this key (0: unlimited).")] = None,
    file: FileOption = None,
) -> None:
    """Create a key: print it once and store its sha256 entry in the keys file."""
    path = _keys_file(file)
    unknown = [scope for scope in _split(scopes) if scope not in ALL_SCOPES]
    if unknown or not _split(scopes):
        fail(f"--scopes: {'unknown ' + ', '.join(map(repr, unknown)) if unknown else 'none given'} "
             f"(choose from {', '.join(sorted(ALL_SCOPES))})")
    key = secrets.token_urlsafe(32)
    with _locked(path) as entries:
        if any(entry.name == name for entry in entries):
            fail(f"{path}: a key named {name!r} exists already (revoke it first, or pick another name)")
        try:
            entry = KeyEntry(name=name, sha256=key_digest(key), scopes=_split(scopes),  # type: ignore[arg-type]
                             groups=_split(groups), requests_per_minute=requests_per_minute,
                             tokens_per_minute=tokens_per_minute)
        except ValidationError as exc:
            fail("; ".join(f"--{'-'.join(map(str, e['loc'][:1]))}: {e['msg']}" for e in exc.errors()))
        write_keys_file(path, [*entries, entry])
    typer.echo(key)
    typer.secho(f"created key {name!r} (id {entry.sha256[:12]}) in {path}; the key is shown only this once",
                err=True, fg="green")


@keys_app.command("revoke")
def revoke(name: Annotated[str, typer.Option(help="The key's name.")], file: FileOption = None) -> None:
    """Remove a key from the keys file (a running service refuses it within a second)."""
    path = _keys_file(file)
    with _locked(path) as entries:
        kept = [entry for entry in entries if entry.name != name]
        if len(kept) == len(entries):
            fail(f"{path}: no key named {name!r}")
        write_keys_file(path, kept)
    typer.echo(f"revoked key {name!r}")


@keys_app.command("list")
def list_keys(
    file: FileOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per key.")] = False,
) -> None:
    """Every configured key (RAG_API_KEYS, RAG_ADMIN_API_KEYS, the keys file): name, scopes, groups, key id
    (the first 12 hex digits of its sha256) and limits. Never the keys themselves."""
    settings = load_settings()
    try:
        callers = KeyRing(settings.api_keys, settings.admin_api_keys, file or settings.keys_file).callers()
    except KeysFileError as exc:
        fail(str(exc))
    rows = [{"name": c.name, "scopes": sorted(c.scopes), "groups": ["*"] if c.groups is None else sorted(c.groups),
             "key_id": c.key_id, "requests_per_minute": c.requests_per_minute,
             "tokens_per_minute": c.tokens_per_minute} for c in callers]
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    if not rows:
        typer.echo("no keys configured (the service is loopback-only; every request is the local operator)")
        return
    default = "default"
    table = [("NAME", "SCOPES", "GROUPS", "KEY ID", "REQ/MIN", "TOKENS/MIN")] + [
        (r["name"], ",".join(r["scopes"]), ",".join(r["groups"]) or "-", r["key_id"],
         default if r["requests_per_minute"] is None else str(r["requests_per_minute"]),
         default if r["tokens_per_minute"] is None else str(r["tokens_per_minute"])) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
    for row in table:
        typer.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
