"""The `rag` command line: setup, ingest, query, serve (more command groups register themselves below)."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError

from app.settings import Settings

cli = typer.Typer(help="Retrieval-augmented answers over your documents.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)

DEMO_CORPUS = Path(__file__).resolve().parent.parent / "demo" / "corpus"


def load_settings(**overrides) -> Settings:
    """Settings from the environment, or a clear exit naming every invalid RAG_ variable."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        for error in exc.errors():
            name = "RAG_" + "_".join(str(p) for p in error["loc"]).upper() if error["loc"] else "settings"
            typer.secho(f"invalid setting {name}: {error['msg']}", err=True, fg="red")
        raise typer.Exit(2) from None


def fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", err=True, fg="red")
    raise typer.Exit(code)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _server_url(settings: Settings) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"http://{host}:{settings.port}"


def running_service(settings: Settings):
    """An httpx client for the service on settings.host:port if one answers /health, else None."""
    import httpx

    headers = {}
    keys = settings.admin_api_keys or settings.api_keys
    if keys:
        headers["Authorization"] = f"Bearer {keys[0]}"
    client = httpx.Client(base_url=_server_url(settings), headers=headers, timeout=600)
    try:
        client.get("/health", timeout=2).raise_for_status()
        return client
    except httpx.HTTPError:
        client.close()
        return None


def ingest_paths(settings: Settings, paths: list[Path]) -> dict:
    """Load every file first (a bad file or line stops everything before a write), then index."""
    from tqdm import tqdm

    from ingestion.progress import chunk_postfix
    from app.container import build_services
    from ingestion.ledger import writer_lock
    from ingestion.loaders import LoaderError, load_documents
    from ingestion.storage_errors import StorageFull, disk_full

    try:
        documents = load_documents(paths)
    except LoaderError as exc:
        fail(str(exc))
    if not documents:
        fail("no documents found in " + ", ".join(map(str, paths)))
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
            fail(f"{exc} ({services.recover_from_full_disk()})")
        finally:
            services.ledger.close()
    return counts.as_dict()


@cli.command()
def ingest(paths: Annotated[list[Path], typer.Argument(help="Files or folders: .txt .md .html .pdf .jsonl")]) -> None:
    """Chunk, embed and index documents into the live index generation."""
    from ingestion.ledger import DataDirLocked

    settings = load_settings()
    for path in paths:
        if not path.exists():
            fail(f"{path}: no such file or folder")
    try:
        counts = ingest_paths(settings, paths)
    except DataDirLocked as exc:
        fail(str(exc))
    typer.echo(json.dumps(counts))


@cli.command()
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


@cli.command()
def query(
    question: Annotated[str, typer.Argument(help="The question to answer.")],
    top_k: Annotated[Optional[int], typer.Option(min=1, max=50)] = None,
    alpha: Annotated[Optional[float], typer.Option(min=0.0, max=1.0)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full JSON response.")] = False,
    local: Annotated[bool, typer.Option(help="Answer in this process even if a service is running.")] = False,
    stream: Annotated[bool, typer.Option(help="Print the answer as it is generated.")] = False,
) -> None:
    """Answer a question with citations (through the running service when there is one)."""
    settings = load_settings()
    body = {"question": question, **({"top_k": top_k} if top_k else {}), **({"alpha": alpha} if alpha is not None else {})}
    client = None if local else running_service(settings)
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
            unsupported=settings.unsupported, scorer=services.reranker, on_text=show,
        )
        from app.schemas import QueryResponse

        result = QueryResponse.from_answer(answer).model_dump()
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


@cli.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="Bind address (default RAG_HOST).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default RAG_PORT).")] = None,
) -> None:
    """Run the HTTP service."""
    import uvicorn

    from app.main import create_app

    settings = load_settings(host=host, port=port)
    if not settings.api_keys and not _is_loopback(settings.host):
        fail(f"refusing to bind {settings.host} without API keys: set RAG_API_KEYS, or bind a loopback address")
    preflight(settings)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


def preflight(settings: Settings) -> None:
    """Fail in one line, before the server starts, when a part it needs is missing or unreachable."""
    from generation.bundled import resolve_generator_model
    from ingestion.embedder import resolve_embedding_model
    from retrieval.dense import chroma_client

    resolve_embedding_model(settings.embedding_model)
    if settings.load_generator:
        resolve_generator_model(settings.generator_model, settings.models_path)
    if settings.chroma_host:
        chroma_client(host=settings.chroma_host, port=settings.chroma_port, ssl=settings.chroma_ssl,
                      timeout_s=settings.chroma_timeout_s)


def _register_command_groups() -> None:
    """Command groups that live in their own modules (each adds a typer sub-app)."""
    import importlib

    for module_name in ("app.cli_refresh", "app.cli_eval", "app.cli_eval_generation", "app.cli_train",
                        "app.cli_adapters"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(cli)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("bm25s", "httpx", "chromadb"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU kernels notice, on every start
    _register_command_groups()
    from ingestion.model_files import ModelUnavailable
    from retrieval.dense import ChromaUnavailable

    try:
        cli()
    except (ChromaUnavailable, ModelUnavailable) as exc:  # a missing part: one line, never a traceback
        typer.secho(f"error: {exc}", err=True, fg="red")
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(main())
