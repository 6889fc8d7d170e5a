"""Who is calling: API keys with a name, scopes and access groups, read from settings and a keys file.

A key is known by the sha256 of its text; the keys file never holds a key itself. The file
(``RAG_KEYS_FILE``, YAML or JSON) looks like::

    keys:
      - name: support-bot
        sha256: 9f86d081...          # sha256 hex of the key (`rag keys create` writes this entry)
        scopes: [query]               # query, ingest-status, admin
        groups: [support, public-docs]
        requests_per_minute: 120      # optional per-key overrides of RAG_RATE_LIMIT_* (0: unlimited)
        tokens_per_minute: 20000

It is re-read when it changes (checked at most once a second), so keys rotate without a restart:
add the new key's entry, move clients over, remove the old entry.

``RAG_API_KEYS`` keys are scoped ``query`` and ``ingest-status``, ``RAG_ADMIN_API_KEYS`` keys all three
scopes; neither has groups. With no key configured at all the service is loopback-only (``rag serve``
refuses other addresses) and every request acts as the local operator: all scopes, all documents.

Visibility: a document with no ``acl`` is public; one with an ``acl`` is seen by callers holding one of
its groups. The group ``*`` sees every document.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from retrieval.acl import GROUP_PATTERN, SEES_ALL  # one definition for keys' groups and documents' acls

Scope = Literal["query", "ingest-status", "admin"]
ALL_SCOPES: frozenset[str] = frozenset({"query", "ingest-status", "admin"})
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caller:
    """The identity a request acts as. ``groups`` None: sees every document (local operator, or ``*``)."""

    name: str
    scopes: frozenset[str]
    groups: frozenset[str] | None
    key_id: str | None = None  # first 12 hex digits of the key's sha256; None for the local operator
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def has(self, scope: str) -> bool:
        return scope in self.scopes


LOCAL_OPERATOR = Caller(name="local", scopes=ALL_SCOPES, groups=None)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    scopes: list[Scope] = Field(min_length=1)
    groups: list[str] = Field(default_factory=list)
    requests_per_minute: int | None = Field(None, ge=0)  # None: RAG_RATE_LIMIT_*; 0: unlimited
    tokens_per_minute: int | None = Field(None, ge=0)

    @field_validator("groups", mode="before")
    @classmethod
    def _null_is_none(cls, value: object) -> object:
        return [] if value is None else value

    @field_validator("groups")
    @classmethod
    def _valid_groups(cls, value: list[str]) -> list[str]:
        for group in value:
            if not re.match(GROUP_PATTERN, group):
                raise ValueError(f"group {group!r}: use 1-128 letters, digits or _ . : @ * -")
        return value


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[KeyEntry] = Field(default_factory=list)

    @field_validator("keys", mode="before")
    @classmethod
    def _null_is_empty(cls, value: object) -> object:
        return [] if value is None else value


class KeysFileError(ValueError):
    """The keys file is missing, unreadable or invalid; the message names the file and what is wrong."""


def read_keys_file(path: Path) -> list[KeyEntry]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeysFileError(f"RAG_KEYS_FILE {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise KeysFileError(f"RAG_KEYS_FILE {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                            f"({str(exc).splitlines()[0]})") from None
    try:
        entries = KeysFile.model_validate(data or {}).keys
    except ValidationError as exc:
        where = "; ".join(f"{_field_path(data, e['loc'])}: {e['msg']}" for e in exc.errors())
        raise KeysFileError(f"RAG_KEYS_FILE {path}: {where}") from None
    for what, values in (("names", [e.name for e in entries]), ("sha256 values", [e.sha256 for e in entries])):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            shown = repeated if what == "names" else [v[:12] for v in repeated]
            raise KeysFileError(f"RAG_KEYS_FILE {path}: key {what} must be unique; repeated: {', '.join(shown)}")
    return entries


def _field_path(data: Any, loc: tuple[int | str, ...]) -> str:
    """``keys[2] (support-bot).scopes.0`` for a pydantic error location in the keys file."""
    if len(loc) >= 2 and loc[0] == "keys" and isinstance(loc[1], int):
        entry = data["keys"][loc[1]] if isinstance(data, dict) and isinstance(data.get("keys"), list) else None
        name = f" ({entry['name']})" if isinstance(entry, dict) and isinstance(entry.get("name"), str) else ""
        return ".".join([f"keys[{loc[1]}]{name}", *(str(p) for p in loc[2:])])
    return ".".join(str(p) for p in loc) or "top level"


def write_keys_file(path: Path, entries: list[KeyEntry]) -> None:
    """Write the keys file atomically (a temporary file in the same folder, then rename): a running service
    re-reading it sees the old file or the new one, never half of one. YAML unless the name ends in .json."""
    data = {"keys": [entry.model_dump(exclude_none=True) for entry in entries]}
    text = json.dumps(data, indent=2) + "\n" if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _caller(entry: KeyEntry) -> Caller:
    groups = frozenset(entry.groups)
    return Caller(name=entry.name, scopes=frozenset(entry.scopes), groups=None if SEES_ALL in groups else groups,
                  key_id=entry.sha256[:12], requests_per_minute=entry.requests_per_minute,
                  tokens_per_minute=entry.tokens_per_minute)


@dataclass
class KeyRing:
    """Every configured key by its digest; ``identify`` maps a presented key to its Caller (or None)."""

    plain_keys: list[str] = field(default_factory=list)
    admin_keys: list[str] = field(default_factory=list)
    keys_file: Path | None = None
    reload_every_s: float = 1.0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._file_state: tuple[int, int, int] | None = None
        self._checked_at = 0.0
        self._from_file: dict[str, Caller] = {}
        self._static: dict[str, Caller] = {}
        for key in self.plain_keys:
            digest = key_digest(key)
            self._static[digest] = Caller(name=f"api-key-{digest[:8]}", scopes=frozenset({"query", "ingest-status"}),
                                          groups=frozenset(), key_id=digest[:12])
        for key in self.admin_keys:
            digest = key_digest(key)
            self._static[digest] = Caller(name=f"admin-key-{digest[:8]}", scopes=ALL_SCOPES, groups=frozenset(),
                                          key_id=digest[:12])
        if self.keys_file is not None:
            self._reload(force=True)  # a bad file stops start-up with its one-line KeysFileError

    @property
    def configured(self) -> bool:
        """Whether any key exists; without one, every request is the local operator."""
        self._reload()
        return bool(self._static or self._from_file or self.keys_file is not None)

    def _reload(self, force: bool = False) -> None:
        if self.keys_file is None:
            return
        now = time.monotonic()
        if not force and now - self._checked_at < self.reload_every_s:
            return
        with self._lock:
            self._checked_at = now
            try:
                stat = self.keys_file.stat()
                state = (stat.st_ino, stat.st_mtime_ns, stat.st_size)  # an atomic rewrite changes the inode
            except OSError:
                state = None
            if not force and state == self._file_state:
                return
            try:
                entries = read_keys_file(self.keys_file)
            except KeysFileError as exc:
                if force:
                    raise
                # A broken edit keeps the keys that were valid before; the log says why (once per change).
                log.error("keys file not reloaded, the previous keys stay in force: %s", exc)
                self._file_state = state
                return
            self._from_file = {entry.sha256: _caller(entry) for entry in entries}
            if self._file_state is not None:
                log.info("keys file %s reloaded: %d keys", self.keys_file, len(entries))
            self._file_state = state

    def identify(self, presented: str | None) -> Caller | None:
        """The caller a presented key belongs to, or None. The digest is compared in constant time."""
        if not presented:
            return None
        self._reload()
        digest = key_digest(presented)
        found: Caller | None = None
        for known, caller in (*self._static.items(), *self._from_file.items()):
            if hmac.compare_digest(known, digest):
                found = caller
        return found

    def names(self) -> list[str]:
        return sorted({caller.name for caller in self.callers()})

    def callers(self) -> list[Caller]:
        """Every configured key's Caller (RAG_API_KEYS, RAG_ADMIN_API_KEYS, then the keys file)."""
        self._reload()
        return [*self._static.values(), *self._from_file.values()]
