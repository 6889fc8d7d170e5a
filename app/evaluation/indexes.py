"""Evaluation indexes: a corpus through the real pipeline (loader, chunker, embedder, Chroma, BM25) into a
folder of its own, reused while its inputs are unchanged.

The folder is keyed by the corpus file's digest and the chunking/embedding settings; a change of the
ingestion code since the build is reported (``--no-cache`` rebuilds). Used by the retrieval and
chunking evaluations, and handed to the fine-tuning stage as a ``CorpusIndex`` (generation/finetune).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from app.container import Services, build_services, chunker_config, pinned_embedding_model
from app.settings import REPO_ROOT, Settings
from generation.finetune.data import Article, CorpusIndex, article_documents
from generation.finetune.reranker import BeirSet
from ingestion.documents import Document
from ingestion.progress import chunk_postfix

log = logging.getLogger(__name__)
DEFAULT_CACHE = REPO_ROOT / ".cache" / "eval"
MARKER = "eval_index.json"
INDEX_FORMAT = 1  # bump when the way evaluation indexes are built changes
# Code whose changes change the index: recorded with the build, a mismatch is reported.
INDEX_CODE = ("ingestion/loaders.py", "ingestion/chunker.py", "ingestion/indexer.py", "retrieval/bm25.py")


@dataclass
class EvalIndex:
    services: Services
    data_dir: Path
    reused: bool
    info: dict[str, Any]

    @property
    def chunk_document(self) -> dict[str, str]:
        bm25 = self.services.bm25
        return dict(zip(bm25.ids.tolist(), bm25.columns["document_id"].tolist()))

    def close(self) -> None:
        self.services.ledger.close()

    def corpus(self) -> CorpusIndex:
        """What the fine-tuning stage uses of it (it never sees Services)."""
        services = self.services
        return CorpusIndex(retriever=services.retriever, ledger=services.ledger,
                           generation=services.generation.generation, embedder=services.embedder,
                           close=self.close)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def index_key(source_digest: str, settings: Settings, chunker: str = "semantic") -> dict[str, Any]:
    """The inputs and settings the built index depends on."""
    # the backend only when not torch: indexes built before backends existed keep their keys
    backend = {} if settings.embedding_backend == "torch" else {"embedding_backend": settings.embedding_backend}
    return {"format": INDEX_FORMAT, "source_sha256": source_digest, "chunker": chunker,
            "bm25_language": settings.bm25_language, **chunker_config(settings),
            "embedding_model": pinned_embedding_model(settings), **backend}  # a registry model's version: a new index


def code_digest() -> str:
    return hashlib.sha256(b"".join((REPO_ROOT / name).read_bytes() for name in INDEX_CODE)).hexdigest()[:16]


def key_hash(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def open_index(settings: Settings, data_dir: Path, key: dict[str, Any], documents: Callable[[], list[Document]],
               *, chunker: Callable[[Services], object] | None = None, owned: bool = False) -> EvalIndex:
    """Reuse the index in `data_dir` if it was built from `key`; else build it there from `documents()`.

    An `owned` folder (a cache entry) without a finished build is an interrupted one and is wiped;
    any other folder must be empty or an evaluation index. Processes opening the same cache entry at once
    take turns: one builds it, the others wait and reuse it.
    """
    if not owned:
        return _open_or_build(settings, data_dir, key, documents, chunker=chunker, owned=False)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(data_dir.parent / f".{data_dir.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that is building or opening %s", data_dir)
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        return _open_or_build(settings, data_dir, key, documents, chunker=chunker, owned=True)


def _open_or_build(settings: Settings, data_dir: Path, key: dict[str, Any], documents: Callable[[], list[Document]],
                   *, chunker: Callable[[Services], object] | None, owned: bool) -> EvalIndex:
    from ingestion.ledger import writer_lock

    marker = data_dir / MARKER
    local = settings.model_copy(update={"data_dir": data_dir, "chroma_host": None})
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("key") == key:
            if info.get("code_sha256") != code_digest():
                log.warning("%s was built by other ingestion code than the current one; rebuild it with "
                            "--no-cache (or delete the folder) if the chunks should change", data_dir)
            return EvalIndex(build_services(local, load_generator=False), data_dir, True, info)
        shutil.rmtree(data_dir)
    elif data_dir.exists() and any(data_dir.iterdir()):
        if owned:
            shutil.rmtree(data_dir)
        else:
            raise ValueError(f"{data_dir} holds data that is not an evaluation index; give an empty or new folder")
    started = time.perf_counter()
    with writer_lock(data_dir):
        services = build_services(local, load_generator=False)
        if chunker is not None:
            services.chunker = chunker(services)  # type: ignore[assignment]
        docs = documents()
        with tqdm(total=len(docs), desc="index", unit="doc") as bar:
            indexer = services.indexer()
            indexer.on_embedded = chunk_postfix(bar)
            indexer.apply(docs, progress=lambda done, total: bar.update(min(done, len(docs)) - bar.n))
    info = {"key": key, "code_sha256": code_digest(), "documents": len(docs), "chunks": len(services.bm25),
            "build_s": round(time.perf_counter() - started, 1), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    marker.write_text(json.dumps(info, indent=2))  # written last: a folder without it is incomplete
    return EvalIndex(services, data_dir, False, info)


def open_corpus_index(corpus: Path, settings: Settings, *, data_dir: Path | None = None,
                      cache_root: Path = DEFAULT_CACHE) -> EvalIndex:
    """The index of a BEIR corpus.jsonl, under `data_dir` or the cache folder keyed by its inputs."""
    from ingestion.loaders import load_documents

    key = index_key(file_digest(corpus), settings)
    folder = data_dir or cache_root / key_hash(key)
    return open_index(settings, folder, key, lambda: load_documents([corpus]), owned=data_dir is None)


def squad_corpus_index(articles: Sequence[Article], settings: Settings, source_digest: str,
                       cache_root: Path) -> EvalIndex:
    """The service's index (same chunker, embedder, BM25, fusion) over whole SQuAD articles, cached by its inputs."""
    titles = hashlib.sha256("\x1f".join(a.title for a in articles).encode()).hexdigest()[:16]
    key = {**index_key(source_digest, settings), "articles": titles}
    documents = article_documents(articles, source="squad")
    return open_index(settings, cache_root / "index" / key_hash(key), key, lambda: documents, owned=True)


def corpus_opener(settings: Settings, cache_root: Path) -> Callable[[Sequence[Article], str], CorpusIndex]:
    """``open(articles, source_digest)`` for the fine-tuning stage: the service's index of those articles."""
    return lambda articles, digest: squad_corpus_index(articles, settings, digest, cache_root).corpus()


def beir_opener(settings: Settings, cache_root: Path = DEFAULT_CACHE) -> Callable[..., BeirSet]:
    """``open(folder, n_queries, n_documents, seed)`` for the reranker: a BEIR folder's train judgments and its
    index (cached), sampled when asked. A sample is ``n_queries`` judged train queries (seeded) over a corpus of
    their judged documents filled with other documents (seeded) to ``n_documents``, written as a corpus file of
    its own under the cache; 0 keeps everything (the full SciFact corpus is ~22k chunks: an hour here)."""
    import random

    from app.evaluation.scoring import load_qrels, load_queries
    from ingestion.loaders import load_documents

    def open_beir(folder: Path, n_queries: int = 0, n_documents: int = 0, seed: int = 0) -> BeirSet:
        corpus, queries_path, qrels_path = (folder / "corpus.jsonl", folder / "queries.jsonl",
                                            folder / "qrels" / "train.tsv")
        missing = [str(p) for p in (corpus, queries_path, qrels_path) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"scifact_dir: not found: {', '.join(missing)}")
        queries, qrels = load_queries(queries_path), load_qrels(qrels_path)
        judged = sorted(q for q in qrels if q in queries)
        if n_queries:
            judged = sorted(random.Random(seed).sample(judged, min(n_queries, len(judged))))
        qrels = {q: qrels[q] for q in judged}
        documents = load_documents([corpus])
        digest = hashlib.sha256("".join(file_digest(p) for p in (corpus, queries_path, qrels_path)).encode()
                                + f"{n_queries}/{n_documents}/{seed}".encode()).hexdigest()
        if n_documents:
            needed = {d for judgments in qrels.values() for d in judgments}
            others = [d.document_id for d in documents if d.document_id not in needed]
            keep = needed | set(random.Random(seed).sample(others, max(0, min(n_documents - len(needed),
                                                                              len(others)))))
            sample = cache_root / "beir-samples" / f"{folder.name}-{digest[:16]}.jsonl"
            if not sample.is_file():
                sample.parent.mkdir(parents=True, exist_ok=True)
                lines = [line for line in corpus.read_text(encoding="utf-8").splitlines()
                         if line.strip() and str(json.loads(line)["_id"]) in keep]
                sample.write_text("\n".join(lines) + "\n", encoding="utf-8")
            corpus, documents = sample, [d for d in documents if d.document_id in keep]
        texts = {d.document_id: f"{d.title}\n{d.text}" if d.title else d.text for d in documents}
        index = open_corpus_index(corpus, settings, cache_root=cache_root).corpus()
        return BeirSet(index=index, queries={q: queries[q] for q in judged}, qrels=qrels, corpus_text=texts,
                       digest=digest)

    return open_beir


def retrieval_key(settings: Settings) -> dict[str, Any]:
    """The retrieval settings training rows depend on (part of their cache key)."""
    return {"fusion": settings.fusion, "alpha": settings.fusion_alpha, "rrf_k": settings.rrf_k,
            "candidates": settings.candidates, "embedding_model": settings.embedding_model,
            "chunk_max_tokens": settings.chunk_max_tokens, "chunk_overlap_tokens": settings.chunk_overlap_tokens}
