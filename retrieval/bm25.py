"""Lexical retrieval: a bm25s index (English stemming + stop words) over one generation's chunks.

The index is static (bm25s builds sparse score matrices once); it is rebuilt from the ledger after
each ingest job and written to a fresh folder that replaces the old one atomically
(``<root>/CURRENT`` names the live build), so a reader always loads a complete index.

Beside the bm25s files, each build stores the chunk ids and the filterable columns
(document_id, source, section) as NumPy arrays aligned with bm25s' document order, so filters
become a weight mask applied inside bm25s' scoring.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import bm25s
import numpy as np
import Stemmer

FILTER_FIELDS = ("document_id", "source", "section")
Filters = Mapping[str, Sequence[str]]


def _stemmer(language: str) -> Stemmer.Stemmer:
    return Stemmer.Stemmer(language)


def _stopwords(language: str) -> str:
    return "en" if language == "english" else language


class BM25Index:
    """An immutable BM25 index: ``search`` returns (chunk_id, score) best-first."""

    def __init__(self, retriever: bm25s.BM25, ids: np.ndarray, columns: dict[str, np.ndarray],
                 tokenizer: bm25s.tokenization.Tokenizer, path: Path | None = None) -> None:
        self.retriever = retriever
        self.ids = ids
        self.columns = columns
        self.tokenizer = tokenizer
        self.path = path

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(cls, ids: Sequence[str], texts: Sequence[str], columns: Mapping[str, Sequence[str]],
              *, language: str = "english", show_progress: bool = False) -> "BM25Index":
        tokenizer = bm25s.tokenization.Tokenizer(stemmer=_stemmer(language), stopwords=_stopwords(language))
        retriever = bm25s.BM25()
        if texts:
            tokens = tokenizer.tokenize(list(texts), return_as="tuple", show_progress=show_progress)
            retriever.index(tokens, show_progress=show_progress)
        cols = {name: np.asarray(list(columns.get(name, [""] * len(ids))), dtype=str) for name in FILTER_FIELDS}
        return cls(retriever, np.asarray(list(ids), dtype=str), cols, tokenizer)

    def save(self, root: Path) -> Path:
        """Write a complete build beside the current one, then point CURRENT at it (atomic)."""
        root.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=f"build-{int(time.time() * 1000)}-", dir=root))
        try:
            if len(self.ids):
                self.retriever.save(str(build))
            self.tokenizer.save_vocab(str(build))
            self.tokenizer.save_stopwords(str(build))
            np.save(build / "ids.npy", self.ids)
            for name, column in self.columns.items():
                np.save(build / f"col_{name}.npy", column)
            (build / "done").write_text(json.dumps({"n": len(self.ids)}))
            pointer_tmp = root / "CURRENT.tmp"
            pointer_tmp.write_text(build.name)
        except BaseException:  # a failed build (a full disk) gives its space back at once
            shutil.rmtree(build, ignore_errors=True)
            raise
        os.replace(pointer_tmp, root / "CURRENT")  # the switch: one rename
        _remove_stale_builds(root, keep=build.name)
        self.path = build
        return build

    @classmethod
    def load(cls, root: Path, *, language: str = "english", mmap: bool = True) -> "BM25Index | None":
        """The current build under `root`, or None when none was ever saved."""
        pointer = root / "CURRENT"
        if not pointer.exists():
            return None
        build = root / pointer.read_text().strip()
        ids = np.load(build / "ids.npy")
        tokenizer = bm25s.tokenization.Tokenizer(stemmer=_stemmer(language), stopwords=_stopwords(language))
        tokenizer.load_vocab(str(build))
        tokenizer.load_stopwords(str(build))
        retriever = bm25s.BM25.load(str(build), mmap=mmap) if len(ids) else bm25s.BM25()
        columns = {name: np.load(build / f"col_{name}.npy") for name in FILTER_FIELDS}
        return cls(retriever, ids, columns, tokenizer, build)

    def mask(self, filters: Filters | None) -> np.ndarray | None:
        """1.0 where a chunk passes every filter (values of one field are OR-ed), else 0.0."""
        if not filters:
            return None
        keep = np.ones(len(self.ids), dtype=bool)
        for field, values in filters.items():
            keep &= np.isin(self.columns[field], np.asarray(list(values), dtype=str))
        return keep.astype(np.float32)

    def search(self, query: str, k: int, filters: Filters | None = None) -> list[tuple[str, float]]:
        if not len(self.ids) or k <= 0:
            return []
        token_ids = self.tokenizer.tokenize([query], update_vocab="never", return_as="ids", show_progress=False)[0]
        token_ids = [t for t in set(token_ids) if t < self._n_tokens]
        if not token_ids:
            return []
        scores = self.retriever.get_scores_from_ids(token_ids, weight_mask=self.mask(filters))
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        # Positive scores only: zero means no query term matched (or the chunk was filtered out).
        return [(str(self.ids[i]), float(scores[i])) for i in top if scores[i] > 0]

    def idf(self, stems: Sequence[str]) -> list[float]:
        """BM25 (Lucene) idf of each already-stemmed term over this index's chunks; a term no chunk holds
        gets the largest idf, ``log(1 + (N + 0.5) / 0.5)``."""
        n_docs = len(self.ids)
        indptr = self.retriever.scores["indptr"] if n_docs else np.zeros(1, dtype=np.int64)
        lookup = self.tokenizer.stem_to_sid if self.tokenizer.stemmer is not None else self.tokenizer.word_to_id
        weights = []
        for stem in stems:
            sid = lookup.get(stem)
            df = int(indptr[sid + 1] - indptr[sid]) if sid is not None and sid < len(indptr) - 1 else 0
            weights.append(float(np.log(1.0 + (n_docs - df + 0.5) / (df + 0.5))))
        return weights

    @property
    def _n_tokens(self) -> int:
        return len(self.retriever.scores["indptr"]) - 1


def _remove_stale_builds(root: Path, keep: str) -> None:
    """Drop all builds but the current one and the one it replaced (a reader may still be opening it)."""
    builds = sorted((e for e in root.iterdir() if e.is_dir() and e.name != keep), key=lambda e: e.name)
    for entry in builds[:-1]:
        shutil.rmtree(entry, ignore_errors=True)
