"""Read source files into Documents: Markdown, HTML, PDF, plain text and JSONL.

Every loader hands the chunker Markdown-shaped text: Markdown as is, HTML with its headings turned into
``#`` lines, PDF pages separated by blank lines. Text must be valid UTF-8; newlines become ``\\n``.

Decisions:
- ``document_id`` of a file is its path relative to the folder it was found in (POSIX separators), or
  its file name when the file was named directly; ``source`` is the path as given.
- ``created_at`` of a file (and of a JSONL line without one) is the file's modification time in UTC, so
  loading the same files twice gives equal Documents.
- Folders are walked recursively in sorted order; hidden entries (names starting with ".") are ignored,
  unsupported extensions and files without any text are skipped and reported through ``on_skip``
  (default: a logged warning). An unsupported file named directly is a LoaderError.
- JSONL keys beyond the known ones: str/int/float/bool values go into ``metadata`` (a key that is also
  in ``metadata`` is an error), null values are dropped, lists and objects are an error.
- Access control (docs/access-control.md): a document's ``acl`` is, first found: a JSONL line's ``acl``
  (a list of groups; ``[]`` is public), the nearest ``.acl`` file in the file's folder or any folder
  above it (one group per line, ``#`` comments; an empty file is public), the ``acl`` given to the
  loader (``rag ingest --acl``), else public. A bad group is a LoaderError naming the file and line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path

from ingestion.chunker import ATX_HEADING, FENCE_OPEN, fence_state
from ingestion.documents import Document, MetadataValue
from retrieval.acl import group_error, normalize_acl

logger = logging.getLogger(__name__)

MARKDOWN_SUFFIXES = {".md", ".markdown"}
HTML_SUFFIXES = {".html", ".htm"}
SUPPORTED_SUFFIXES = MARKDOWN_SUFFIXES | HTML_SUFFIXES | {".txt", ".pdf", ".jsonl"}

JSONL_KNOWN_KEYS = {"document_id", "_id", "text", "title", "source", "metadata", "created_at", "acl"}
ACL_FILE = ".acl"

SkipHandler = Callable[[Path, str], None]


class LoaderError(ValueError):
    """A file (or one JSONL line) that cannot become a Document; the message names the place."""


def iter_documents(paths: Sequence[Path], *, on_skip: SkipHandler | None = None,
                   acl: Sequence[str] = ()) -> Iterator[Document]:
    """Documents from files and folders, lazily. Raises LoaderError at the first bad input.
    `acl`: the groups of documents that no ``.acl`` file or JSONL ``acl`` gives groups to."""
    for document, _place in _iter_located(paths, on_skip, _AclDefaults(acl)):
        yield document


def load_documents(paths: Sequence[Path], *, on_skip: SkipHandler | None = None,
                   acl: Sequence[str] = ()) -> list[Document]:
    """Every document, read and validated before returning: a bad file or a duplicate id raises
    LoaderError and nothing is returned, so an ingest either takes all of its input or none.
    `acl` as for iter_documents."""
    documents: list[Document] = []
    seen: dict[str, str] = {}  # document_id -> place it came from
    for document, place in _iter_located(paths, on_skip, _AclDefaults(acl)):
        if document.document_id in seen:
            raise LoaderError(
                f"duplicate document_id {document.document_id!r}: {seen[document.document_id]} and {place}"
            )
        seen[document.document_id] = place
        documents.append(document)
    return documents


def markdown_title(text: str) -> str:
    """Text of the first ATX heading outside fenced code, or ""."""
    fence = ""
    for line in text.split("\n"):
        fence, is_code = fence_state(line, fence)
        if is_code:
            continue
        match = ATX_HEADING.match(line)
        if match and (match.group(2) or "").strip():
            return match.group(2).strip()
    return ""


def html_to_markdown(html: str) -> tuple[str, str]:
    """(title, Markdown-shaped text) of an HTML page: h1-h6 become ``#`` lines, paragraphs, list items
    and table rows become blocks separated by blank lines, <pre> becomes a fenced code block."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    title = " ".join(soup.title.get_text().split()) if soup.title else ""
    for tag in soup.find_all(["script", "style", "nav", "noscript", "template", "head"]):
        tag.decompose()
    converter = _HtmlConverter()
    converter.walk(soup.body or soup)
    converter.flush()
    if not title:
        title = next((b.lstrip("#").strip() for b in converter.blocks if b.startswith("# ")), "")
    return title, "\n\n".join(converter.blocks)


# --- walking the inputs ------------------------------------------------------------------------


class _AclDefaults:
    """The acl of a file's documents from the nearest ``.acl`` file at or above its folder, else the
    loader's default; each folder is looked at once."""

    def __init__(self, default: Sequence[str]) -> None:
        try:
            self.default = normalize_acl(default)
        except ValueError as exc:
            raise LoaderError(f"--acl: {exc}") from None
        self._folders: dict[Path, tuple[str, ...]] = {}

    def for_file(self, path: Path) -> tuple[str, ...]:
        return self._folder(path.resolve().parent)

    def _folder(self, folder: Path) -> tuple[str, ...]:
        if folder not in self._folders:
            file = folder / ACL_FILE
            if file.is_file():
                self._folders[folder] = _read_acl_file(file)
            else:
                self._folders[folder] = self.default if folder.parent == folder else self._folder(folder.parent)
        return self._folders[folder]


def _read_acl_file(path: Path) -> tuple[str, ...]:
    groups = []
    for number, line in enumerate(_normalize_newlines(_read_utf8(path)).split("\n"), start=1):
        group = line.split("#", 1)[0].strip()
        if not group:
            continue
        error = group_error(group)
        if error:
            raise LoaderError(f"{path}:{number}: {error}")
        groups.append(group)
    return normalize_acl(groups)


def _iter_located(paths: Sequence[Path], on_skip: SkipHandler | None,
                  acls: _AclDefaults) -> Iterator[tuple[Document, str]]:
    """(document, place) pairs; place is "file" or "file:line", used in error messages."""
    skip = on_skip or _log_skip
    for given in paths:
        path = Path(given)
        if path.is_dir():
            for file, rel in _walk_folder(path):
                if file.suffix.lower() not in SUPPORTED_SUFFIXES:
                    skip(file, f"unsupported extension {file.suffix or '(none)'!r}")
                    continue
                yield from _load_file(file, rel, skip, acls.for_file(file))
        elif path.is_file():
            if path.suffix.lower() not in SUPPORTED_SUFFIXES:
                raise LoaderError(
                    f"{path}: unsupported extension {path.suffix or '(none)'!r}; "
                    f"supported: {', '.join(sorted(SUPPORTED_SUFFIXES))}"
                )
            yield from _load_file(path, path.name, skip, acls.for_file(path))
        else:
            raise LoaderError(f"{path}: no such file or folder")


def _walk_folder(root: Path) -> list[tuple[Path, str]]:
    """(file, path relative to root in POSIX form), sorted by the relative path; hidden entries left out."""
    found: list[tuple[Path, str]] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            file = Path(folder) / name
            found.append((file, file.relative_to(root).as_posix()))
    found.sort(key=lambda item: item[1])
    return found


def _load_file(path: Path, document_id: str, skip: SkipHandler,
               acl: tuple[str, ...]) -> Iterator[tuple[Document, str]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _load_jsonl(path, acl)
        return
    if suffix == ".pdf":
        title, text, metadata = _read_pdf(path)
    else:
        raw = _normalize_newlines(_read_utf8(path))
        if suffix in HTML_SUFFIXES:
            title, text = html_to_markdown(raw)
            metadata = {"format": "html"}
        elif suffix in MARKDOWN_SUFFIXES:
            title, text, metadata = markdown_title(raw), raw, {"format": "markdown"}
        else:
            title, text, metadata = "", raw, {"format": "text"}
    text = _normalize_newlines(text)
    if not text.strip():
        skip(path, "no text")
        return
    document = Document(
        document_id=document_id,
        text=text,
        title=title or path.stem,
        source=str(path),
        metadata=metadata,
        created_at=_mtime_iso(path),
        acl=acl,
    )
    yield document, str(path)


def _log_skip(path: Path, reason: str) -> None:
    logger.warning("skipped %s: %s", path, reason)


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LoaderError(f"{path}: not valid UTF-8 (byte {exc.start})") from None


def _normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _mtime_iso(path: Path) -> str:
    mtime = datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc)
    return mtime.isoformat(timespec="seconds")


# --- PDF ---------------------------------------------------------------------------------------


def _read_pdf(path: Path) -> tuple[str, str, dict[str, MetadataValue]]:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise LoaderError(f"{path}: encrypted PDF")
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
        info = reader.metadata
        title = str(info.title).strip() if info is not None and info.title else ""
    except LoaderError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as exc:
        raise LoaderError(f"{path}: unreadable PDF ({exc})") from None
    text = "\n\n".join(page for page in pages if page)
    return title, text, {"format": "pdf", "pages": len(pages)}


# --- HTML --------------------------------------------------------------------------------------

_HEADINGS = {f"h{n}": n for n in range(1, 7)}
_BLOCK_TAGS = {
    "address", "article", "aside", "blockquote", "body", "caption", "dd", "details", "dialog", "div",
    "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form", "header", "hr", "html", "li",
    "main", "ol", "p", "section", "summary", "table", "tbody", "tfoot", "thead", "tr", "ul",
}


class _HtmlConverter:
    """Walks a parsed page in document order, collecting Markdown blocks."""

    def __init__(self) -> None:
        self.blocks: list[str] = []
        self.buffer: list[str] = []  # inline text of the block being read; "\n" marks a <br>
        self.prefix = ""  # "- " while the first text of a list item is pending

    def walk(self, node: object) -> None:
        from bs4 import Tag
        from bs4.element import NavigableString, PreformattedString

        for child in node.children:  # type: ignore[attr-defined]
            if isinstance(child, PreformattedString):  # comments, doctype, CDATA
                continue
            if isinstance(child, NavigableString):
                self.buffer.append(re.sub(r"\s+", " ", str(child)))
                continue
            if not isinstance(child, Tag):
                continue
            name = child.name
            if name in _HEADINGS:
                self.flush()
                heading = " ".join(child.get_text(" ").split())
                if heading:
                    self.blocks.append("#" * _HEADINGS[name] + " " + heading)
            elif name == "pre":
                self.flush()
                code = _normalize_newlines(child.get_text()).strip("\n")
                if code.strip():
                    self.blocks.append(f"```\n{code}\n```")
            elif name == "br":
                self.buffer.append("\n")
            elif name in ("td", "th"):
                if "".join(self.buffer).strip():
                    self.buffer.append(" | ")
                self.walk(child)
            elif name == "li":
                self.flush()
                self.prefix = "- "
                self.walk(child)
                self.flush()
            elif name in _BLOCK_TAGS:
                self.flush()
                self.walk(child)
                self.flush()
            else:
                self.walk(child)

    def flush(self) -> None:
        lines = [" ".join(line.split()) for line in "".join(self.buffer).split("\n")]
        self.buffer = []
        text = "\n".join(_escape_markdown_line(line) for line in lines if line)
        if text:
            self.blocks.append(self.prefix + text)
            self.prefix = ""


def _escape_markdown_line(line: str) -> str:
    """Keep page text that looks like a heading or a code fence from being read as one."""
    if ATX_HEADING.match(line) or FENCE_OPEN.match(line):
        return "\\" + line
    return line


# --- JSONL -------------------------------------------------------------------------------------


def _load_jsonl(path: Path, default_acl: tuple[str, ...]) -> Iterator[tuple[Document, str]]:
    default_created_at = _mtime_iso(path)
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            place = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise LoaderError(f"{place}: not valid UTF-8 (byte {exc.start} of the line)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LoaderError(f"{place}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise LoaderError(f"{place}: expected a JSON object, got {type(record).__name__}")
            try:
                document = _record_to_document(record, str(path), default_created_at, default_acl)
            except ValueError as exc:
                raise LoaderError(f"{place}: {exc}") from None
            yield document, place


def _record_to_document(record: dict[str, object], default_source: str, default_created_at: str,
                        default_acl: tuple[str, ...] = ()) -> Document:
    if "document_id" in record and "_id" in record:
        raise ValueError("both 'document_id' and '_id' given; use one")
    id_key = "_id" if "_id" in record else "document_id"
    document_id = _required_string(record, id_key)
    text = _required_string(record, "text")
    title = _optional_string(record, "title")
    source = _optional_string(record, "source") or default_source

    metadata: dict[str, MetadataValue] = {}
    given = record.get("metadata")
    if given is not None:
        if not isinstance(given, dict):
            raise ValueError(f"'metadata' must be an object, got {type(given).__name__}")
        for key, value in given.items():
            if value is not None:
                metadata[key] = _metadata_value(f"metadata[{key!r}]", value)
    for key, value in record.items():
        if key in JSONL_KNOWN_KEYS or value is None:
            continue
        if key in metadata:
            raise ValueError(f"key {key!r} given both at top level and in 'metadata'")
        metadata[key] = _metadata_value(f"extra key {key!r}", value)

    created_at = default_created_at
    if record.get("created_at") is not None:
        created_at = _iso_utc(_optional_string(record, "created_at"))
    return Document(
        document_id=document_id,
        text=_normalize_newlines(text),
        title=title,
        source=source,
        metadata=metadata,
        created_at=created_at,
        acl=_acl(record.get("acl"), default_acl),
    )


def _acl(given: object, default: tuple[str, ...]) -> tuple[str, ...]:
    if given is None:
        return default
    if not isinstance(given, list):
        raise ValueError(f"'acl' must be a list of group names, got {type(given).__name__}")
    return normalize_acl(given)  # ValueError "acl[i]: ..." naming the bad group


def _required_string(record: dict[str, object], key: str) -> str:
    if key not in record:
        raise ValueError(f"missing {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{key!r} is empty")
    return value


def _optional_string(record: dict[str, object], key: str) -> str:
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {type(value).__name__}")
    return value


def _metadata_value(what: str, value: object) -> MetadataValue:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{what}: {value} is not a finite number")
    if isinstance(value, (str, int, float, bool)):
        return value
    raise ValueError(f"{what}: {type(value).__name__} is not allowed (str, int, float or bool only)")


def _iso_utc(value: str) -> str:
    """ISO 8601 timestamp normalized to UTC, seconds precision; a naive time is taken as UTC."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"'created_at' is not an ISO 8601 timestamp: {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds")
