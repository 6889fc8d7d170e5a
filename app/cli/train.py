"""`rag train --config configs/train/<name>.yaml`: fine-tune the generator, the reranker or the embedder
(logic in generation/finetune/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from app.cli.common import fail, load_settings
from app.settings import REPO_ROOT

FINETUNE_CACHE = REPO_ROOT / ".cache" / "finetune"


train_app = typer.Typer(help="Train the generator's adapter (rag train --config ...), the reranker "
                                 "(rag train reranker --config ...) or the embedder (rag train embedder --config ...).",
                       invoke_without_command=True)
ConfigOption = Annotated[Optional[Path], typer.Option(help="Training config (YAML).", exists=True, dir_okay=False)]
SetOption = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config value: key=YAML value.")]
ActivateOption = Annotated[bool, typer.Option(help="Make the new version the active one of its name.")]


def register(cli: typer.Typer) -> None:
    cli.add_typer(train_app, name="train")


def _load_config(kind: type, path: Path, set_: list[str] | None) -> tuple[Any, str]:
    """(the config read from ``path`` with ``--set`` overrides, the text to store beside the trained model)."""
    import yaml

    overrides = {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--set {item!r}: expected key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    try:
        config = kind.from_yaml(path, overrides)
    except (ValueError, TypeError) as exc:
        fail(str(exc))
    text = path.read_text(encoding="utf-8")
    if overrides:
        text += "# overrides: " + json.dumps(overrides) + "\n"
    return config, text


@train_app.callback()
def train(
    ctx: typer.Context,
    config: ConfigOption = None,
    set_: SetOption = None,
    activate: ActivateOption = True,
    registry: Annotated[Optional[Path], typer.Option(help="Adapter registry (default RAG_ADAPTERS_DIR).")] = None,
) -> None:
    """Train an adapter (the config's method: lora, qlora, dora, ia3, prompt_tuning, ...) on RAG prompts built by
    the service's own retriever; publish it."""
    if ctx.invoked_subcommand is not None:
        return
    if config is None:
        fail("rag train: --config is required (or: rag train reranker --config ...)")
    from app.evaluation.indexes import corpus_opener, retrieval_key
    from generation.finetune.config import TrainConfig
    from generation.finetune.pipeline import train_from_config

    from app.cli.adapters import record_activation
    from generation.adapters import AdapterRegistry

    settings = load_settings()
    train_config, text = _load_config(TrainConfig, config, set_)
    adapters = AdapterRegistry(registry or settings.adapters_path)
    previous = adapters.active(train_config.name)
    try:
        ref = train_from_config(train_config, models_path=settings.models_path,
                                open_index=corpus_opener(settings, FINETUNE_CACHE),
                                retrieval_key=retrieval_key(settings), root=REPO_ROOT,
                                registry_root=registry or settings.adapters_path, cache_root=FINETUNE_CACHE,
                                config_text=text, activate=activate, device=settings.device)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    if activate:
        record_activation(adapters, ref, previous, "train")
    typer.echo(f"adapter {ref.label} -> {ref.path}")


@train_app.command("reranker")
def train_reranker(
    config: Annotated[Path, typer.Option(help="Reranker config (YAML).", exists=True, dir_okay=False)],
    set_: SetOption = None,
    activate: ActivateOption = True,
    registry: Annotated[Optional[Path], typer.Option(help="Reranker registry (default RAG_RERANKERS_DIR).")] = None,
) -> None:
    """Train the reranker (a cross-encoder) on pairs the service's own retriever finds; publish it."""
    from app.evaluation.indexes import DEFAULT_CACHE, beir_opener, corpus_opener
    from generation.finetune.reranker import RerankerConfig
    from generation.finetune.reranker import train_reranker as run

    settings = load_settings()
    reranker_config, text = _load_config(RerankerConfig, config, set_)
    try:
        ref = run(reranker_config, open_beir=beir_opener(settings, DEFAULT_CACHE),
                  open_index=corpus_opener(settings, FINETUNE_CACHE), root=REPO_ROOT,
                  registry_root=registry or settings.rerankers_path, cache_root=FINETUNE_CACHE, config_text=text,
                  activate=activate)
    except (FileNotFoundError, ValueError, LookupError) as exc:
        fail(str(exc))
    typer.echo(f"reranker {ref.label} -> {ref.path}")


@train_app.command("embedder")
def train_embedder(
    config: Annotated[Path, typer.Option(help="Embedder config (YAML).", exists=True, dir_okay=False)],
    set_: SetOption = None,
    activate: ActivateOption = True,
    registry: Annotated[Optional[Path], typer.Option(help="Embedder registry (default RAG_EMBEDDERS_DIR).")] = None,
) -> None:
    """Fine-tune the embedding model on labelled queries (in-batch + BM25 hard negatives); publish it.
    Serve it with RAG_EMBEDDING_MODEL=embedder:<name> and a full refresh (`rag refresh`)."""
    from generation.finetune.embedder_training import EmbedderTrainConfig
    from generation.finetune.embedder_training import train_embedder as run

    settings = load_settings()
    embedder_config, text = _load_config(EmbedderTrainConfig, config, set_)
    try:
        ref = run(embedder_config, root=REPO_ROOT, registry_root=registry or settings.embedders_dir,
                  cache_root=FINETUNE_CACHE / "embedders", config_text=text, activate=activate)
    except (FileNotFoundError, ValueError, LookupError) as exc:  # LoaderError is a ValueError
        fail(str(exc))
    typer.echo(f"embedder {ref.label} -> {ref.path}\nserve it: rag refresh --embedding-model embedder:{ref.label}")
