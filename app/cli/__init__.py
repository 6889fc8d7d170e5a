"""The `rag` command line. Every command and group is registered here, explicitly: a module that is
missing or renamed fails at import, it never drops its commands silently."""

from __future__ import annotations

import os
import sys

import typer

from app.logs import configure_logging
from app.cli import adapters, audit, evaluate, evaluate_generation, keys, refresh, service, train

cli = typer.Typer(help="Retrieval-augmented answers over your documents.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
service.register(cli)  # setup, ingest, query, serve
refresh.register(cli)
evaluate_generation.register(evaluate.eval_app)  # rag eval generation, beside retrieval and chunking
evaluate.register(cli)
train.register(cli)
adapters.register(cli)
audit.register(cli)
keys.register(cli)  # rag keys create | list | revoke


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    configure_logging()  # text at INFO until a command loads its settings (app.cli.common.load_settings)
    from ingestion.model_files import ModelUnavailable
    from ingestion.registry import ModelNotFound
    from retrieval.dense import ChromaUnavailable

    try:
        cli()
    except (ChromaUnavailable, ModelUnavailable, ModelNotFound) as exc:  # a missing part: one line, never a traceback
        typer.secho(f"error: {exc}", err=True, fg="red")
        sys.exit(1)
