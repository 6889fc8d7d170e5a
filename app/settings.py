"""The service's one typed settings object.

Every knob comes from an environment variable prefixed ``RAG_`` (or a ``.env`` file), is validated
when the process starts, and is passed down explicitly: domain packages receive plain values or this
object, never read the environment themselves. Switching between the embedded default and the
production profile (``configs/production.env``) is a matter of settings alone.

List-valued settings (``RAG_API_KEYS``, ``RAG_WEBHOOK_SECRET``) are comma-separated strings.
Fusion settings not given explicitly come from the tuning file (``RAG_RETRIEVAL_TUNING``) when it exists.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (BeforeValidator, Field, PrivateAttr, TypeAdapter, ValidationError, field_validator,
                      model_validator)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

BUNDLED_EMBEDDING_MODEL = "bundled:all-MiniLM-L6-v2"
BUNDLED_GENERATOR_MODEL = "bundled:SmolLM2-135M-Instruct"
PLACEHOLDER_SECRETS = {"changeme", "change-me", "secret", "placeholder", "xxx"}
# What the service ships (the trained adapter registry, the fusion tuning, the demo corpus): app/shipped/ links
# to the repository's adapters/, configs/ and demo/ in a checkout, and holds copies of them as package data in
# an installed package (pyproject.toml), so the defaults below hold wherever `rag` runs from.
SHIPPED = Path(__file__).resolve().parent / "shipped"
DEFAULT_RETRIEVAL_TUNING = (SHIPPED / "configs" / "retrieval_tuning.json").resolve()
REPO_ADAPTERS = (SHIPPED / "adapters").resolve()  # ships the trained adapter
# Development commands only (evaluation, training, benchmarks): the checkout, for its .cache/, docs/, rerankers/.
REPO_ROOT = Path(__file__).resolve().parent.parent
REPO_RERANKERS = REPO_ROOT / "rerankers"  # trained rerankers (rag train reranker; ~90 MB each, none ships)
REPO_EMBEDDERS = REPO_ROOT / "embedders"  # fine-tuned embedders (`rag train embedder`; git-ignored: ~90 MB each)
TUNED_FIELDS = ("fusion", "fusion_alpha", "rrf_k", "candidates")  # what a tuning file may set

CommaList = Annotated[list[str], NoDecode]


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RAG_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # --- storage -----------------------------------------------------------------------------
    data_dir: Path = Field(Path("data"), description="Ledger, indexes, model cache and adapters live here.")
    model_cache_dir: Path | None = Field(
        None, description="Where converted bundled models and exported embedders are cached "
                    "(default: <data_dir>/models)."
    )
    chroma_host: str | None = Field(None, description="Chroma server host; unset means embedded Chroma.")
    chroma_port: int = Field(8000, ge=1, le=65535)
    chroma_ssl: bool = False
    chroma_timeout_s: float = Field(60.0, gt=0, le=3600, description="Seconds one Chroma server request may take; "
                                    "past it the query is a 503 and the job fails (no hang).")
    collection_prefix: str = Field("chunks", min_length=1, max_length=400, pattern=r"^[A-Za-z0-9_-]+$")

    # --- embedding + chunking ------------------------------------------------------------------
    embedding_model: str = Field(BUNDLED_EMBEDDING_MODEL, description=(
        "bundled:all-MiniLM-L6-v2, a Hugging Face id or folder, or embedder:<name>[@<version>] in "
        "RAG_EMBEDDERS_DIR. Changing it takes a full refresh (`rag refresh`): the live generation keeps "
        "serving with the model that built it until the new generation is switched in."))
    embedders_dir: Path = Field(REPO_EMBEDDERS, description="Embedder registry (default: the repo's embedders/).")
    embedding_query_prefix: str = Field("", description='e5 models use "query: ".')
    embedding_passage_prefix: str = Field("", description='e5 models use "passage: ".')
    embedding_batch_size: int = Field(32, ge=1, le=4096)
    embedding_backend: Literal["auto", "torch", "onnx", "onnx-int8", "openvino"] = Field(
        "auto", description="Where the embedder runs: 'auto' ('openvino' when RAG_DEVICE is cpu, else 'torch'), "
        "'torch', 'onnx' (ONNX Runtime, fp32: torch's vectors), 'onnx-int8' (dynamic int8: other vectors, recorded "
        "as '<model>+onnx-int8', so an index built with another backend needs a refresh) or 'openvino' (torch's "
        "vectors, about 3.8x the chunks/s here). The exported model is cached under RAG_MODEL_CACHE_DIR.",
    )
    device: str = Field("cpu", description="torch device for the embedder and generator: cpu, cuda, cuda:0 ...")
    chunk_max_tokens: int = Field(512, ge=16, le=8192)
    chunk_overlap_tokens: int = Field(50, ge=0)
    chunk_breakpoint_percentile: float = Field(
        90.0, ge=0, le=100,
        description="A new chunk starts where neighbouring-sentence distance exceeds this percentile.",
    )
    chunk_breakpoint_vectors: Literal["static", "encoder"] = Field(
        "static", description="Sentence vectors for breakpoints: 'static' (mean input token embeddings, no "
        "forward pass) or 'encoder' (full sentence embeddings, about twice the encoding work).",
    )

    # --- retrieval -----------------------------------------------------------------------------
    top_k: int = Field(3, ge=1, le=50)  # the small embedded generator reads 3 chunks best (README, Adapters)
    candidates: int = Field(50, ge=1, le=1000, description="Candidates each retriever hands to fusion.")
    fusion: Literal["convex", "rrf"] = "convex"
    fusion_alpha: float = Field(0.5, ge=0.0, le=1.0, description="Weight of the dense score in convex fusion.")
    rrf_k: int = Field(60, ge=1)
    bm25_language: str = "english"
    query_cache_size: int = Field(1024, ge=0, description="Query vectors kept for repeated questions (0: off).")
    retrieval_tuning: Path | None = Field(
        DEFAULT_RETRIEVAL_TUNING,
        description="JSON written by `rag eval retrieval --tune`; its fusion values apply where RAG_FUSION, "
        "RAG_FUSION_ALPHA, RAG_RRF_K, RAG_CANDIDATES are not set. Empty or 'none' disables it.",
    )

    # --- generation ----------------------------------------------------------------------------
    generator_model: str = BUNDLED_GENERATOR_MODEL
    generator_backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="Where answers are generated: 'transformers' (in process) or 'vllm' (a vLLM "
                                    "server at RAG_VLLM_URL serving RAG_GENERATOR_MODEL; prompts are still "
                                    "rendered and packed here, with the model's tokenizer).")
    vllm_url: str = Field("http://127.0.0.1:8001", description="vLLM's OpenAI-compatible server (without /v1).")
    vllm_model: str | None = Field(None, description="vLLM's served model name; unset: the first model it lists.")
    vllm_api_key: str | None = Field(None, description="vLLM's --api-key, if it was started with one.")
    vllm_connect_timeout_s: float = Field(2.0, gt=0, description="Connecting to vLLM; refused connections are "
                                                                 "retried RAG_VLLM_RETRIES times, then 503.")
    vllm_read_timeout_s: float = Field(60.0, gt=0, description="Longest silence from vLLM before 504.")
    vllm_retries: int = Field(2, ge=0, le=10)
    vllm_health_timeout_s: float = Field(1.0, gt=0, description="/health's check of vLLM (no retries).")
    load_generator: bool = Field(True, description="False: serve retrieval and ingestion only (/query answers 503).")
    context_window: int = Field(2048, ge=256,
                                description="Tokens the generator may see (RoPE-scaled if beyond native).")
    max_new_tokens: int = Field(64, ge=1, le=4096)
    quantization: Literal["none", "4bit", "8bit"] = "none"
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    adapter: str | None = Field(
        "smollm2-squad", description="Adapter name[@version] in the registry, or a path; empty for none."
    )
    adapters_dir: Path = Field(REPO_ADAPTERS, description="Adapter registry (default: the repo's adapters/).")
    rerank_model: str | None = Field(
        None, description="The reranker (a cross-encoder trained by `rag train reranker`): name[@version] in the "
                          "reranker registry, a folder, or empty / 'none' for none. It reorders the fused top "
                          "RAG_RERANK_TOP_N, keeps top_k, and its score is the gate's answerability signal. Off "
                          "in the embedded profile (BENCHMARKS.md, reranker).")
    rerank_top_n: int = Field(20, ge=1, le=200, description="Fused candidates the reranker reorders (>= top_k).")
    reranker: str | None = Field(None, description="Deprecated alias of RAG_RERANK_MODEL (used when that is unset).")
    rerankers_dir: Path = Field(REPO_RERANKERS, description="Reranker registry (default: the repo's rerankers/).")
    merge_adapter: bool = False
    abstain_margin: float | None = Field(
        None, ge=-10.0, le=10.0,
        description="Logits \"I don't know.\" must win by on the first answer token (below 0: it is started "
                    "when another token wins by less); unset: the adapter's calibrated value (its metadata), "
                    "0 for the base model.")
    margin_slope: float | None = Field(
        None, ge=0.0, le=100.0,
        description="Logits added to the abstention margin per unit of blended gate score above RAG_GATE_MIN "
                    "(the model's \"I don't know.\" counts for more where retrieval is weak); unset: the "
                    "adapter's calibrated value.")
    unsupported: Literal["abstain", "flag"] = Field(
        "abstain", description="An answer its citations do not support: 'abstain' (answer \"I don't know.\", "
                               "abstain_reason unsupported_answer) or 'flag' (returned with grounded=false).")
    relevance_min: float | None = Field(
        None, ge=0.0, le=1.0, description="Share of the question's (idf-weighted) terms a chunk must hold for the "
                                          "generator to run; unset: the adapter's calibrated value.")
    dense_min: float | None = Field(
        None, ge=-1.0, le=2.0, description="Cosine similarity that lets a chunk through without relevance_min "
                                           "(2: never); unset: the adapter's calibrated value.")
    gate_weight: float | None = Field(
        None, ge=0.0, le=1.0, description="Weight of relevance in the blended gate (w * relevance + (1 - w) * "
                                          "cosine >= RAG_GATE_MIN); unset: the adapter's calibrated gate.")
    gate_min: float | None = Field(
        None, ge=-1.0, le=2.0, description="What the blended gate score must reach; unset: the adapter's "
                                           "calibrated value.")
    answerability_min: float | None = Field(
        None, ge=0.0, le=1.0, description="Cross-encoder probability the best chunk must reach before the "
                                          "generator runs; unset: the adapter's calibrated value.")
    evidence_min: float | None = Field(
        None, ge=0.0, le=1.0, description="Share of the question's terms around the answer in its cited chunk; "
                                          "unset: the adapter's calibrated value.")
    support_min: float | None = Field(
        None, ge=0.0, le=1.0, description="Share of the answer's words its cited chunk must hold; unset: the "
                                          "adapter's calibrated value.")
    confidence_min: float | None = Field(
        None, le=0.0, description="Mean token log-probability the answer must reach; unset: the adapter's "
                                  "calibrated value.")
    adapter_cache_size: int = Field(2, ge=1, description="Adapters other than the default kept loaded (LRU).")
    generation_timeout_s: float = Field(120.0, gt=0, description="Wall-clock bound of one generation; an answer "
                                                                  "cut off by it has finish_reason 'timeout'.")
    max_concurrent_generations: int = Field(1, ge=1, description="Queries generating at once (per process).")
    generation_queue_size: int = Field(4, ge=0, description="Queries waiting for a slot; more get 503 + Retry-After.")
    queue_wait_s: float = Field(30.0, gt=0, description="How long a queued query waits for a slot before its 503.")

    # --- HTTP ----------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_keys: CommaList = Field(default_factory=list)
    admin_api_keys: CommaList = Field(default_factory=list)
    keys_file: Path | None = Field(None, description="Keys with names, scopes, groups and rate limits (YAML or "
                                   "JSON, sha256 of each key; app/access.py). Re-read when it changes.")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Body limit for /query (413 beyond it).")
    max_question_chars: int = Field(2000, ge=1)

    # --- rate limits and public routes (issue 13) --------------------------------------------
    rate_limit_requests_per_minute: int = Field(
        60, ge=0, description="/query requests per key in any 60 s (a key's requests_per_minute overrides it; "
                              "0: unlimited). The local operator (no keys configured) is never limited.")
    rate_limit_tokens_per_minute: int = Field(
        20000, ge=0, description="Generated tokens per key per minute, charged after each answer; a key whose "
                                 "budget is spent gets 429 until its window ends (tokens_per_minute overrides "
                                 "it; 0: unlimited).")
    rate_limit_storage: str = Field(
        "memory://", description="Where budgets are counted (a `limits` storage URI): memory:// is one "
                                 "process's own; redis://host:6379 is shared by every process using it "
                                 "(needs `pip install limits[redis]`).")
    public_routes: CommaList = Field(
        default_factory=list, description="What answers without a key when keys are configured: any of health "
                                          "(the full /health body), docs (/docs, /redoc and /openapi.json), "
                                          "openapi (/openapi.json). Unset: only the {\"status\": \"ok\"} liveness "
                                          "answer of /health.")
    client_api_key: str | None = Field(
        None, description="The key `rag` commands present to a running service (rag query, rag refresh); unset: "
                          "the first RAG_ADMIN_API_KEYS key, else the first RAG_API_KEYS key.")

    @field_validator("public_routes", mode="before")
    @classmethod
    def _public_routes_list(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("public_routes")
    @classmethod
    def _known_public_routes(cls, value: list[str]) -> list[str]:
        known = ("health", "docs", "openapi")
        unknown = [name for name in value if name not in known]
        if unknown:
            raise ValueError(f"unknown {', '.join(map(repr, unknown))} (choose from {', '.join(known)})")
        return value

    # --- metrics, tracing and logs (issue 13) -------------------------------------------------
    log_format: Literal["text", "json"] = Field("text", description="Log lines as text or one JSON object each "
                                                "(`rag serve`, the CLI, `python -m app.worker`).")
    log_level: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"],
                         BeforeValidator(lambda v: v.upper() if isinstance(v, str) else v)] = "INFO"
    tracing: Literal["off", "console", "otlp"] = Field(
        "off", description="OpenTelemetry spans: off, console (stdout) or otlp (gRPC to RAG_OTLP_ENDPOINT).")
    otlp_endpoint: str = Field("http://127.0.0.1:4317", description="OTLP gRPC collector, for RAG_TRACING=otlp.")
    tracing_service_name: str = Field("rag-service", min_length=1, description="service.name on every span.")
    tracing_sample_ratio: float = Field(1.0, ge=0.0, le=1.0, description="Share of new traces recorded "
                                        "(an incoming traceparent's decision is kept).")

    # --- audit trail (issue 13) ---------------------------------------------------------------
    audit_log: Path | None = Field(
        None, description="The audit trail, JSON lines (app/audit.py, docs/audit.md); unset: "
                          "<data_dir>/audit/audit.jsonl; empty or 'none' disables it.")
    audit_retention_days: int = Field(90, ge=0, description="Daily audit files kept (the service rotates at UTC "
                                                            "midnight); older ones are deleted. 0 keeps all.")
    audit_questions: Literal["full", "sha256", "omit"] = Field(
        "full", description="Questions in the audit trail: 'full' text, 'sha256' of the text, or 'omit' (length "
                            "only).")

    @field_validator("audit_log", mode="before")
    @classmethod
    def _empty_audit_log(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() in ("", "none") else value

    @property
    def audit_path(self) -> Path | None:
        """Where the audit trail goes; None when RAG_AUDIT_LOG is set empty (disabled)."""
        if "audit_log" not in self.model_fields_set:
            return self.data_dir / "audit" / "audit.jsonl"
        return self.audit_log


    # --- document access control (issue 13) ---------------------------------------------------

    # --- webhook ingestion + refresh -----------------------------------------------------------
    webhook_secret: CommaList = Field(default_factory=list, description="One or more HMAC secrets (rotation).")
    webhook_tolerance_s: int = Field(300, ge=1)
    ingest_max_documents: int = Field(1000, ge=1)
    ingest_max_document_bytes: int = Field(2 * 1024 * 1024, ge=1)
    ingest_max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    idempotency_ttl_s: int = Field(24 * 3600, ge=1)
    ingest_batch_documents: int = Field(64, ge=1, description="Documents per checkpointed step of a job.")
    job_max_attempts: int = Field(5, ge=1, description="A job interrupted this many times is failed.")
    min_free_disk_mb: int = Field(64, ge=0, description="An ingest step is refused (disk full) when a store's "
                                  "disk has less free; 0 disables the check.")
    refresh_cron: str = Field("0 3 * * sun", description="Weekly full refresh, crontab syntax; empty disables.")
    refresh_timezone: str = Field("UTC", description="Time zone of RAG_REFRESH_CRON.")
    refresh_min_chunk_ratio: float = Field(0.8, gt=0)
    refresh_max_chunk_ratio: float = Field(1.25, gt=0)
    refresh_golden_queries: Path | None = None
    refresh_golden_sample: int = Field(20, ge=0, description="Golden queries sampled when no file is set.")
    refresh_golden_top_k: int = Field(10, ge=1, le=100, description="A golden query must hit in this top k.")
    refresh_min_recall: float = Field(0.8, ge=0, le=1)

    _tuned: dict[str, object] = PrivateAttr(default_factory=dict)

    @field_validator("retrieval_tuning", mode="before")
    @classmethod
    def _empty_disables(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() in ("", "none") else value

    @field_validator("refresh_cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        if value.strip():
            from apscheduler.triggers.cron import CronTrigger

            CronTrigger.from_crontab(value.strip(), timezone="UTC")  # raises ValueError naming the field
        return value.strip()

    @field_validator("refresh_timezone")
    @classmethod
    def _valid_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @field_validator("keys_file", mode="before")
    @classmethod
    def _empty_keys_file(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("adapter", mode="before")
    @classmethod
    def _empty_adapter_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() in ("", "none") else value

    @field_validator("rerank_model", "reranker", mode="before")
    @classmethod
    def _empty_reranker_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() in ("", "none") else value

    @model_validator(mode="after")
    def _resolve_embedding_backend(self) -> "Settings":
        """'auto' becomes a concrete backend here, so everything downstream sees one: OpenVINO on the CPU (the
        same vectors as torch, measured 3.7-3.9x faster: BENCHMARKS.md, encoding backends); torch on a GPU,
        which the exported backends do not use."""
        if self.embedding_backend == "auto":
            self.embedding_backend = "openvino" if self.device.split(":")[0] == "cpu" else "torch"
        return self

    @model_validator(mode="after")
    def _deprecated_reranker(self) -> "Settings":
        """RAG_RERANKER (the earlier name) fills RAG_RERANK_MODEL when that is not set."""
        if self.reranker and "rerank_model" not in self.model_fields_set:
            logging.getLogger(__name__).warning("RAG_RERANKER is deprecated: use RAG_RERANK_MODEL")
            self.rerank_model = self.reranker
        return self

    @field_validator("api_keys", "admin_api_keys", "webhook_secret", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("api_keys", "admin_api_keys", "webhook_secret")
    @classmethod
    def _no_placeholder_secrets(cls, value: list[str]) -> list[str]:
        for item in value:
            if item.lower() in PLACEHOLDER_SECRETS or len(item) < 16:
                raise ValueError("placeholder or too short (use at least 16 random characters)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.chunk_overlap_tokens >= self.chunk_max_tokens:
            raise ValueError(
                f"RAG_CHUNK_OVERLAP_TOKENS ({self.chunk_overlap_tokens}) must be smaller than "
                f"RAG_CHUNK_MAX_TOKENS ({self.chunk_max_tokens})"
            )
        if self.max_new_tokens >= self.context_window:
            raise ValueError(
                f"RAG_MAX_NEW_TOKENS ({self.max_new_tokens}) must be smaller than "
                f"RAG_CONTEXT_WINDOW ({self.context_window})"
            )
        if self.refresh_min_chunk_ratio > self.refresh_max_chunk_ratio:
            raise ValueError("RAG_REFRESH_MIN_CHUNK_RATIO must not exceed RAG_REFRESH_MAX_CHUNK_RATIO")
        return self

    @model_validator(mode="after")
    def _apply_retrieval_tuning(self) -> "Settings":
        """Tuned values fill the fusion settings that were not set explicitly (env, .env or arguments)."""
        for name, value in read_retrieval_tuning(self.retrieval_tuning).items():
            if name in self.model_fields_set:
                continue
            field = type(self).model_fields[name]
            kind = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
            try:
                value = TypeAdapter(kind).validate_python(value)
            except ValidationError as exc:
                reason = "; ".join(error["msg"] for error in exc.errors())
                raise ValueError(f"RAG_RETRIEVAL_TUNING {self.retrieval_tuning}: {name}: {reason}") from None
            self.__dict__[name] = value  # bypasses __setattr__, so model_fields_set keeps meaning "explicit"
            self._tuned[name] = value
        return self

    @property
    def tuned_fields(self) -> dict[str, object]:
        """The settings taken from the tuning file (empty when none applied)."""
        return dict(self._tuned)

    @property
    def has_keys(self) -> bool:
        """Whether requests must present a key (else the service is loopback-only, every caller the operator)."""
        return bool(self.api_keys or self.admin_api_keys or self.keys_file)

    # --- derived paths -------------------------------------------------------------------------
    @property
    def models_path(self) -> Path:
        return self.model_cache_dir or self.data_dir / "models"

    @property
    def adapters_path(self) -> Path:
        return self.adapters_dir or self.data_dir / "adapters"

    @property
    def rerankers_path(self) -> Path:
        return self.rerankers_dir

    @property
    def ledger_path(self) -> Path:
        return self.data_dir / "ledger.sqlite3"

    @property
    def chroma_path(self) -> Path:
        return self.data_dir / "chroma"

    @property
    def bm25_path(self) -> Path:
        return self.data_dir / "bm25"


def read_retrieval_tuning(path: Path | None) -> dict[str, object]:
    """The tunable values in a tuning file ({} when there is no file); provenance keys are ignored."""
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"RAG_RETRIEVAL_TUNING {path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"RAG_RETRIEVAL_TUNING {path}: expected a JSON object")
    return {name: data[name] for name in TUNED_FIELDS if name in data}


@lru_cache
def get_settings() -> Settings:
    return Settings()
