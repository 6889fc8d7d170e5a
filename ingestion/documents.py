"""The two records that flow through ingestion: a source document and the chunks cut from it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone

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

    @property
    def content_hash(self) -> str:
        """Hash of everything that changes the chunks: title, text and metadata."""
        meta = "\x1f".join(f"{k}={self.metadata[k]!r}" for k in sorted(self.metadata))
        return content_hash(f"{self.title}\x1e{self.text}\x1e{self.source}\x1e{meta}")


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

    def metadata(self) -> dict[str, MetadataValue]:
        """Flat metadata as stored next to the vector (Chroma accepts str/int/float/bool only)."""
        return {
            "document_id": self.document_id,
            "section": self.section,
            "chunk_index": self.chunk_index,
            "chunk_size_tokens": self.chunk_size_tokens,
            "created_at": self.created_at,
            "source": self.source,
            "content_hash": self.content_hash,
        }


def chunk_id_for(document_id: str, chunk_index: int, text: str) -> str:
    """Deterministic id: the same document, position and content always give the same id."""
    digest = hashlib.sha256(f"{document_id}\x1f{chunk_index}\x1f{text}".encode("utf-8")).hexdigest()
    return digest[:32]
