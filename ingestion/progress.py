"""Progress bars per chunk: a document batch embeds for minutes on a CPU, so the bar moves per chunk."""

from __future__ import annotations

from typing import Any

from ingestion.indexer import ChunksEmbedded


def chunks_and_rate(chunks: int, bar: Any) -> str:
    """"12345 chunks, 81.2 chunks/s" since the tqdm ``bar`` started."""
    elapsed = bar.format_dict.get("elapsed") or 0
    return f"{chunks} chunks" + (f", {chunks / elapsed:.1f} chunks/s" if elapsed > 0 else "")


def chunk_postfix(bar: Any) -> ChunksEmbedded:
    """An ``Indexer.on_embedded`` that counts chunks on the tqdm ``bar``'s postfix, with their rate."""
    embedded = 0

    def on_embedded(chunks: int) -> None:
        nonlocal embedded
        embedded += chunks
        bar.set_postfix_str(chunks_and_rate(embedded, bar))

    return on_embedded
