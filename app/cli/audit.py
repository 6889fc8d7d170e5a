"""`rag audit tail`: the latest audit events (app/audit.py), filtered by event or actor name."""

from __future__ import annotations

import json
from collections import deque
from typing import Annotated, Optional

import typer

from app.cli.common import fail, load_settings

audit_app = typer.Typer(help="The audit trail (RAG_AUDIT_LOG).", no_args_is_help=True)


def register(cli: typer.Typer) -> None:
    cli.add_typer(audit_app, name="audit")


@audit_app.command()
def tail(
    lines: Annotated[int, typer.Option("-n", "--lines", min=1, help="How many events.")] = 20,
    event: Annotated[Optional[list[str]], typer.Option(help="Only these events (repeatable).")] = None,
    actor: Annotated[Optional[str], typer.Option(help="Only events of this key or caller name.")] = None,
) -> None:
    """Print the last events of the current file as JSON lines (rotated days: <file>.YYYY-MM-DD, jq them)."""
    path = load_settings().audit_path
    if path is None:
        fail("the audit trail is disabled (RAG_AUDIT_LOG is empty)")
    if not path.is_file():
        fail(f"RAG_AUDIT_LOG {path}: no audit events yet (no such file)")
    kept: deque[str] = deque(maxlen=lines)
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a full disk
            if event and record.get("event") not in event:
                continue
            if actor and (record.get("actor") or {}).get("name") != actor:
                continue
            kept.append(line.rstrip("\n"))
    for line in kept:
        typer.echo(line)
