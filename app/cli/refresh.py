"""`rag refresh [--rollback] [--embedding-model REF]`: a full refresh, or a rollback to the previous generation.

A refresh builds the new generation with RAG_EMBEDDING_MODEL, or with --embedding-model (e.g. a model from
`rag train embedder`: embedder:scifact); each generation is served with the model it records, so after the
switch questions embed with the new model and after `--rollback` with the old one again.

When a service answers on RAG_HOST:RAG_PORT the command asks it (admin POST /refresh), so that one
process writes the data directory, and follows the job; otherwise it runs the job in this process under
the data directory's writer lock. Either way it shows progress and exits 1 if the job failed.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Optional

import typer

from app.cli.common import cli_audit, fail, load_settings, running_service
from ingestion.progress import chunks_and_rate


def register(cli: typer.Typer) -> None:
    cli.command("refresh")(refresh)


def refresh(
    rollback: Annotated[bool, typer.Option("--rollback", help="Make the previous generation live again.")] = False,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the job to its end (service only).")] = True,
    embedding_model: Annotated[Optional[str], typer.Option(
        help="Build the new generation with this embedding model (default RAG_EMBEDDING_MODEL): "
             "embedder:<name>[@<version>], bundled:..., or a folder.")] = None,
) -> None:
    """Rebuild the index as a new generation, validate it and switch to it (or roll back)."""
    settings = load_settings()
    kind = "rollback" if rollback else "refresh"
    if embedding_model and rollback:
        fail("--embedding-model is for a refresh; a rollback returns to the previous generation's own model")
    client = running_service(settings)
    if client is not None:
        job = _through_service(client, kind, wait, embedding_model)
    else:
        if embedding_model:
            settings = settings.model_copy(update={"embedding_model": embedding_model})
        job = _in_process(settings, kind)
    if job is None:
        return
    typer.echo(json.dumps({k: job[k] for k in ("job_id", "kind", "status", "progress", "error")}, indent=2))
    if job["status"] == "failed":
        raise typer.Exit(1)


def _through_service(client, kind: str, wait: bool, embedding_model: str | None = None) -> dict | None:
    params = {"embedding_model": embedding_model} if embedding_model else None
    response = client.post("/refresh/rollback" if kind == "rollback" else "/refresh", params=params)
    body = response.json()
    if response.status_code == 409:
        typer.echo(f"a refresh or rollback is already running (job {body['job_id']}); following it")
    elif response.status_code != 202:
        fail(f"{response.status_code}: {body.get('detail')}")
    job_id = body["job_id"]
    typer.echo(f"{kind} job {job_id} (through the running service)")
    if not wait:
        return None
    with _ProgressBar(kind) as bar:
        while True:
            job = client.get(f"/jobs/{job_id}").json()
            bar.show(job["progress"])
            if job["status"] in ("succeeded", "failed"):
                return job
            time.sleep(1.0)


def _in_process(settings, kind: str) -> dict:
    from app.container import build_services
    from app.worker import run_pending, submit_refresh
    from ingestion.ledger import DataDirLocked, writer_lock
    from ingestion.refresh import REFRESH_KINDS
    from retrieval.dense import EmbeddingModelMismatch

    try:
        with writer_lock(settings.data_dir):
            try:
                services = build_services(settings, load_generator=False, reconcile=True)
            except LookupError as exc:  # the embedding model named is not in its registry
                fail(str(exc))
            except EmbeddingModelMismatch as exc:
                if kind == "rollback":
                    fail(str(exc))
                typer.echo(f"note: {exc}\nbuilding the new generation with {settings.embedding_model}")
                services = build_services(settings, load_generator=False, open_live=False)
            services.audit = cli_audit(settings)
            services.collect_garbage()
            with _ProgressBar(kind) as bar:
                outcome, response = submit_refresh(services, kind)
                while outcome == "active":  # an interrupted refresh or rollback finishes first
                    typer.echo(f"resuming unfinished job {response['job_id']} first")
                    run_pending(services, REFRESH_KINDS, report=lambda job, progress: bar.show(progress))
                    outcome, response = submit_refresh(services, kind)
                typer.echo(f"{kind} job {response['job_id']} (in this process)")
                run_pending(services, REFRESH_KINDS, report=lambda job, progress: bar.show(progress))
            job = services.ledger.get_job(response["job_id"])
            services.ledger.close()
            services.audit.close()
    except DataDirLocked as exc:
        fail(str(exc))
    return {"job_id": job.job_id, "kind": job.kind, "status": job.status, "progress": job.progress,
            "error": job.error}


class _ProgressBar:
    """A tqdm bar over a job's documents, its description the job's phase."""

    def __init__(self, kind: str) -> None:
        from tqdm import tqdm

        self.kind = kind
        self.bar = tqdm(total=0, unit="doc", desc=kind)

    def __enter__(self) -> "_ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def show(self, progress: dict) -> None:
        total, done = int(progress.get("total", 0) or 0), int(progress.get("done", 0) or 0)
        if total != self.bar.total:
            self.bar.total = total
        self.bar.n = min(done, total) if total else done
        self.bar.set_description(f"{self.kind}: {progress.get('phase', 'queued')}")
        chunks = int(progress.get("chunks_embedded", 0) or 0)
        if chunks:
            self.bar.set_postfix_str(chunks_and_rate(chunks, self.bar), refresh=False)
        self.bar.refresh()
