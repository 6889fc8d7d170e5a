"""A real service over the demo corpus: real MiniLM, real Chroma, real BM25, the bundled SmolLM2.

Also helpers for the ingestion tests: a synthetic corpus whose every document carries a unique marker
word (so a query for the marker must find exactly that document), signed webhook requests, job waits.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

import pytest

from app.cli.common import DEMO_CORPUS
from app.container import build_services
from app.settings import Settings
from app.signature import sign
from ingestion.documents import Document
from ingestion.loaders import load_documents
from tests.net import free_port

REPO = Path(__file__).resolve().parents[2]
MODEL_CACHE = REPO / ".cache" / "models"  # converted bundled models, reused across test runs
SECRET = "s" * 32
WORDS = ("amber basalt cedar delta ember fjord glacier harbor iris juniper kestrel lagoon meadow nectar orchid "
         "prairie quartz raven sierra tundra umber valley willow yarrow zephyr").split()


class ChromaServer:
    """A real Chroma server (`chroma run`, shipped with the chromadb package) on a loopback port, its data
    under `path`. `restart()` stops it and starts it again on the same path and port."""

    def __init__(self, path: Path, port: int | None = None, log: Path | None = None) -> None:
        self.path, self.port = path, port or free_port()
        self.log = log or path.with_name(path.name + ".log")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60) -> "ChromaServer":
        chroma = Path(sys.executable).with_name("chroma")
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(chroma), "run", "--path", str(self.path), "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "ANONYMIZED_TELEMETRY": "False"})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chroma run exited ({self.process.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                httpx.get(f"{self.url}/api/v2/heartbeat", timeout=1).raise_for_status()
                return self
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"chroma run did not answer in {timeout_s} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)  # if paused
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> "ChromaServer":
        self.stop()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted (by the kernel), nothing is answered."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory):
    """A Chroma server for one test module, on a free loopback port with a fresh data folder."""
    server = ChromaServer(tmp_path_factory.mktemp("chroma-server") / "data").start()
    yield server
    server.stop()


def make_settings(data_dir: Path, **overrides) -> Settings:
    return Settings(_env_file=None, data_dir=data_dir, model_cache_dir=MODEL_CACHE, **overrides)


@pytest.fixture(scope="session")
def demo_services(tmp_path_factory, embedder):
    settings = make_settings(tmp_path_factory.mktemp("demo-data"), max_new_tokens=48)
    services = build_services(settings, load_generator=True, embedder=embedder)
    services.indexer().apply(load_documents([DEMO_CORPUS]))
    yield services
    services.ledger.close()


def marker(prefix: str, i: int, version: int) -> str:
    return f"{prefix}{i:03d}v{version}"


def synthetic_documents(n: int, *, prefix: str = "doc", version: int = 0, start: int = 0) -> list[Document]:
    """Short documents (one chunk each), each with the unique word ``marker(prefix, i, version)``."""
    documents = []
    for i in range(start, start + n):
        a, b, c = WORDS[i % 25], WORDS[(i * 7 + 3) % 25], WORDS[(i * 11 + 5) % 25]
        word = marker(prefix, i, version)
        text = (f"The {a} survey {word} measured the {b} near the {c} station. "
                f"Field notes for {word} record that the {b} readings rose after the {a} storm. "
                f"Revision {version} of this note lists {3 + i % 5} sampling sites.")
        documents.append(Document(f"{prefix}-{i:03d}", text, title=f"{a.title()} survey {i}",
                                  source="synthetic", created_at="2024-01-01T00:00:00+00:00"))
    return documents


def webhook_body(documents=(), deletes=()) -> bytes:
    return json.dumps({"documents": [{"document_id": d.document_id, "text": d.text, "title": d.title}
                                     for d in documents], "deletes": list(deletes)}).encode()


def signed_headers(body: bytes, secret: str = SECRET, timestamp: int | None = None, **extra) -> dict:
    return {"content-type": "application/json", "x-signature": sign(body, secret, timestamp), **extra}


def wait_for_job(client, job_id: str, timeout_s: float = 300, headers: dict | None = None) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = client.get(f"/jobs/{job_id}", headers=headers)
        assert response.status_code == 200, response.text
        job = response.json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s} s: {job}")


def retrieved(services, question: str, k: int = 5) -> list:
    """The live generation's top-k chunks as the service would cite them (generation.rag.retrieve_context)."""
    from generation.rag import retrieve_context

    live = services.live
    return retrieve_context(live.retriever, services.ledger, live.generation.generation, question, k)


def found_documents(services, question: str, k: int = 5) -> list[str]:
    return [c.document_id for c in retrieved(services, question, k)]


def found_texts(services, question: str, k: int = 5) -> list[str]:
    return [c.text for c in retrieved(services, question, k)]
