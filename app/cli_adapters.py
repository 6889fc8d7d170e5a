"""`rag adapters list | activate | rollback | calibrate`: the adapter registry (generation/adapters.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from app.cli import fail, load_settings

adapters_app = typer.Typer(help="Trained LoRA adapters: list, activate, roll back, calibrate.", no_args_is_help=True)
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


@adapters_app.command()
def calibrate(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION.")],
    data: Annotated[Optional[Path], typer.Option(help="SQuAD-format file (default: the adapter's held-out validation "
                                                      "articles, read from its training files).", exists=True)] = None,
    limit: Annotated[int, typer.Option(min=20, help="Seeded sample of questions.")] = 240,
    max_abstain_answerable: Annotated[float, typer.Option(min=0, max=100, help="Cap, percent of answerable questions.")] = 8.0,
    registry: RegistryOption = None,
) -> None:
    """Choose the abstention margin on held-out questions and store it in the adapter's metadata.

    One gold-context run that never abstains records each question's answer and first-token preference
    for "I don't know."; every margin is then scored from it, and the margin with the best SQuAD 2.0 F1
    whose abstention on answerable questions stays under the cap is kept (with a PNG of the curve).
    """
    from datetime import datetime, timezone

    from app.container import build_generator
    from app.settings import REPO_ROOT
    from generation.adapters import AdapterNotFound, read_metadata, write_metadata
    from generation.finetune import evaluate as ev
    from generation.finetune.data import load_articles

    try:
        found = _registry(registry).resolve(ref)
    except AdapterNotFound as exc:
        fail(str(exc))
    metadata = read_metadata(found.path)
    if data is not None:
        articles, source = load_articles([data]), str(data)
    else:
        try:
            articles, source = ev.held_out_articles(metadata, REPO_ROOT)
        except ValueError as exc:
            fail(f"{found.label}: {exc}; pass --data")
    items = ev.sample_items(ev.items_of(articles), limit, seed=0)
    settings = load_settings().model_copy(update={"adapter": str(found.path), "abstain_margin": ev.NEVER_ABSTAIN})
    try:
        generator = build_generator(settings, strict=True)
    except (LookupError, ValueError) as exc:
        fail(str(exc))
    _, records = ev.evaluate_items(generator, items, ev.gold_contexts, max_new_tokens=settings.max_new_tokens,
                                   timeout_s=settings.generation_timeout_s, desc="calibrate")
    margins = [round(0.25 * i, 2) for i in range(41)]  # 0 .. 10 logits
    curve = ev.abstention_curve(records, margins)
    chosen = ev.choose_margin(curve, max_abstain_answerable)
    for row in curve:
        typer.echo(f"margin {row['margin']:5.2f}  F1 {row['f1']:5.1f}  F1 all {row.get('f1_all') or 0:5.1f}  "
                   f"abstain answerable {row['abstain_answerable'] or 0:5.1f}%  "
                   f"unanswerable {row['abstain_unanswerable'] or 0:5.1f}%")
    plot = found.path / "abstention_calibration.png"
    ev.plot_abstention(curve, chosen, f"{found.label}: abstention margin on {len(items)} held-out questions", plot)
    metadata["abstain_margin"] = chosen["margin"]
    metadata["abstain_calibration"] = {
        "data": source, "questions": len(items), "max_abstain_answerable": max_abstain_answerable,
        "chosen": chosen, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "plot": plot.name}
    write_metadata(found.path, metadata)
    typer.echo(f"{found.label}: abstain_margin = {chosen['margin']} (F1 {chosen['f1']}, abstains on "
               f"{chosen['abstain_answerable']}% of answerable and {chosen['abstain_unanswerable']}% of unanswerable "
               f"questions); curve: {plot}")
