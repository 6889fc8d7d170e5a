"""`rag adapters list | activate NAME[@VERSION] | rollback [NAME]`: the adapter registry (generation/adapters.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from app.cli import fail, load_settings

adapters_app = typer.Typer(help="Trained LoRA adapters: list, activate, roll back.", no_args_is_help=True)
RegistryOption = Annotated[Optional[Path], typer.Option(help="Adapter registry (default RAG_ADAPTERS_DIR).")]


def register(cli: typer.Typer) -> None:
    cli.add_typer(adapters_app, name="adapters")


def _registry(path: Path | None):
    from generation.adapters import AdapterRegistry

    return AdapterRegistry(path or load_settings().adapters_path)


@adapters_app.command("list")
def list_adapters(registry: RegistryOption = None) -> None:
    """Every adapter version, the active one marked with *, with its headline metrics."""
    reg = _registry(registry)
    entries = reg.entries()
    if not entries:
        typer.echo(f"no adapters in {reg.root}")
        return
    for entry in entries:
        metrics = entry["metrics"] or {}
        best = metrics.get("best_eval_loss")
        detail = f"best validation loss {best:.4f}" if isinstance(best, (int, float)) else ""
        typer.echo(f"{'*' if entry['active'] else ' '} {entry['name']}@{entry['version']}  "
                   f"{entry['created_at'] or ''}  {entry['base_model'] or ''}  {detail}".rstrip())


@adapters_app.command()
def activate(ref: Annotated[str, typer.Argument(help="NAME (its latest version) or NAME@VERSION.")],
             registry: RegistryOption = None) -> None:
    """Make a version the one served for its name (restart or reload the service to pick it up)."""
    from generation.adapters import AdapterNotFound

    name, _, version = ref.partition("@")
    try:
        found = _registry(registry).activate(name, version or None)
    except AdapterNotFound as exc:
        fail(str(exc))
    typer.echo(f"active: {found.label}")


@adapters_app.command()
def rollback(name: Annotated[Optional[str], typer.Argument(help="Adapter name (optional when there is one).")] = None,
             registry: RegistryOption = None) -> None:
    """Re-activate the version that was active before the current one."""
    from generation.adapters import AdapterNotFound

    reg = _registry(registry)
    if name is None:
        names = reg.names()
        if len(names) != 1:
            fail(f"name the adapter to roll back (registry holds: {', '.join(names) or 'none'})")
        name = names[0]
    try:
        found = reg.rollback(name)
    except AdapterNotFound as exc:
        fail(str(exc))
    typer.echo(f"active: {found.label}")
