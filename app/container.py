"""The composition root: builds the heavy objects once from Settings and hands them out.

Used by the FastAPI lifespan and by CLI commands; nothing here is HTTP-specific, and nothing is
built at import time. ``Services.retriever`` is replaced (one reference assignment) whenever the
BM25 index is rebuilt or another generation goes live, so readers always see a complete index.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.gate import GenerationGate
from app.settings import Settings
from ingestion.chunker import SemanticChunker
from ingestion.embedder import Embedder
from ingestion.indexer import Indexer
from ingestion.ledger import GenerationRow, Ledger
from retrieval.bm25 import BM25Index
from retrieval.dense import DenseIndex, chroma_client
from retrieval.hybrid import HybridRetriever, QueryVectorCache

log = logging.getLogger(__name__)


def chunker_config(settings: Settings) -> dict[str, Any]:
    """What a generation's chunks depend on; recorded with the generation."""
    return {
        "embedding_model": settings.embedding_model,
        "passage_prefix": settings.embedding_passage_prefix,
        "chunk_max_tokens": settings.chunk_max_tokens,
        "chunk_overlap_tokens": settings.chunk_overlap_tokens,
        "chunk_breakpoint_percentile": settings.chunk_breakpoint_percentile,
    }


def build_embedder(settings: Settings) -> Embedder:
    return Embedder(settings.embedding_model, device=settings.device, batch_size=settings.embedding_batch_size,
                    query_prefix=settings.embedding_query_prefix, passage_prefix=settings.embedding_passage_prefix)


def build_chunker(settings: Settings, embedder: Embedder) -> SemanticChunker:
    return SemanticChunker(embedder, max_tokens=settings.chunk_max_tokens,
                           overlap_tokens=settings.chunk_overlap_tokens,
                           breakpoint_percentile=settings.chunk_breakpoint_percentile)


def bm25_root(settings: Settings, generation: GenerationRow) -> Path:
    return settings.bm25_path / f"g{generation.generation}"


@dataclass
class Services:
    settings: Settings
    ledger: Ledger
    chroma: Any
    embedder: Embedder
    chunker: SemanticChunker
    generation: GenerationRow
    dense: DenseIndex
    retriever: HybridRetriever
    generator: Any = None  # generation.loading.LoadedGenerator once loaded
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    gate: GenerationGate | None = None
    query_cache: QueryVectorCache | None = None  # outlives retriever swaps (same embedder)

    def __post_init__(self) -> None:
        if self.query_cache is None and self.settings.query_cache_size:
            self.query_cache = QueryVectorCache(self.settings.query_cache_size)
        if self.gate is None:
            self.gate = GenerationGate(self.settings.max_concurrent_generations, self.settings.generation_queue_size)

    def generator_for(self, adapter: str | None) -> Any:
        """The loaded generator serving `adapter` (None: the default)."""
        if self.generator is None:
            raise RuntimeError("the generator is not loaded in this process")
        if adapter is None or adapter == getattr(self.generator, "adapter_name", None):
            return self.generator
        raise LookupError(f"adapter {adapter!r} is not available; serving {self.generator.adapter_name!r}")

    def refresh_running(self) -> bool:
        return False

    @property
    def bm25(self) -> BM25Index:
        return self.retriever.bm25

    def make_retriever(self, bm25: BM25Index, dense: DenseIndex | None = None) -> HybridRetriever:
        tuning = self.settings
        return HybridRetriever(embedder=self.embedder, dense=dense or self.dense, bm25=bm25, fusion=tuning.fusion,
                               alpha=tuning.fusion_alpha, rrf_k=tuning.rrf_k, candidates=tuning.candidates,
                               query_cache=self.query_cache)

    def use_bm25(self, bm25: BM25Index) -> None:
        self.retriever = self.make_retriever(bm25)

    def indexer(self) -> Indexer:
        return Indexer(ledger=self.ledger, generation=self.generation, dense=self.dense,
                       bm25_root=bm25_root(self.settings, self.generation), chunker=self.chunker,
                       embedder=self.embedder, bm25_language=self.settings.bm25_language,
                       on_bm25_rebuilt=self.use_bm25)

    def provenance(self, generator: Any = None) -> dict[str, Any]:
        generator = generator or self.generator
        return {
            "index_collection": self.generation.collection,
            "index_generation": self.generation.generation,
            "embedding_model": self.settings.embedding_model,
            "generator_model": self.settings.generator_model,
            "adapter": getattr(generator, "adapter_name", None) if generator else None,
        }


def open_live_generation(settings: Settings, ledger: Ledger, client: Any, embedder: Embedder) -> tuple[GenerationRow, DenseIndex]:
    """The live generation and its collection; the first start creates generation 1 and makes it live."""
    generation = ledger.live_generation()
    if generation is None:
        generation = ledger.create_generation(settings.collection_prefix, settings.embedding_model,
                                              embedder.dimension, chunker_config(settings))
        dense = DenseIndex(client, generation.collection, embedding_model=settings.embedding_model,
                           dimension=embedder.dimension, create=True)
        ledger.switch_live(generation.generation)
        generation = ledger.live_generation()
        assert generation is not None
        return generation, dense
    dense = DenseIndex(client, generation.collection, embedding_model=settings.embedding_model,
                       dimension=embedder.dimension)
    return generation, dense


def build_services(settings: Settings, *, load_generator: bool = True, reconcile: bool = False) -> Services:
    ledger = Ledger(settings.ledger_path)
    client = chroma_client(path=settings.chroma_path, host=settings.chroma_host, port=settings.chroma_port,
                           ssl=settings.chroma_ssl)
    embedder = build_embedder(settings)
    generation, dense = open_live_generation(settings, ledger, client, embedder)
    bm25 = BM25Index.load(bm25_root(settings, generation), language=settings.bm25_language)
    services = Services(settings=settings, ledger=ledger, chroma=client, embedder=embedder,
                        chunker=build_chunker(settings, embedder), generation=generation, dense=dense,
                        retriever=None)  # type: ignore[arg-type]
    if bm25 is None:
        bm25 = BM25Index.build([], [], {}, language=settings.bm25_language)
    services.use_bm25(bm25)
    if reconcile:
        services.indexer().reconcile()
    if load_generator:
        services.generator = build_generator(settings)
    return services


def build_generator(settings: Settings) -> Any:
    from generation.bundled import resolve_generator_model
    from generation.loading import load_generator

    model = resolve_generator_model(settings.generator_model, settings.models_path)
    adapter_path = None
    if settings.adapter:
        candidate = Path(settings.adapter)
        adapter_path = str(candidate if candidate.exists() else settings.adapters_path / settings.adapter)
    loaded = load_generator(model, context_window=settings.context_window, quantization=settings.quantization,
                            torch_dtype=settings.torch_dtype, device=settings.device, adapter_path=adapter_path,
                            merge_adapter=settings.merge_adapter)
    loaded.adapter_name = settings.adapter
    return loaded
