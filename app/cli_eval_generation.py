"""`rag eval generation`: SQuAD EM / F1 and abstention of the generator (logic in generation/finetune/evaluate.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from app.cli import fail, load_settings
from app.cli_eval import eval_app
from app.settings import REPO_ROOT

FINETUNE_CACHE = REPO_ROOT / ".cache" / "finetune"


def register(cli: typer.Typer) -> None:
    """The command is added to `rag eval` on import; app.cli_eval mounts the group."""


@eval_app.command("generation")
def generation(
    data: Annotated[Path, typer.Option(help="SQuAD-format JSON (v1.1 or v2.0) or JSONL.", exists=True, dir_okay=False)],
    mode: Annotated[str, typer.Option(help="gold: the question's own paragraph; retrieval: the service's retriever.")] = "gold",
    adapter: Annotated[Optional[str], typer.Option(help="Registry name[@version], a folder, or 'none' for the base model (default RAG_ADAPTER).")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="A fixed, seeded random sample of N questions.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --limit sample.")] = 0,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the report (with predictions) here.")] = None,
    abstain_margin: Annotated[Optional[float], typer.Option(min=0.0, help="Override the adapter's calibrated abstention margin (logits).")] = None,
) -> None:
    """SQuAD EM/F1 (official normalization, citations stripped) and abstention rates, gold or retrieval context."""
    from app.container import build_generator
    from generation.finetune import evaluate as ev
    from generation.finetune.data import corpus_index, file_digest, retriever_of

    if mode not in ("gold", "retrieval"):
        fail(f"--mode: expected gold or retrieval, got {mode!r}")
    settings = load_settings()
    if adapter is not None:
        settings = settings.model_copy(update={"adapter": None if adapter.lower() == "none" else adapter})
    if abstain_margin is not None:
        settings = settings.model_copy(update={"abstain_margin": abstain_margin})
    articles, items = ev.load_eval_items(data, limit, seed)
    try:
        generator = build_generator(settings, strict=True)
    except (LookupError, ValueError) as exc:
        fail(str(exc))
    index = None
    contexts = ev.gold_contexts
    if mode == "retrieval":
        index = corpus_index(articles, settings, file_digest([data]), FINETUNE_CACHE)
        contexts = ev.retrieval_contexts(retriever_of(index), settings.top_k)
    try:
        summary, records = ev.evaluate_items(generator, items, contexts, max_new_tokens=settings.max_new_tokens,
                                             timeout_s=settings.generation_timeout_s, desc=f"{mode}")
    finally:
        if index is not None:
            index.close()
    summary = {**summary, "mode": mode, "data": str(data), "limit": limit, "seed": seed,
               "adapter": getattr(generator, "adapter_name", None), "generator_model": settings.generator_model,
               "top_k": settings.top_k if mode == "retrieval" else 1, "context_window": settings.context_window,
               "max_new_tokens": settings.max_new_tokens, "abstain_margin": generator.abstain_margin}
    typer.echo(json.dumps(summary, indent=2))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({**summary, "predictions": records}, indent=2) + "\n")
        typer.echo(f"wrote {json_out}")
