"""The composition root: builds the heavy objects once from Settings and hands them out.

Used by the FastAPI lifespan and by CLI commands; nothing here is HTTP-specific, and nothing is
built at import time. ``Services.live`` (the live generation, its collection, its retriever and the
embedder of the model that generation records) is replaced as one reference whenever the BM25 index is
rebuilt or another generation goes live, so a reader that takes ``services.live`` once sees a complete,
consistent index, and embeds its question with that index's model, for its whole request.
``Services.embedder`` is RAG_EMBEDDING_MODEL's: what the next refresh builds with.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.audit import AuditLog
from app.gate import GenerationGate
from app.settings import Settings
from ingestion.chunker import SemanticChunker
from ingestion.embedder import Embedder
from ingestion.indexer import Indexer
from ingestion.ledger import GenerationRow, Ledger
from ingestion.refresh import REFRESH_KINDS, RefreshConfig, RefreshContext, drop_retired_generations
from ingestion.storage_errors import disk_full
from retrieval.bm25 import BM25Index
from retrieval.dense import DenseIndex, chroma_client
from retrieval.hybrid import HybridRetriever, QueryVectorCache

log = logging.getLogger(__name__)


def chunker_config(settings: Settings) -> dict[str, Any]:
    """What a generation's chunks depend on; recorded with the generation (its pinned model, see refresh)."""
    return {
        "embedding_model": settings.embedding_model,
        "passage_prefix": settings.embedding_passage_prefix,
        "chunk_max_tokens": settings.chunk_max_tokens,
        "chunk_overlap_tokens": settings.chunk_overlap_tokens,
        "chunk_breakpoint_percentile": settings.chunk_breakpoint_percentile,
        "chunk_breakpoint_vectors": settings.chunk_breakpoint_vectors,
    }


def build_embedder(settings: Settings, model: str | None = None) -> Embedder:
    """The embedder of ``model``, a recorded embedding model (``pinned_embedding_model``; default
    RAG_EMBEDDING_MODEL on RAG_EMBEDDING_BACKEND). A recorded model that names its backend (int8 vectors) gets
    it; one recorded with torch's vectors gets RAG_EMBEDDING_BACKEND when that gives them, else torch: an
    index is never searched with vectors of another kind. A registry model that is not there is an
    EmbedderNotFound naming the setting and what to do."""
    from ingestion.embedder import OTHER_VECTORS, split_vector_space

    name, backend = split_vector_space(model) if model else (settings.embedding_model, settings.embedding_backend)
    if backend is None:
        backend = "torch" if settings.embedding_backend in OTHER_VECTORS else settings.embedding_backend
    return Embedder(name, device=settings.device, batch_size=settings.embedding_batch_size,
                    query_prefix=settings.embedding_query_prefix, passage_prefix=settings.embedding_passage_prefix,
                    registry_root=settings.embedders_dir, backend=backend, cache_dir=settings.models_path)


def pinned_embedding_model(settings: Settings) -> str:
    """What a generation records as its embedding model: RAG_EMBEDDING_MODEL with a registry model's active
    version made explicit, and ``+<backend>`` where RAG_EMBEDDING_BACKEND's vectors differ from torch's."""
    from ingestion.embedder import pin_embedding_model, vector_space

    return vector_space(pin_embedding_model(settings.embedding_model, settings.embedders_dir),
                        settings.embedding_backend)


def build_chunker(settings: Settings, embedder: Embedder) -> SemanticChunker:
    return SemanticChunker(embedder, max_tokens=settings.chunk_max_tokens,
                           overlap_tokens=settings.chunk_overlap_tokens,
                           breakpoint_percentile=settings.chunk_breakpoint_percentile,
                           breakpoint_vectors=settings.chunk_breakpoint_vectors)


def bm25_root(settings: Settings, generation: GenerationRow) -> Path:
    return settings.bm25_path / f"g{generation.generation}"


def refresh_config(settings: Settings) -> RefreshConfig:
    return RefreshConfig(
        collection_prefix=settings.collection_prefix, embedding_model=pinned_embedding_model(settings),
        chunker_config=chunker_config(settings), bm25_language=settings.bm25_language,
        batch_documents=settings.ingest_batch_documents, min_chunk_ratio=settings.refresh_min_chunk_ratio,
        max_chunk_ratio=settings.refresh_max_chunk_ratio, golden_queries=settings.refresh_golden_queries,
        golden_sample=settings.refresh_golden_sample, golden_top_k=settings.refresh_golden_top_k,
        min_recall=settings.refresh_min_recall,
    )


@dataclass(frozen=True)
class LiveIndex:
    """What a reader uses together: the live generation, its Chroma collection, its retriever, and the
    embedder and chunker of the model the generation records (the retriever embeds questions with it)."""

    generation: GenerationRow
    dense: DenseIndex
    retriever: HybridRetriever
    embedder: Embedder
    chunker: SemanticChunker


@dataclass
class Services:
    settings: Settings
    ledger: Ledger
    chroma: Any
    embedder: Embedder
    chunker: SemanticChunker
    live: LiveIndex | None = None  # None only while building, or when the live generation cannot be opened
    generator: Any = None  # generation.loading.LoadedGenerator once loaded
    reranker: Any = None  # retrieval.cross_encoder.CrossEncoderReranker (RAG_RERANK_MODEL), when configured
    # held by an ingest job for its whole run and by a refresh for its final catch-up and switch
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    switch_pending: threading.Event = field(default_factory=threading.Event)  # set: no new ingest job starts
    wake_workers: Any = lambda: None  # set by whoever runs the job workers (the service)
    gate: GenerationGate | None = None
    query_cache: QueryVectorCache | None = None  # RAG_EMBEDDING_MODEL's; outlives retriever swaps
    embedding_model: str = ""  # RAG_EMBEDDING_MODEL pinned (registry version explicit), set by build_services
    # other recorded models' embedders and query caches (a generation built with another model), by pinned name
    _embedders: dict = field(default_factory=dict)
    _query_caches: dict = field(default_factory=dict)
    _chunkers: dict = field(default_factory=dict)
    _embedder_lock: threading.Lock = field(default_factory=threading.Lock)
    _adapters: OrderedDict = field(default_factory=OrderedDict)  # adapter ref -> LoadedGenerator, LRU order
    _adapter_lock: threading.Lock = field(default_factory=threading.Lock)  # guards the two dicts
    _adapter_loads: dict = field(default_factory=dict)  # adapter ref -> threading.Lock held while it loads
    # set when a write hit a full disk, cleared once Chroma is reopened and the live generation reconciled
    storage_dirty: bool = False
    unrecorded_failures: dict[str, str] = field(default_factory=dict)  # job id -> error the full ledger refused
    audit: AuditLog = field(default_factory=AuditLog.disabled)  # where jobs record their end (app/audit.py)

    def __post_init__(self) -> None:
        if self.query_cache is None and self.settings.query_cache_size:
            self.query_cache = QueryVectorCache(self.settings.query_cache_size)
        if self.gate is None:
            self.gate = GenerationGate(self.settings.max_concurrent_generations, self.settings.generation_queue_size)

    def generator_for(self, adapter: str | None) -> Any:
        """The loaded generator serving `adapter` (None: the default; "none": the base model).

        `adapter` comes from a request: it is a registry name[@version], never a path. Other adapters than
        the default are loaded on first use (metadata checked, see build_generator), once: concurrent first
        users wait for the same load; they are kept in a bounded LRU cache. Blocks while loading, so call
        it off the event loop. Raises AdapterNotFound (naming the adapter, never a path), AdapterMismatch
        for an incompatible adapter, AdapterBroken for one that does not load.
        """
        from generation.adapters import ADAPTER_REF_RE, AdapterNotFound

        if self.generator is None:
            raise RuntimeError("the generator is not loaded in this process")
        default = getattr(self.generator, "adapter_name", None)
        key = "none" if adapter is not None and adapter.lower() == "none" else adapter
        if key is None or key == (default or "none") or (default and key == default.split("@")[0]):
            return self.generator
        if not ADAPTER_REF_RE.match(key):
            raise AdapterNotFound(f"adapter {key!r}: not an adapter name (name or name@version)")
        with self._adapter_lock:
            if key in self._adapters:
                self._adapters.move_to_end(key)
                return self._adapters[key]
            loading = self._adapter_loads.setdefault(key, threading.Lock())
        with loading:
            with self._adapter_lock:
                if key in self._adapters:  # loaded by the user this one waited for
                    return self._adapters[key]
            loaded = self._load_adapter(key)
            with self._adapter_lock:
                self._adapters[key] = loaded
                self._adapter_loads.pop(key, None)
                while len(self._adapters) > self.settings.adapter_cache_size:
                    self._adapters.popitem(last=False)  # least recently used
            return loaded

    def _load_adapter(self, ref: str) -> Any:
        from generation.adapters import AdapterBroken, AdapterMismatch, AdapterNotFound
        from generation.vllm_backend import VllmError

        settings = self.settings.model_copy(update={"adapter": None if ref == "none" else ref})
        try:
            return build_generator(settings, strict=True, registry_only=True)
        except (AdapterNotFound, AdapterMismatch, VllmError):
            raise
        except Exception as exc:  # a broken adapter folder: the client learns its name, the log the details
            log.exception("adapter %r failed to load", ref)
            raise AdapterBroken(f"adapter {ref!r} is in the registry but cannot be loaded "
                                f"({type(exc).__name__}); see the server log") from None

    def refresh_job(self) -> str | None:
        """The id of the queued or running refresh (or rollback) job, if any."""
        jobs = self.ledger.unfinished_jobs(REFRESH_KINDS)
        return jobs[0].job_id if jobs else None

    def refresh_running(self) -> bool:
        return self.refresh_job() is not None

    @property
    def generation(self) -> GenerationRow:
        return self.live.generation

    @property
    def dense(self) -> DenseIndex:
        return self.live.dense

    @property
    def retriever(self) -> HybridRetriever:
        return self.live.retriever

    @property
    def bm25(self) -> BM25Index:
        return self.live.retriever.bm25

    def embedder_for(self, model: str) -> Embedder:
        """The embedder of a recorded (pinned) model: RAG_EMBEDDING_MODEL's, or one loaded once and kept."""
        if model == self.embedding_model or not self.embedding_model:
            return self.embedder
        with self._embedder_lock:
            if model not in self._embedders:
                self._embedders[model] = build_embedder(self.settings, model)
                if self.settings.query_cache_size:
                    self._query_caches[model] = QueryVectorCache(self.settings.query_cache_size)
            return self._embedders[model]  # type: ignore[no-any-return]

    def chunker_for(self, embedder: Embedder) -> SemanticChunker:
        """The chunker built on ``embedder``, built once per model (install runs on every BM25 rebuild)."""
        if embedder is self.embedder:
            return self.chunker
        with self._embedder_lock:
            if embedder.vector_space not in self._chunkers:
                self._chunkers[embedder.vector_space] = build_chunker(self.settings, embedder)
            return self._chunkers[embedder.vector_space]  # type: ignore[no-any-return]

    def make_retriever(self, bm25: BM25Index, dense: DenseIndex | None = None,
                       embedder: Embedder | None = None) -> HybridRetriever:
        """A retriever embedding questions with `embedder` (default: the live generation's)."""
        tuning = self.settings
        embedder = embedder or (self.live.embedder if self.live else self.embedder)
        cache = self.query_cache if embedder is self.embedder else self._query_caches.get(embedder.vector_space)
        return HybridRetriever(embedder=embedder, dense=dense or self.dense, bm25=bm25, fusion=tuning.fusion,
                               alpha=tuning.fusion_alpha, rrf_k=tuning.rrf_k, candidates=tuning.candidates,
                               query_cache=cache)

    def install(self, generation: GenerationRow, dense: DenseIndex, bm25: BM25Index) -> None:
        """Make this generation what readers see, with the embedder of the model it records: one assignment."""
        embedder = self.embedder_for(generation.embedding_model)
        self.live = LiveIndex(generation, dense, self.make_retriever(bm25, dense, embedder), embedder,
                              self.chunker_for(embedder))

    def use_bm25(self, bm25: BM25Index, generation: int | None = None) -> None:
        """A rebuilt BM25 index of the live generation (ignored when that generation is no longer live)."""
        live = self.live
        if generation is not None and live.generation.generation != generation:
            return
        self.install(live.generation, live.dense, bm25)

    def indexer(self) -> Indexer:
        live = self.live
        number = live.generation.generation
        return Indexer(ledger=self.ledger, generation=live.generation, dense=live.dense,
                       bm25_root=bm25_root(self.settings, live.generation), chunker=live.chunker,
                       embedder=live.embedder, bm25_language=self.settings.bm25_language,
                       batch_documents=self.settings.ingest_batch_documents,
                       on_bm25_rebuilt=lambda bm25: self.use_bm25(bm25, number),
                       chroma_path=None if self.settings.chroma_host else self.settings.chroma_path,
                       min_free_bytes=self.settings.min_free_disk_mb * 1024 * 1024)

    def recover_from_full_disk(self) -> str:
        """After a write hit a full disk: reopen embedded Chroma, reconcile the live generation with the
        ledger, drop what a failed refresh left. Returns what happened, for the job's or command's error;
        until it succeeds ``storage_dirty`` stays set and nothing writes through the old client.

        An embedded chromadb 1.5.9 client whose write hit a full disk can hang on a later write, holding
        the GIL (the whole process stops), so it is stopped and a fresh one opened.
        """
        self.storage_dirty = True
        try:
            with self.write_lock:
                self._reopen_chroma()
                report = self.indexer().reconcile()
                self.collect_garbage()
        except Exception as exc:
            full = disk_full(exc, "data", self.settings.data_dir)
            log.error("stores not reconciled after a full disk: %s", full or exc)
            return f"ledger, Chroma and BM25 not reconciled yet ({'still full' if full else exc}); " \
                   "the next job or start reconciles them"
        self.storage_dirty = False
        count = self.ledger.count_chunks(self.generation.generation)
        log.info("stores reconciled after a full disk: %s", report)
        return f"ledger, Chroma and BM25 reconciled: {count} chunks each"

    def _reopen_chroma(self) -> None:
        if self.settings.chroma_host:
            return
        from chromadb.api.client import SharedSystemClient

        old = self.chroma._system
        SharedSystemClient.clear_system_cache()  # else the same path gives back the same client
        client = chroma_client(path=self.settings.chroma_path)
        live = self.live
        if live is not None:
            dense = DenseIndex(client, live.generation.collection, embedding_model=live.dense.embedding_model,
                               dimension=live.dense.dimension)
            retriever = self.make_retriever(live.retriever.bm25, dense, live.embedder)
            self.live = LiveIndex(live.generation, dense, retriever, live.embedder, live.chunker)
        self.chroma = client
        try:
            old.stop()  # a reader still holding it gets an error, not a hang
        except Exception:
            log.debug("old Chroma client not stopped", exc_info=True)

    @contextmanager
    def ingest_turn(self) -> Iterator[None]:
        """The write lock for one ingest job; a waiting generation switch goes first (no starvation)."""
        while self.switch_pending.is_set():
            time.sleep(0.05)
        with self.write_lock:
            yield

    @contextmanager
    def switch_turn(self) -> Iterator[None]:
        """The write lock for a generation switch: waits for the running ingest job, not for queued ones."""
        self.switch_pending.set()
        try:
            with self.write_lock:
                yield
        finally:
            self.switch_pending.clear()

    def refresh_context(self, *, should_stop: Any = lambda: False, report: Any = None) -> RefreshContext:
        return RefreshContext(
            ledger=self.ledger, chroma=self.chroma, embedder=self.embedder, chunker=self.chunker,
            bm25_root=lambda generation: bm25_root(self.settings, generation),
            make_retriever=lambda dense, bm25, embedder: self.make_retriever(bm25, dense, embedder),
            embedder_for=self.embedder_for, chunker_for=self.chunker_for, on_switch=self.install,
            switch_lock=self.switch_turn(),
            chroma_path=None if self.settings.chroma_host else self.settings.chroma_path,
            should_stop=should_stop, report=report,
        )

    def collect_garbage(self) -> list[int]:
        """Reclaim what retired generations left (after a crash between a switch and its clean-up)."""
        return drop_retired_generations(self.refresh_context())

    def provenance(self, generator: Any = None, live: LiveIndex | None = None) -> dict[str, Any]:
        generator = generator or self.generator
        live = live or self.live
        return {
            "index_collection": live.generation.collection,
            "index_generation": live.generation.generation,
            "embedding_model": live.generation.embedding_model,
            "generator_model": self.settings.generator_model,
            "adapter": getattr(generator, "adapter_name", None) if generator else None,
            "reranker": getattr(self.reranker, "name", None),
        }


def open_live_generation(settings: Settings, ledger: Ledger, client: Any, embedder: Embedder,
                         model: str) -> tuple[GenerationRow, DenseIndex]:
    """The live generation and its collection, opened with the embedding model it records (its
    collection must record the same: EmbeddingModelMismatch otherwise); the first start creates
    generation 1 with ``model`` (RAG_EMBEDDING_MODEL pinned) and makes it live."""
    generation = ledger.live_generation()
    if generation is None:
        generation = ledger.create_generation(settings.collection_prefix, model, embedder.dimension,
                                              {**chunker_config(settings), "embedding_model": model})
        dense = DenseIndex(client, generation.collection, embedding_model=model,
                           dimension=embedder.dimension, create=True)
        ledger.switch_live(generation.generation)
        generation = ledger.live_generation()
        assert generation is not None
        return generation, dense
    dense = DenseIndex(client, generation.collection, embedding_model=generation.embedding_model,
                       dimension=generation.dimension)
    return generation, dense


def build_services(settings: Settings, *, load_generator: bool = True, reconcile: bool = False,
                   open_live: bool = True, embedder: Embedder | None = None) -> Services:
    """Everything a process needs. `open_live=False` leaves ``live`` unset (an offline refresh after an
    embedding-model change, when the live collection cannot be opened with the new model);
    the generator loads only when both `load_generator` and RAG_LOAD_GENERATOR say so; `embedder`
    reuses one already loaded for the same settings (tests, benchmarks)."""
    ledger = Ledger(settings.ledger_path)
    client = chroma_client(path=settings.chroma_path, host=settings.chroma_host, port=settings.chroma_port,
                           ssl=settings.chroma_ssl, timeout_s=settings.chroma_timeout_s)
    embedder = embedder or build_embedder(settings)
    services = Services(settings=settings, ledger=ledger, chroma=client, embedder=embedder,
                        chunker=build_chunker(settings, embedder), embedding_model=pinned_embedding_model(settings))
    if open_live:
        generation, dense = open_live_generation(settings, ledger, client, embedder, services.embedding_model)
        bm25 = BM25Index.load(bm25_root(settings, generation), language=settings.bm25_language)
        if bm25 is None:
            bm25 = BM25Index.build([], [], {}, language=settings.bm25_language)
        services.install(generation, dense, bm25)
        if reconcile:
            services.indexer().reconcile()
    if load_generator and settings.load_generator:
        services.generator = build_generator(settings)
        services.reranker = build_reranker(settings)
    return services


def build_generator(settings: Settings, *, strict: bool | None = None, registry_only: bool = False) -> Any:
    """The base model with the adapter ``settings.adapter`` (a registry name[@version] or a folder; with
    ``registry_only``, as for a request's adapter, a registry name only and errors naming no path).

    The adapter's metadata must match the serving settings (base model, context window and RoPE scaling,
    its method) and name a known prompt template version, and its method must be servable as configured
    (merging, vLLM), else AdapterMismatch names both values; the generator packs its prompts with the
    adapter's template version (the base model: the current one). When the adapter is the built-in
    default (not set explicitly) and cannot be found or does not match, the error is logged and the base
    model is served instead (``strict=False``); an explicitly configured adapter must load.
    """
    from generation.adapters import AdapterMismatch, AdapterNotFound
    from generation.bundled import resolve_generator_model
    from generation.loading import load_generator
    from generation.prompt import PROMPT_TEMPLATE_VERSION

    if strict is None:
        strict = "adapter" in settings.model_fields_set
    model = resolve_generator_model(settings.generator_model, settings.models_path)
    adapter_path, label, metadata = None, None, {}
    if settings.adapter:
        try:
            adapter_path, label, metadata = resolve_adapter(settings, settings.adapter, model,
                                                            registry_only=registry_only)
        except (AdapterNotFound, AdapterMismatch) as exc:
            if strict:
                raise
            log.error("default adapter not served, using the base model: %s", exc)
    if settings.generator_backend == "vllm":  # the same base model's tokenizer here, its weights in vLLM
        from generation.vllm_backend import connect_vllm

        loaded = connect_vllm(model, url=settings.vllm_url, context_window=settings.context_window,
                              served_model=settings.vllm_model, api_key=settings.vllm_api_key,
                              connect_timeout_s=settings.vllm_connect_timeout_s,
                              read_timeout_s=settings.vllm_read_timeout_s, retries=settings.vllm_retries,
                              health_timeout_s=settings.vllm_health_timeout_s,
                              adapter_path=None if adapter_path is None else str(Path(adapter_path).resolve()),
                              adapter_name=label)
    else:
        loaded = load_generator(model, context_window=settings.context_window, quantization=settings.quantization,
                                torch_dtype=settings.torch_dtype, device=settings.device,
                                adapter_path=adapter_path, merge_adapter=settings.merge_adapter)
    loaded.adapter_name = label
    # the explicit setting, else the adapter's calibrated margin (`rag adapters calibrate`), else 0
    loaded.abstain_margin = (settings.abstain_margin if settings.abstain_margin is not None
                             else float(metadata.get("abstain_margin", 0.0)))
    loaded.grounding = grounding_thresholds(settings, metadata)
    # prompts are packed with the template the adapter was trained with (checked known), else the current one
    loaded.prompt_template_version = metadata.get("prompt_template_version") or PROMPT_TEMPLATE_VERSION
    return loaded


def build_reranker(settings: Settings) -> Any:
    """The reranker ``settings.rerank_model`` (registry name[@version] or folder), or None (the default).

    A configured one must load: LookupError naming the setting otherwise.
    """
    from ingestion.registry import RerankerNotFound, RerankerRegistry
    from retrieval.cross_encoder import METADATA, CrossEncoderReranker, read_metadata

    ref = settings.rerank_model
    if not ref:
        return None
    try:
        if (Path(ref) / METADATA).is_file():  # a folder, as it is
            folder, label = Path(ref), Path(ref).name
        else:
            found = RerankerRegistry(settings.rerankers_path).resolve(ref)
            folder, label = found.path, found.label
        read_metadata(folder)
    except (RerankerNotFound, FileNotFoundError, ValueError) as exc:
        raise LookupError(f"RAG_RERANK_MODEL={ref!r}: not found ({exc}); train one (rag train reranker --config "
                          f"configs/train/minilm-rerank.yaml), name it in {settings.rerankers_path} "
                          "(RAG_RERANKERS_DIR) or a folder, or set RAG_RERANK_MODEL=none") from None
    return CrossEncoderReranker.load(folder, name=label, device=settings.device)


def grounding_thresholds(settings: Settings, metadata: dict[str, Any]) -> Any:
    """The adapter's calibrated grounding thresholds (its metadata), each overridden by an explicit setting."""
    from dataclasses import replace

    from generation.grounding import Thresholds

    calibrated = Thresholds.from_metadata(metadata)
    overrides = {name: getattr(settings, name) for name in ("relevance_min", "dense_min", "gate_weight", "gate_min",
                                                            "answerability_min", "evidence_min", "support_min",
                                                            "confidence_min", "margin_slope")
                 if getattr(settings, name) is not None}
    return replace(calibrated, **overrides)


def resolve_adapter(settings: Settings, ref: str, model_path: str, *,
                    registry_only: bool = False) -> tuple[str, str, dict[str, Any]]:
    """(folder, label, metadata) of an adapter reference, its metadata checked against the serving settings.

    ``registry_only``: ``ref`` is looked up in the registry alone, and errors name the adapter, not paths."""
    from transformers import AutoConfig

    from generation.adapters import (AdapterMismatch, AdapterNotFound, AdapterRegistry, check_compatible, locate,
                                     read_adapter_config, read_metadata)
    from generation.loading import native_context, rope_scaling_for
    from generation.methods import serving_problem
    from generation.prompt import SYSTEM_PROMPTS

    if registry_only:
        registry = AdapterRegistry(settings.adapters_path)
        try:
            found = registry.resolve(ref)
        except AdapterNotFound:
            raise AdapterNotFound(f"adapter {ref!r} is not in the registry "
                                  f"(available: {', '.join(registry.names()) or 'none'})") from None
        folder, label, where = found.path, found.label, found.label
    else:
        if not (Path(ref) / "adapter_config.json").is_file() and not settings.adapters_path.is_dir():
            raise AdapterNotFound(f"adapter {ref!r}: the adapter registry {settings.adapters_path} does not exist "
                                  "(set RAG_ADAPTERS_DIR, or RAG_ADAPTER=none to serve the base model)")
        folder, label = locate(ref, settings.adapters_path)
        where = f"{label} ({folder})"
    metadata = read_metadata(folder)
    native = native_context(AutoConfig.from_pretrained(model_path))
    check_compatible(metadata, where=where, base_model=settings.generator_model,
                     context_window=settings.context_window,
                     rope_scaling=rope_scaling_for(native, settings.context_window),
                     prompt_template_versions=tuple(SYSTEM_PROMPTS), adapter_config=read_adapter_config(folder))
    problem = serving_problem(metadata["method"], where, merge=settings.merge_adapter,
                              quantization=settings.quantization, backend=settings.generator_backend)
    if problem:
        raise AdapterMismatch(problem)
    return str(folder), label, metadata
