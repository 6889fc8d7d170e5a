"""`rag train --config configs/train/<name>.yaml`: fine-tune the generator (logic in generation/finetune/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from app.cli import fail, load_settings
from app.settings import REPO_ROOT

FINETUNE_CACHE = REPO_ROOT / ".cache" / "finetune"


def register(cli: typer.Typer) -> None:
    cli.command("train")(train)


def train(
    config: Annotated[Path, typer.Option(help="Training config (YAML).", exists=True, dir_okay=False)],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config value: key=YAML value.")] = None,
    activate: Annotated[bool, typer.Option(help="Make the new version the active one of its name.")] = True,
    registry: Annotated[Optional[Path], typer.Option(help="Adapter registry (default RAG_ADAPTERS_DIR).")] = None,
) -> None:
    """Train a LoRA / QLoRA adapter on RAG prompts built by the service's own retriever; publish it."""
    import yaml

    from generation.finetune.config import TrainConfig
    from generation.finetune.pipeline import train_from_config

    settings = load_settings()
    overrides = {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--set {item!r}: expected key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    try:
        train_config = TrainConfig.from_yaml(config, overrides)
    except (ValueError, TypeError) as exc:
        fail(str(exc))
    text = config.read_text(encoding="utf-8")
    if overrides:
        text += "# overrides: " + json.dumps(overrides) + "\n"
    try:
        ref = train_from_config(train_config, settings, root=REPO_ROOT, registry_root=registry or settings.adapters_path,
                                cache_root=FINETUNE_CACHE, config_text=text, activate=activate,
                                device=settings.device)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    typer.echo(f"adapter {ref.label} -> {ref.path}")
