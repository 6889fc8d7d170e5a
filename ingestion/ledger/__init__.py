"""The ledger: SQLite source of truth for documents, chunks, index generations, jobs and idempotency keys.

Every index (Chroma collection, BM25 index) is derived from the ledger and can be rebuilt from it.
Invariants:
- a document row holds its raw text and metadata, content hash, version and state (live/deleted);
- the chunks of generation G are exactly the rows of ``chunks`` with ``generation = G``; the Chroma
  collection and BM25 index of G are reconciled to that set (see ``ingestion.indexer``);
- exactly one generation is live: the ``live_generation`` row of ``meta``, switched in one transaction;
- ``generation_documents`` says which version of each document a generation holds, for the generations
  the live path does not maintain: one being built, and the previous one (snapshotted at the switch).
  A refresh or rollback catches such a generation up exactly: live documents whose version differs
  are re-chunked, documents no longer live are removed;
- a job's payload is stored with its idempotency claims in one transaction; its progress and counts
  are written in the same transaction as the ledger changes they describe.

One process writes a data directory (``writer_lock``); SQLite runs in WAL mode so readers never block.
"""

from ingestion.ledger.documents import DocumentRow, DocumentsMixin
from ingestion.ledger.generations import GenerationRow, GenerationsMixin
from ingestion.ledger.jobs import JOB_STATUS_COLUMNS, IdempotencyClaim, JobRow, JobsMixin
from ingestion.ledger.store import SCHEMA, DataDirLocked, Store, writer_lock


class Ledger(GenerationsMixin, JobsMixin, DocumentsMixin, Store):
    """The ledger's whole API; each role lives in its own module, its SQL behind it."""


__all__ = ["SCHEMA", "DataDirLocked", "DocumentRow", "GenerationRow", "IdempotencyClaim", "JOB_STATUS_COLUMNS",
           "JobRow", "Ledger", "Store", "writer_lock"]
