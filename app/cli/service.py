"""`rag setup`, `rag ingest`, `rag query`, `rag serve`: the service's own commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from app.cli.common import DEMO_CORPUS, cli_audit, fail, is_loopback, load_settings, running_service
from app.settings import Settings

def ingest_paths(settings: Settings, paths: list[Path], acl: tuple[str, ...] = ()) -> dict:
    """Load every file first (a bad file or line stops everything before a write), then index."""
    from tqdm import tqdm

    from ingestion.progress import chunk_postfix
    from app.container import build_services
    from ingestion.ledger import writer_lock
    from ingestion.loaders import LoaderError, load_documents
    from ingestion.storage_errors import StorageFull, disk_full

    try:
        documents = load_documents(paths, acl=acl)
    except LoaderError as exc:
        fail(str(exc))
    if not documents:
        fail("no documents found in " + ", ".join(map(str, paths)))
    audit = cli_audit(settings)
    where = {"paths": [str(path) for path in paths], "documents": len(documents)}
    with writer_lock(settings.data_dir):
        try:
            services = build_services(settings, load_generator=False, reconcile=True)
        except Exception as exc:  # opening or reconciling on a full disk
            full = disk_full(exc, "data", settings.data_dir)
            if full is None:
                raise
            fail(str(full))
        try:
            with tqdm(total=len(documents), desc="ingest", unit="doc") as bar:
                def progress(done: int, total: int) -> None:
                    bar.update(min(done, len(documents)) - bar.n)

                indexer = services.indexer()
                indexer.on_embedded = chunk_postfix(bar)  # the bar moves within a batch of documents
                counts = indexer.apply(documents, progress=progress)
        except StorageFull as exc:
            error = f"{exc} ({services.recover_from_full_disk()})"
            audit.record("ingest_failed", **where, error=error)
            fail(error)
        finally:
            services.ledger.close()
    audit.record("ingest_done", **where, counts=counts.as_dict())
    audit.close()
    return counts.as_dict()


def ingest(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders: .txt .md .html .pdf .jsonl")],
    acl: Annotated[Optional[list[str]], typer.Option(
        "--acl", help="A group that may see these documents (repeat for several); a folder's .acl file and a "
                      "JSONL line's acl take precedence. Default: public. See docs/access-control.md.")] = None,
) -> None:
    """Chunk, embed and index documents into the live index generation."""
    from ingestion.ledger import DataDirLocked

    settings = load_settings()
    for path in paths:
        if not path.exists():
            fail(f"{path}: no such file or folder")
    try:
        counts = ingest_paths(settings, paths, tuple(acl or ()))
    except DataDirLocked as exc:
        fail(str(exc))
    typer.echo(json.dumps(counts))


def setup(demo: Annotated[bool, typer.Option(help="Ingest the demo corpus when the index is empty.")] = True) -> None:
    """Prepare the bundled models (one-time conversion into the cache) and ingest the demo corpus."""
    from app.container import build_embedder
    from generation.bundled import resolve_generator_model
    from ingestion.ledger import Ledger

    settings = load_settings()
    typer.echo(f"generator: {resolve_generator_model(settings.generator_model, settings.models_path)}")
    typer.echo(f"embedder: {settings.embedding_model} ({build_embedder(settings).dimension}-d)")
    if demo:
        ledger = Ledger(settings.ledger_path)
        empty = ledger.count_documents() == 0
        ledger.close()
        if empty:
            typer.echo(f"ingesting the demo corpus from {DEMO_CORPUS}")
            typer.echo(json.dumps(ingest_paths(settings, [DEMO_CORPUS])))
        else:
            typer.echo("index already holds documents; demo corpus not re-ingested")


def query(
    question: Annotated[str, typer.Argument(help="The question to answer.")],
    top_k: Annotated[Optional[int], typer.Option(min=1, max=50)] = None,
    alpha: Annotated[Optional[float], typer.Option(min=0.0, max=1.0)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full JSON response.")] = False,
    local: Annotated[bool, typer.Option(help="Answer in this process even if a service is running.")] = False,
    stream: Annotated[bool, typer.Option(help="Print the answer as it is generated.")] = False,
    groups: Annotated[Optional[str], typer.Option(
        help="Answer in this process as a key with these groups would (comma-separated; \"\" for a key "
             "without groups: public documents only). Without it, --local sees every document.")] = None,
) -> None:
    """Answer a question with citations (through the running service when there is one)."""
    settings = load_settings()
    body = {"question": question, **({"top_k": top_k} if top_k else {}),
            **({"alpha": alpha} if alpha is not None else {})}
    caller_groups = None if groups is None else _groups(groups)
    client = None if local or groups is not None else running_service(settings)
    show = (lambda text: typer.echo(text, nl=False)) if stream and not as_json else None
    if client is not None and stream:
        result = _streamed_query(client, body, show)
    elif client is not None:
        response = client.post("/query", json=body)
        if response.status_code != 200:
            fail(f"{response.status_code}: {response.json().get('detail')}")
        result = response.json()
    else:
        from app.container import build_services
        from generation.rag import answer_question

        services = build_services(settings)
        answer = answer_question(
            question, retriever=services.retriever, ledger=services.ledger,
            generation=services.generation.generation, generator=services.generator,
            provenance=services.provenance(), top_k=top_k or settings.top_k,
            max_new_tokens=settings.max_new_tokens, timeout_s=settings.generation_timeout_s, alpha=alpha,
            unsupported=settings.unsupported, reranker=services.reranker, rerank_top_n=settings.rerank_top_n,
            on_text=show, groups=caller_groups,
        )
        from app.audit import query_details
        from app.schemas import QueryResponse

        response = QueryResponse.from_answer(answer)
        audit = cli_audit(settings)
        audit.record("query", **query_details(audit, question, adapter=None, top_k=top_k, filters=None,
                                              response=response, status=200, streamed=stream))
        result = response.model_dump()
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    if show is not None:
        typer.echo()  # after the streamed text; the decision below may withdraw it
    if show is None or result.get("abstained"):
        typer.secho(result["answer"], bold=True)
    if result.get("abstained"):
        typer.echo(f"(abstained: {result['abstain_reason']})")
    elif not result.get("grounded", True):
        typer.secho(f"(not grounded: the cited chunks do not support this answer; score "
                    f"{result['grounding_score']:.2f})", fg="yellow")
    typer.echo("\nSources:" if not result.get("abstained") else "\nLooked at:")
    for c in result["citations"]:
        where = f"{c['document_id']}" + (f" § {c['section']}" if c["section"] else "")
        mark = "*" if c["ref"] in result.get("cited", []) else " "
        typer.echo(f" {mark}[{c['ref']}] {where}  (score {c['score']:.3f}, relevance {c.get('relevance', 0):.2f})")
    typer.echo(f"\n{json.dumps(result['timings_ms'])}")


def _groups(text: str) -> frozenset[str] | None:
    """--groups as a Caller's groups: "*" sees everything (None), as in the keys file."""
    from app.access import SEES_ALL, GROUP_PATTERN
    import re

    groups = frozenset(g.strip() for g in text.split(",") if g.strip())
    bad = sorted(g for g in groups if not re.match(GROUP_PATTERN, g))
    if bad:
        fail(f"--groups: invalid group {bad[0]!r}: use 1-128 letters, digits or _ . : @ * -")
    return None if SEES_ALL in groups else groups


def _streamed_query(client, body: dict, show) -> dict:
    """POST /query as server-sent events: each delta to ``show``, the final answer event returned."""
    from httpx_sse import connect_sse

    with connect_sse(client, "POST", "/query", json={**body, "stream": True}) as source:
        if source.response.status_code != 200:
            source.response.read()
            fail(f"{source.response.status_code}: {source.response.json().get('detail')}")
        for event in source.iter_sse():
            data = json.loads(event.data)
            if event.event == "delta" and show is not None:
                show(data["text"])
            elif event.event == "answer":
                return data
            elif event.event == "error":
                fail(f"{data['status']}: {data['detail']}")
    fail("the service closed the stream before its answer")


def serve(
    host: Annotated[Optional[str], typer.Option(help="Bind address (default RAG_HOST).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default RAG_PORT).")] = None,
) -> None:
    """Run the HTTP service."""
    import uvicorn

    from app.main import create_app

    settings = load_settings(host=host, port=port)
    if not settings.has_keys and not is_loopback(settings.host):
        fail(f"refusing to bind {settings.host} without API keys: set RAG_API_KEYS or RAG_KEYS_FILE, or bind a "
             "loopback address")
    preflight(settings)
    from app.access import KeysFileError
    from app.audit import AuditLogError
    from app.rate_limits import RateLimitStorageError

    try:
        app = create_app(settings)
    except (KeysFileError, AuditLogError, RateLimitStorageError) as exc:
        fail(str(exc))
    # uvicorn's loggers go through the handler load_settings configured; the app writes the access log itself
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False)


def preflight(settings: Settings) -> None:
    """Fail in one line, before the server starts, when a part it needs is missing or unreachable."""
    from generation.bundled import resolve_generator_model
    from ingestion.embedder import resolve_embedding_model
    from ingestion.encoder_backends import check_backend
    from retrieval.dense import chroma_client

    resolve_embedding_model(settings.embedding_model, settings.embedders_dir)
    check_backend(settings.embedding_backend)  # its packages; the export itself runs once, at the first load
    if settings.load_generator:
        resolve_generator_model(settings.generator_model, settings.models_path)
    if settings.chroma_host:
        chroma_client(host=settings.chroma_host, port=settings.chroma_port, ssl=settings.chroma_ssl,
                      timeout_s=settings.chroma_timeout_s)


def register(cli: typer.Typer) -> None:
    for command in (setup, ingest, query, serve):
        cli.command()(command)
