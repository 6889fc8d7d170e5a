"""`rag eval retrieval` and `rag eval chunking` (the logic lives in app/evaluation/); app/cli/__init__.py also
registers `rag eval generation` (evaluate_generation.py) into ``eval_app``."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from app.cli.common import fail, load_settings
from app.settings import REPO_ROOT

eval_app = typer.Typer(help="Measure retrieval and answer quality on labelled data.", no_args_is_help=True)

DEFAULT_PLOT = REPO_ROOT / "docs" / "img" / "fusion_tuning.png"
ExistingFile = dict(exists=True, dir_okay=False, readable=True)


def register(cli: typer.Typer) -> None:
    cli.add_typer(eval_app, name="eval")


def _write_json(path: Path | None, report: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        typer.echo(f"wrote {path}")


@eval_app.command()
def retrieval(
    corpus: Annotated[Path, typer.Option(help="BEIR corpus.jsonl (_id, title, text).", **ExistingFile)],
    queries: Annotated[Path, typer.Option(help="BEIR queries.jsonl (_id, text).", **ExistingFile)],
    qrels: Annotated[Path, typer.Option(help="BEIR qrels .tsv (query-id, corpus-id, score).", **ExistingFile)],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the report as JSON here.")] = None,
    tune: Annotated[bool, typer.Option(
        help="Sweep fusion on these judgments and write the best to the tuning file.")] = False,
    tuning_out: Annotated[Optional[Path], typer.Option(
        help="Tuning file to write (default RAG_RETRIEVAL_TUNING).")] = None,
    plot: Annotated[Path, typer.Option(help="PNG of the tuning curve (with --tune).")] = DEFAULT_PLOT,
    data_dir: Annotated[Optional[Path], typer.Option(help="Build/reuse the index here instead of the cache.")] = None,
    cache: Annotated[bool, typer.Option(help="Reuse an index cached under .cache/eval (else a throwaway one).")] = True,
    split_name: Annotated[Optional[str], typer.Option(
        help="Name of the judgments in the report (default corpus-folder/qrels-name).")] = None,
    depth: Annotated[int, typer.Option(min=10, max=2000, help="Chunk candidates per retriever.")] = 200,
) -> None:
    """BM25, dense and hybrid (both fusions) on a BEIR data set: NDCG@10, Recall@100, MRR@10, latency."""
    from app.evaluation.retrieval import evaluate, format_table
    from app.evaluation.tuning import format_curve

    settings = load_settings()
    if tune and tuning_out is None and settings.retrieval_tuning is None:
        fail("--tune needs --tuning-out, or RAG_RETRIEVAL_TUNING set")
    with tempfile.TemporaryDirectory(prefix="rag-eval-") as scratch:
        folder = data_dir or (None if cache else Path(scratch) / "index")
        try:
            report = evaluate(corpus, queries, qrels, settings, data_dir=folder, depth=depth, split_name=split_name,
                              tune=tune, tuning_out=tuning_out, plot_out=plot if tune else None)
        except ValueError as exc:
            fail(str(exc))
    if tune:
        tuning = report["tuning"]
        typer.echo(format_curve(tuning["curve"]))
        chosen = tuning["chosen"]
        typer.echo(f"\nchosen: fusion={chosen['fusion']} alpha={chosen['fusion_alpha']} rrf_k={chosen['rrf_k']} "
                   f"(NDCG@10 {chosen['metrics']['ndcg@10']:.4f}) -> {tuning['tuning_file']}; plot {tuning['plot']}\n")
    typer.echo(format_table(report))
    _write_json(json_out, report)


@eval_app.command()
def chunking(
    squad: Annotated[Path, typer.Option(
        help="SQuAD v1.1 JSON; each article becomes one long document.", **ExistingFile)],
    limit: Annotated[Optional[int], typer.Option(min=1, help="Use the first N articles.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the report as JSON here.")] = None,
    cache: Annotated[bool, typer.Option(help="Reuse indexes cached under .cache/eval (else throwaway ones).")] = True,
) -> None:
    """Semantic chunker vs fixed-size windows (same size and overlap): answer recall@1/3/5/10 on SQuAD articles."""
    from app.evaluation.chunking import evaluate_chunking, format_chunking

    settings = load_settings()
    with tempfile.TemporaryDirectory(prefix="rag-eval-") as scratch:
        report = evaluate_chunking(squad, settings, limit=limit, cache_root=None if cache else Path(scratch))
    typer.echo(format_chunking(report))
    _write_json(json_out, report)
