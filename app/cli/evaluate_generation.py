"""`rag eval generation`: SQuAD EM / F1 and abstention of the generator (logic in generation/finetune/evaluate.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from app.cli.common import fail, load_settings
from app.settings import REPO_ROOT

FINETUNE_CACHE = REPO_ROOT / ".cache" / "finetune"


def register(group: typer.Typer) -> None:
    group.command("generation")(generation)


def generation(
    data: Annotated[Path, typer.Option(help="SQuAD-format JSON (v1.1 or v2.0) or JSONL.", exists=True, dir_okay=False)],
    mode: Annotated[str, typer.Option(
        help="gold: the question's own paragraph; retrieval: the service's retriever.")] = "gold",
    adapter: Annotated[Optional[str], typer.Option(
        help="Registry name[@version], a folder, or 'none' for the base model (default RAG_ADAPTER).")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="A fixed, seeded random sample of N questions.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --limit sample.")] = 0,
    json_out: Annotated[Optional[Path], typer.Option(
        "--json", help="Write the report (with predictions) here.")] = None,
    abstain_margin: Annotated[Optional[float], typer.Option(
        min=0.0, help="Override the adapter's calibrated abstention margin (logits).")] = None,
    corpus: Annotated[Optional[list[Path]], typer.Option(
        help="Retrieval mode: index these SQuAD-format files' articles instead of --data's; questions whose "
             "article is not among them are out of corpus (repeatable).", exists=True, dir_okay=False)] = None,
    unsupported: Annotated[Optional[str], typer.Option(help="abstain or flag (default RAG_UNSUPPORTED).")] = None,
) -> None:
    """SQuAD EM/F1 (official normalization, citations stripped), abstention and citation checks, as /query answers.

    Reports em, f1, abstain_answerable / _unanswerable / _out_of_corpus, citation_valid, citation_precision
    and unsupported_rate (generation/finetune/evaluate.py says how each is counted).
    """
    from app.container import build_generator, build_reranker
    from generation.finetune import evaluate as ev
    from app.evaluation.indexes import squad_corpus_index
    from generation.finetune.data import file_digest, load_articles

    if mode not in ("gold", "retrieval"):
        fail(f"--mode: expected gold or retrieval, got {mode!r}")
    if corpus and mode != "retrieval":
        fail("--corpus needs --mode retrieval (gold mode gives each question its own paragraph)")
    if unsupported not in (None, "abstain", "flag"):
        fail(f"--unsupported: expected abstain or flag, got {unsupported!r}")
    settings = load_settings()
    if adapter is not None:
        settings = settings.model_copy(update={"adapter": None if adapter.lower() == "none" else adapter})
    if abstain_margin is not None:
        settings = settings.model_copy(update={"abstain_margin": abstain_margin})
    articles, items = ev.load_eval_items(data, limit, seed)
    try:
        generator = build_generator(settings, strict=True)
        scorer = build_reranker(settings)
    except (LookupError, ValueError) as exc:
        fail(str(exc))
    # Gold mode indexes --data's articles too: relevance weighs the question's terms by the index's idf
    corpus_articles = articles if not corpus else list({a.title: a for a in load_articles(corpus)}.values())
    indexed = {a.title for a in corpus_articles}
    index = squad_corpus_index(corpus_articles, settings, file_digest(corpus or [data]), FINETUNE_CACHE)
    contexts = ev.scored_gold_contexts(index.services.embedder)
    if mode == "retrieval":
        contexts = ev.retrieval_contexts(index.corpus().retrieve, settings.top_k)
    else:
        indexed = {a.title for a in articles}
    try:
        summary, records = ev.evaluate_items(generator, items, contexts, max_new_tokens=settings.max_new_tokens,
                                             timeout_s=settings.generation_timeout_s, desc=f"{mode}",
                                             unsupported=unsupported or settings.unsupported,
                                             in_corpus=lambda item: item.article.title in indexed, scorer=scorer,
                                             term_weights=index.services.bm25.idf)
    finally:
        index.close()
    summary = {**summary, "mode": mode, "data": str(data), "limit": limit, "seed": seed,
               "adapter": getattr(generator, "adapter_name", None), "generator_model": settings.generator_model,
               "top_k": settings.top_k if mode == "retrieval" else 1, "context_window": settings.context_window,
               "max_new_tokens": settings.max_new_tokens, "abstain_margin": generator.abstain_margin,
               "grounding": generator.grounding.as_dict(), "reranker": getattr(scorer, "name", None),
               "unsupported": unsupported or settings.unsupported,
               "corpus": [str(c) for c in corpus or []]}
    typer.echo(json.dumps(summary, indent=2))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({**summary, "predictions": records}, indent=2) + "\n")
        typer.echo(f"wrote {json_out}")
