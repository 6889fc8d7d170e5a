"""Lexical retrieval: a bm25s index (English stemming + stop words) over one generation's chunks.

The index is static (bm25s builds sparse score matrices once); it is rebuilt from the ledger after
each ingest job and written to a fresh folder that replaces the old one atomically
(``<root>/CURRENT`` names the live build), so a reader always loads a complete index.

Beside the bm25s files, each build stores the chunk ids and the filterable columns
(document_id, source, section) and each chunk's access groups (retrieval/acl.py) as NumPy arrays
aligned with bm25s' document order, so filters and the caller's groups become a weight mask applied
inside bm25s' scoring: the top k are the best k the caller may see.
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

from retrieval.acl import Groups

FILTER_FIELDS = ("document_id", "source", "section")
ACL_COLUMN = "acl"  # retrieval.acl.bm25_acl of each chunk; a build saved before ACLs has none: all public
Filters = Mapping[str, Sequence[str]]


def _stemmer(language: str) -> Stemmer.Stemmer:
    return Stemmer.Stemmer(language)


def _stopwords(language: str) -> str:
    return "en" if language == "english" else language


class BM25Index:
    """An immutable BM25 index: ``search`` returns (chunk_id, score) best-first."""

    def __init__(self, retriever: bm25s.BM25, ids: np.ndarray, columns: dict[str, np.ndarray],
                 tokenizer: bm25s.tokenization.Tokenizer, path: Path | None = None,
                 acl: np.ndarray | None = None) -> None:
        self.retriever = retriever
        self.ids = ids
        self.columns = columns
        self.tokenizer = tokenizer
        self.path = path
        self.acl = acl if acl is not None else np.full(len(ids), "", dtype=str)
        self._acl_codes: tuple[np.ndarray, np.ndarray] | None = None  # (distinct values, each chunk's value)
        self._acl_masks: dict[frozenset[str], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(cls, ids: Sequence[str], texts: Sequence[str], columns: Mapping[str, Sequence[str]],
              *, acl: Sequence[str] | None = None, language: str = "english",
              show_progress: bool = False) -> "BM25Index":
        """`acl`: each chunk's retrieval.acl.bm25_acl value (None: every chunk public)."""
        tokenizer = bm25s.tokenization.Tokenizer(stemmer=_stemmer(language), stopwords=_stopwords(language))
        retriever = bm25s.BM25()
        if texts:
            tokens = tokenizer.tokenize(list(texts), return_as="tuple", show_progress=show_progress)
            retriever.index(tokens, show_progress=show_progress)
        cols = {name: np.asarray(list(columns.get(name, [""] * len(ids))), dtype=str) for name in FILTER_FIELDS}
        acl_column = np.asarray(list(acl) if acl is not None else [""] * len(ids), dtype=str)
        return cls(retriever, np.asarray(list(ids), dtype=str), cols, tokenizer, acl=acl_column)

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
            np.save(build / f"col_{ACL_COLUMN}.npy", self.acl)
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
        acl_file = build / f"col_{ACL_COLUMN}.npy"
        return cls(retriever, ids, columns, tokenizer, build, acl=np.load(acl_file) if acl_file.exists() else None)

    def mask(self, filters: Filters | None, groups: Groups = None) -> np.ndarray | None:
        """1.0 where a chunk passes every filter (values of one field are OR-ed) and `groups` may see it
        (retrieval.acl.visible), else 0.0; None when nothing is filtered."""
        if not filters and groups is None:
            return None
        keep = np.ones(len(self.ids), dtype=bool) if groups is None else self._visible(groups)
        for field, values in (filters or {}).items():
            keep = keep & np.isin(self.columns[field], np.asarray(list(values), dtype=str))
        return keep.astype(np.float32)

    def _visible(self, groups: frozenset[str]) -> np.ndarray:
        mask = self._acl_masks.get(groups)
        if mask is None:
            if self._acl_codes is None:  # once, on the first restricted query: few distinct acls, one gather each
                self._acl_codes = np.unique(self.acl, return_inverse=True)
            values, codes = self._acl_codes
            per_value = np.array([not value or not groups.isdisjoint(value.split(",")) for value in values], dtype=bool)
            mask = per_value[codes] if len(self.ids) else np.zeros(0, dtype=bool)
            if len(self._acl_masks) >= 64:  # a few keys' groups at a time; a dict, as any thread may fill it
                self._acl_masks.clear()
            self._acl_masks[groups] = mask
        return mask

    def search(self, query: str, k: int, filters: Filters | None = None,
               groups: Groups = None) -> list[tuple[str, float]]:
        """The best `k` chunks passing `filters` that `groups` may see (None: every chunk)."""
        if not len(self.ids) or k <= 0:
            return []
        token_ids = self.tokenizer.tokenize([query], update_vocab="never", return_as="ids", show_progress=False)[0]
        token_ids = [t for t in set(token_ids) if t < self._n_tokens]
        if not token_ids:
            return []
        scores = self.retriever.get_scores_from_ids(token_ids, weight_mask=self.mask(filters, groups))
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
