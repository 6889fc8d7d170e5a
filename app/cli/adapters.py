"""`rag adapters list | activate | rollback | calibrate`: the adapter registry (generation/adapters.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from app.cli.common import cli_audit, fail, load_settings

adapters_app = typer.Typer(help="Trained LoRA adapters: list, activate, roll back, calibrate.", no_args_is_help=True)
RegistryOption = Annotated[Optional[Path], typer.Option(help="Adapter registry (default RAG_ADAPTERS_DIR).")]


def register(cli: typer.Typer) -> None:
    cli.add_typer(adapters_app, name="adapters")


def _registry(path: Path | None):
    from generation.adapters import AdapterRegistry

    return AdapterRegistry(path or load_settings().adapters_path)


def record_activation(registry, found, previous: str | None, how: str) -> None:
    """``adapter_activated`` in the audit trail: which version now serves, which did before, and how."""
    audit = cli_audit(load_settings())
    audit.record("adapter_activated", adapter=found.label, previous_version=previous, how=how,
                 registry=str(registry.root))
    audit.close()


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
                   f"{entry['created_at'] or ''}  {entry['method'] or ''}  {entry['base_model'] or ''}  "
                   f"{detail}".rstrip())


@adapters_app.command()
def activate(ref: Annotated[str, typer.Argument(help="NAME (its latest version) or NAME@VERSION.")],
             registry: RegistryOption = None) -> None:
    """Make a version the one served for its name (restart or reload the service to pick it up)."""
    from generation.adapters import AdapterNotFound

    name, _, version = ref.partition("@")
    reg = _registry(registry)
    previous = reg.active(name)
    try:
        found = reg.activate(name, version or None)
    except AdapterNotFound as exc:
        fail(str(exc))
    record_activation(reg, found, previous, "activate")
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
    previous = reg.active(name)
    try:
        found = reg.rollback(name)
    except AdapterNotFound as exc:
        fail(str(exc))
    record_activation(reg, found, previous, "rollback")
    typer.echo(f"active: {found.label}")


@adapters_app.command()
def calibrate(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION.")],
    limit: Annotated[int, typer.Option(min=20, help="Seeded sample of in-corpus questions.")] = 240,
    out_of_corpus: Annotated[int, typer.Option(min=0, help="Seeded sample of out-of-corpus questions.")] = 120,
    max_abstain_answerable: Annotated[float, typer.Option(
        min=0, max=100, help="Cap, percent of answerable questions, in each mode.")] = 10.0,
    reuse: Annotated[bool, typer.Option(
        help="Choose again from this adapter's last recorded run with the same questions and settings (under "
             "another cap, say), without generating.")] = False,
    registry: RegistryOption = None,
) -> None:
    """Choose when the adapter abstains, on its held-out validation articles, and store it in its metadata.

    One run through the serving path, with the gate open and abstention off, records every question's
    grounding signals: validation questions (answerable and SQuAD 2.0 unanswerable) against an index of
    all training articles and, again, with their own paragraph (gold mode: a question worded unlike its
    document must still get through), and out-of-corpus ones against an index without their article. Every
    combination of abstention margin and grounding thresholds is scored from it; the best SQuAD 2.0 F1
    (out-of-corpus questions count as unanswerable) whose abstention on answerable questions stays under
    the cap is stored (metadata: abstain_margin, grounding), with a PNG of the sweeps.
    """
    import json
    from datetime import datetime, timezone

    from app.settings import REPO_ROOT
    from generation.adapters import AdapterNotFound, read_metadata, write_metadata
    from generation.finetune import calibrate as cal
    from generation.finetune import evaluate as ev

    try:
        found = _registry(registry).resolve(ref)
    except AdapterNotFound as exc:
        fail(str(exc))
    metadata = read_metadata(found.path)
    try:
        held_out, corpus, source = cal.held_out_articles(metadata, REPO_ROOT)
    except ValueError as exc:
        fail(f"{found.label}: {exc}")
    held_titles = {a.title for a in held_out}
    items = ev.items_of(held_out)
    inside = ev.sample_items(items, limit, seed=0)
    outside = ev.sample_items(items, out_of_corpus, seed=1) if out_of_corpus else []
    settings = load_settings().model_copy(update={"adapter": str(found.path)})
    cache = REPO_ROOT / ".cache" / "finetune"
    records_path = cache / "calibration" / f"{found.label.replace('@', '-')}.json"
    recorded_with = {"adapter": found.label, "questions": [limit, out_of_corpus], "modes": ["retrieval", "gold"],
                     "top_k": settings.top_k,
                     "embedding_model": settings.embedding_model, "reranker": settings.rerank_model,
                     "max_new_tokens": settings.max_new_tokens, "source": source}
    if reuse:
        saved = json.loads(records_path.read_text()) if records_path.is_file() else {}
        if saved.get("recorded_with") != recorded_with:
            fail(f"--reuse: {records_path} holds no run with these questions and settings "
                 f"({saved.get('recorded_with')} != {recorded_with}); run without --reuse")
        records, reranker_name = saved["records"], saved.get("reranker_name")
    else:
        records, reranker_name = _calibration_run(settings, metadata, corpus, held_titles, inside, outside)
        records_path.parent.mkdir(parents=True, exist_ok=True)  # for --reuse and bench/grounding_signals.py
        records_path.write_text(json.dumps({"recorded_with": recorded_with, "reranker_name": reranker_name,
                                            "records": records}) + "\n")
    chosen = cal.search(records, items, max_abstain_answerable)
    curves = cal.sweeps(records, items, chosen["thresholds"], chosen["abstain_margin"])
    plot = found.path / "grounding_calibration.png"
    cal.plot_calibration(curves, chosen, f"{found.label}: grounding on {len(records)} held-out questions "
                         f"(retrieval, top {settings.top_k})", plot)
    summary = chosen["summary"]
    metadata["abstain_margin"] = chosen["abstain_margin"]
    metadata.pop("abstain_calibration", None)  # the margin-only calibration of earlier versions
    metadata["grounding"] = {
        "thresholds": chosen["thresholds"].as_dict(), "abstain_margin": chosen["abstain_margin"],
        "embedding_model": settings.embedding_model, "top_k": settings.top_k,
        "reranker": reranker_name,
        "data": source, "questions": {"in_corpus": len(inside), "out_of_corpus": len(outside)},
        "max_abstain_answerable": max_abstain_answerable, "summary": summary,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "plot": plot.name}
    write_metadata(found.path, metadata)
    typer.echo(f"{found.label}: abstain_margin {chosen['abstain_margin']}, thresholds "
               f"{chosen['thresholds'].as_dict()}")
    for mode, part in summary.get("by_mode", {"retrieval": summary}).items():
        typer.echo(f"  {mode}: F1 {part['f1']}; abstains on {part['abstain_answerable']}% of answerable, "
                   f"{part['abstain_unanswerable']}% of unanswerable and {part['abstain_out_of_corpus']}% of "
                   f"out-of-corpus questions; citation precision {part['citation_precision']}%")
    typer.echo(f"  pooled SQuAD 2.0 F1 {summary['f1_pooled']}; curves: {plot}")


def _calibration_run(settings, metadata: dict, corpus: list, held_titles: set, inside: list, outside: list) -> tuple:
    """(records, reranker name) of one retrieval-mode run with the gate open and abstention off: ``inside``
    questions against an index of the whole training corpus, ``outside`` ones against it less their articles."""
    from app.container import build_generator, build_reranker
    from app.settings import REPO_ROOT
    from generation.finetune import calibrate as cal
    from generation.finetune import evaluate as ev
    from app.evaluation.indexes import squad_corpus_index
    from generation.finetune.data import file_digest

    try:
        generator = build_generator(settings, strict=True)
        scorer = build_reranker(settings)
    except (LookupError, ValueError) as exc:
        fail(str(exc))
    files = [REPO_ROOT / f for f in metadata["config"]["train_files"]]
    run = dict(max_new_tokens=settings.max_new_tokens, timeout_s=settings.generation_timeout_s,
               abstain_margin=cal.NEVER_ABSTAIN, thresholds=cal.OPEN, unsupported="flag", scorer=scorer)
    records: list = []
    for questions, articles, in_corpus, desc in (
            (inside, corpus, True, "calibrate: in corpus"),
            (outside, [a for a in corpus if a.title not in held_titles], False, "calibrate: out of corpus")):
        if not questions:
            continue
        index = squad_corpus_index(articles, settings, file_digest(files), REPO_ROOT / ".cache" / "finetune")
        try:
            contexts = ev.retrieval_contexts(index.corpus().retrieve, settings.top_k)
            _, part = ev.evaluate_items(generator, questions, contexts, desc=desc,
                                        in_corpus=lambda item, flag=in_corpus: flag,
                                        term_weights=index.services.bm25.idf, **run)
            if in_corpus:  # the same questions with their own paragraph: the gate must let paraphrases through
                gold_contexts = ev.scored_gold_contexts(index.services.embedder)
                _, gold = ev.evaluate_items(generator, questions, gold_contexts, desc="calibrate: gold paragraph",
                                            term_weights=index.services.bm25.idf, **run)
                part += [{**record, "mode": "gold"} for record in gold]
        finally:
            index.close()
        records += part
    return records, getattr(scorer, "name", None)
