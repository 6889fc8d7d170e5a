"""The two records that flow through ingestion: a source document and the chunks cut from it.

A document's ``acl`` (groups that may see it; empty: public, retrieval/acl.py) is copied to each of
its chunks and stored with them in the ledger and both indexes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from retrieval.acl import bm25_acl, chroma_acl, normalize_acl

MetadataValue = str | int | float | bool


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def content_hash(text: str) -> str:
    """sha256 hex of the UTF-8 text: the identity of a piece of content."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Document:
    document_id: str
    text: str
    title: str = ""
    source: str = ""
    # Markdown keeps its headings in `text`; HTML loaders convert headings to Markdown `#` lines,
    # so the chunker finds sections the same way for both.
    metadata: dict[str, MetadataValue] = field(default_factory=dict)
    created_at: str = field(default_factory=utc_now_iso)
    acl: tuple[str, ...] = ()  # groups that may see it, sorted and unique; () is public

    def __post_init__(self) -> None:
        object.__setattr__(self, "acl", normalize_acl(self.acl))  # ValueError naming a bad group

    @property
    def content_hash(self) -> str:
        """Hash of everything that changes the chunks: title, text, metadata and acl. A public document's
        hash leaves the acl out, so ledgers written before ACLs existed still match their documents."""
        meta = "\x1f".join(f"{k}={self.metadata[k]!r}" for k in sorted(self.metadata))
        acl = f"\x1eacl={bm25_acl(self.acl)}" if self.acl else ""
        return content_hash(f"{self.title}\x1e{self.text}\x1e{self.source}\x1e{meta}{acl}")


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    document_id: str
    text: str
    section: str
    chunk_index: int
    chunk_size_tokens: int
    created_at: str
    source: str
    content_hash: str
    acl: tuple[str, ...] = ()  # its document's

    def metadata(self) -> dict[str, Any]:
        """Metadata as stored next to the vector: str/int/float/bool values and the acl list
        (retrieval.acl.chroma_acl)."""
        return {
            "document_id": self.document_id,
            "section": self.section,
            "chunk_index": self.chunk_index,
            "chunk_size_tokens": self.chunk_size_tokens,
            "created_at": self.created_at,
            "source": self.source,
            "content_hash": self.content_hash,
            "acl": chroma_acl(self.acl),
        }


def chunk_id_for(document_id: str, chunk_index: int, text: str) -> str:
    """Deterministic id: the same document, position and content always give the same id."""
    digest = hashlib.sha256(f"{document_id}\x1f{chunk_index}\x1f{text}".encode("utf-8")).hexdigest()
    return digest[:32]
