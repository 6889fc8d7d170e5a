"""The body of ``POST /ingest``, parsed and validated strictly before anything is stored.

``{"documents": [{"document_id", "text", "title"?, "source"?, "metadata"?, "acl"?}], "deletes": [id, ...]}``.
Every error names the offending document (its index and document_id) and field.

Decisions:
- Malformed JSON (including duplicate keys, NaN/Infinity) is 400; a body that is valid JSON but not a
  valid request is 422; too many documents or deletes, or a document over the per-document limit, 413.
- Text that is not valid UTF-8 (raw bytes, or lone surrogate escapes such as ``"\\ud800"``) is 422 and
  names the document and field; anywhere else in the body it is 400.
- The same document_id twice in ``documents`` is 422 naming both positions: the request is ambiguous,
  and a sender that means "the last one wins" can send just that one.
- A document whose id is also in ``deletes`` is accepted: deletes apply after documents, the delete wins.
- ``title`` defaults to "", ``source`` to "webhook"; metadata values are strings, finite numbers or
  booleans. Newlines are normalized (``\\r\\n`` and ``\\r`` become ``\\n``) as the file loaders do.
- ``acl`` lists the groups that may see the document (app.access.GROUP_PATTERN; ``*`` is refused);
  absent, null or ``[]``: public. Sending a document again with another acl changes who sees it, even
  when its text is the same (docs/access-control.md).
- A document's size is the UTF-8 bytes of its text, title, source, metadata (as JSON) and acl.
- Every document gets ``created_at`` = the time of acceptance.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.json_body import MalformedJSON, loads_strict
from ingestion.documents import Document, utc_now_iso
from retrieval.acl import group_error

MAX_ID_CHARS = 512
DEFAULT_SOURCE = "webhook"


class PayloadError(Exception):
    def __init__(self, status: int, detail: str, errors: list[dict] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors or []


class _Document(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    document_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    text: str = Field(min_length=1)
    title: str | None = None
    source: str | None = None
    metadata: dict[str, Any] | None = None  # values checked by _metadata_errors (clearer messages)
    acl: list[str] | None = None  # groups checked by _acl_errors


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    documents: list[_Document] = Field(default_factory=list)
    deletes: list[str] = Field(default_factory=list)


@dataclass
class IngestRequest:
    documents: list[Document]
    deletes: list[str] = field(default_factory=list)


def parse_ingest_body(body: bytes, *, max_documents: int, max_document_bytes: int) -> IngestRequest:
    """The validated request, or PayloadError(status, detail, errors)."""
    data = _load_json(body)
    if not isinstance(data, dict):
        raise PayloadError(422, f"body: expected a JSON object, got {_json_type(data)}")
    for name in ("documents", "deletes"):
        items = data.get(name)
        if isinstance(items, list) and len(items) > max_documents:
            raise PayloadError(413, f"{name}: {len(items)} items, over the limit of {max_documents} per request "
                                    "(RAG_INGEST_MAX_DOCUMENTS)")
    errors = _encoding_errors(data)
    if errors:
        raise _invalid(422, errors)
    try:
        parsed = _Body.model_validate(data)
    except ValidationError as exc:
        raise _invalid(422, [_describe(e, data) for e in exc.errors()]) from None
    errors = _semantic_errors(parsed)
    if errors:
        raise _invalid(422, errors)
    errors = _size_errors(parsed, max_document_bytes)
    if errors:
        raise _invalid(413, errors)
    created_at = utc_now_iso()
    documents = [
        Document(document_id=d.document_id, text=_normalize_newlines(d.text), title=d.title or "",
                 source=d.source or DEFAULT_SOURCE, metadata=dict(d.metadata or {}), created_at=created_at,
                 acl=tuple(d.acl or ()))
        for d in parsed.documents
    ]
    return IngestRequest(documents=documents, deletes=list(parsed.deletes))


# --- parsing ---------------------------------------------------------------------------------------


def _load_json(body: bytes) -> Any:
    try:
        return loads_strict(body)
    except MalformedJSON as exc:
        raise PayloadError(400, f"malformed JSON body: {exc}") from None


def _normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


# --- errors ------------------------------------------------------------------------------------


def _invalid(status: int, errors: list[dict]) -> PayloadError:
    detail = "; ".join(_line(e) for e in errors[:20]) + (f"; and {len(errors) - 20} more" if len(errors) > 20 else "")
    return PayloadError(status, detail, errors)


def _line(error: dict) -> str:
    where = error["field"]
    if error.get("document") is not None:
        name = f" (document_id {error['document_id']!r})" if error.get("document_id") is not None else ""
        where = f"documents[{error['document']}]{name}: {error['field']}"
    return f"{where}: {error['message']}"


def _error(index: int | None, document_id: Any, field_name: str, message: str) -> dict:
    return {"document": index, "document_id": document_id if isinstance(document_id, str) else None,
            "field": field_name, "message": message}


def _raw_id(data: dict, index: int) -> Any:
    documents = data.get("documents")
    if isinstance(documents, list) and index < len(documents) and isinstance(documents[index], dict):
        return documents[index].get("document_id")
    return None


def _describe(error: dict, data: dict) -> dict:
    loc = error.get("loc", ())
    message = error.get("msg", "invalid")
    if error.get("type") == "missing":
        message = "missing (required)"
    elif error.get("type") == "extra_forbidden":
        message = "unknown field"
    if len(loc) >= 2 and loc[0] == "documents" and isinstance(loc[1], int):
        return _error(loc[1], _raw_id(data, loc[1]), ".".join(map(str, loc[2:])) or "document", message)
    if len(loc) >= 2 and loc[0] == "deletes" and isinstance(loc[1], int):
        return _error(None, None, f"deletes[{loc[1]}]", message)
    return _error(None, None, ".".join(map(str, loc)) or "body", message)


def _has_bad_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _encoding_errors(data: dict) -> list[dict]:
    """Strings that are not valid UTF-8, by document and field."""
    errors: list[dict] = []
    documents = data.get("documents")
    for index, document in enumerate(documents if isinstance(documents, list) else []):
        if not isinstance(document, dict):
            continue
        raw_id = document.get("document_id")
        shown_id = raw_id if isinstance(raw_id, str) and not _has_bad_text(raw_id) else None
        for key, value in document.items():
            if _has_bad_text(key):
                errors.append(_error(index, shown_id, "(a field name)", "not valid UTF-8"))
            if isinstance(value, str) and _has_bad_text(value):
                errors.append(_error(index, shown_id, key, "not valid UTF-8"))
            if isinstance(value, dict):
                for meta_key, meta_value in value.items():
                    if _has_bad_text(meta_key) or (isinstance(meta_value, str) and _has_bad_text(meta_value)):
                        errors.append(_error(index, shown_id, f"{key}.{meta_key!r}", "not valid UTF-8"))
    if not errors and _has_bad_text(json.dumps(data, ensure_ascii=False)):
        errors.append(_error(None, None, "body", "not valid UTF-8"))
    return errors


def _semantic_errors(body: _Body) -> list[dict]:
    errors: list[dict] = []
    if not body.documents and not body.deletes:
        errors.append(_error(None, None, "body", "nothing to do: give documents and/or deletes"))
    first: dict[str, int] = {}
    for index, document in enumerate(body.documents):
        doc_id = document.document_id
        if not doc_id.strip():
            errors.append(_error(index, doc_id, "document_id", "is blank"))
        if not document.text.strip():
            errors.append(_error(index, doc_id, "text", "is empty (only whitespace)"))
        if doc_id in first:
            errors.append(_error(index, doc_id, "document_id", f"duplicate of documents[{first[doc_id]}]"))
        first.setdefault(doc_id, index)
        errors.extend(_error(index, doc_id, f"metadata.{key}", message)
                      for key, message in _metadata_errors(document.metadata or {}))
        errors.extend(_acl_errors(index, doc_id, document.acl or []))
    for index, doc_id in enumerate(body.deletes):
        if not doc_id.strip() or len(doc_id) > MAX_ID_CHARS:
            errors.append(_error(None, None, f"deletes[{index}]",
                                 f"must be a non-blank id of at most {MAX_ID_CHARS} characters"))
    return errors


def _metadata_errors(metadata: dict[str, Any]) -> list[tuple[str, str]]:
    errors = []
    for key, value in metadata.items():
        if not key:
            errors.append((key, "empty key"))
        elif isinstance(value, float) and not math.isfinite(value):
            errors.append((key, f"{value} is not a finite number"))
        elif not isinstance(value, (str, int, float, bool)):
            errors.append((key, f"{_json_type(value)} is not allowed (string, number or boolean only)"))
    return errors


def _acl_errors(index: int, doc_id: str, acl: list[str]) -> list[dict]:
    return [_error(index, doc_id, f"acl[{position}]", message)
            for position, group in enumerate(acl) if (message := group_error(group))]


def _size_errors(body: _Body, limit: int) -> list[dict]:
    errors = []
    for index, document in enumerate(body.documents):
        parts = {"text": document.text, "title": document.title or "", "source": document.source or "",
                 "metadata": json.dumps(document.metadata or {}, ensure_ascii=False),
                 "acl": json.dumps(document.acl or [], ensure_ascii=False)}
        sizes = {name: len(value.encode("utf-8")) for name, value in parts.items()}
        total = sum(sizes.values())
        if total > limit:
            largest = max(sizes, key=sizes.get)
            errors.append(_error(index, document.document_id, largest,
                                 f"document is {total} bytes ({largest}: {sizes[largest]}), over the limit of "
                                 f"{limit} bytes per document (RAG_INGEST_MAX_DOCUMENT_BYTES)"))
    return errors
