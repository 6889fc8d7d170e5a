"""Versioned model registries: folders by name and version, an ACTIVE pointer per name, rollback.

Layout::

    <root>/<name>/<version>/   the model's files (holding ``marker``), metadata.json, ...
    <root>/<name>/ACTIVE       the version served for <name> (one line)
    <root>/<name>/HISTORY      versions activated, oldest first; rollback steps back through it

Versions are ``v1``, ``v2``, ... in publication order. A reference is ``name`` (its active version, else
its latest) or ``name@version``. Pointer files are replaced atomically (write + rename), and a version
folder appears whole (copied beside, then renamed). Subclasses name the kind and the file that marks a
complete version: generation/adapters.py (PEFT adapters) and ``EmbedderRegistry`` below.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class ModelNotFound(LookupError):
    """No such name or version in a registry; the message names what was looked for."""


@dataclass(frozen=True)
class RegistryRef:
    name: str
    version: str
    path: Path

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


def version_number(version: str) -> int:
    match = re.fullmatch(r"v(\d+)", version)
    return int(match.group(1)) if match else -1


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


class VersionedRegistry:
    kind = "model"  # in messages: "adapter 'x' not found ..."
    marker = "metadata.json"  # a version folder holding this file is complete
    not_found: type[LookupError] = ModelNotFound

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # --- reading ---------------------------------------------------------------------------------
    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.versions(p.name))

    def versions(self, name: str) -> list[str]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        found = [p.name for p in folder.iterdir() if p.is_dir() and (p / self.marker).is_file()]
        return sorted(found, key=lambda v: (version_number(v), v))

    def active(self, name: str) -> str | None:
        pointer = self.root / name / "ACTIVE"
        if pointer.is_file():
            version = pointer.read_text().strip()
            return version or None
        return None

    def history(self, name: str) -> list[str]:
        path = self.root / name / "HISTORY"
        return [line for line in path.read_text().split() if line] if path.is_file() else []

    def resolve(self, ref: str) -> RegistryRef:
        """``name`` or ``name@version`` -> its folder; ``not_found`` names what was looked for."""
        name, _, version = ref.partition("@")
        versions = self.versions(name)
        if not versions:
            where = self.root / name
            raise self.not_found(f"{self.kind} {name!r} not found in the registry (no versions under {where})")
        version = version or self.active(name) or versions[-1]
        if version not in versions:
            raise self.not_found(f"{self.kind} {name!r} has no version {version!r} (have: {', '.join(versions)})")
        return RegistryRef(name, version, self.root / name / version)

    # --- writing ---------------------------------------------------------------------------------
    def publish(self, name: str, source: Path, *, activate: bool = True) -> RegistryRef:
        """Copy the folder ``source`` in as the next version of ``name``."""
        if not NAME_RE.match(name):
            raise ValueError(f"{self.kind} name {name!r}: use letters, digits, '.', '_' and '-' (at most 100)")
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        numbers = [version_number(v) for v in self.versions(name)]
        version = f"v{max(numbers, default=0) + 1}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=folder))
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        os.rename(tmp, folder / version)  # atomic: a version folder is complete or absent
        if activate:
            self.activate(name, version)
        return RegistryRef(name, version, folder / version)

    def activate(self, name: str, version: str | None = None) -> RegistryRef:
        """Point ``name`` at ``version`` (default: its latest) and record it for rollback."""
        if version is None:
            versions = self.versions(name)
            version = versions[-1] if versions else None
        ref = self.resolve(f"{name}@{version}" if version else name)
        write_atomic(self.root / name / "ACTIVE", ref.version + "\n")
        history = self.history(name)
        if not history or history[-1] != ref.version:
            write_atomic(self.root / name / "HISTORY", "\n".join(history + [ref.version]) + "\n")
        return ref

    def rollback(self, name: str) -> RegistryRef:
        """Re-activate the version active before the current one."""
        history = self.history(name)
        current = self.active(name)
        while history and history[-1] == current:
            history.pop()
        if not history:
            raise self.not_found(f"{self.kind} {name!r}: no earlier activation to roll back to")
        ref = self.resolve(f"{name}@{history[-1]}")
        write_atomic(self.root / name / "ACTIVE", ref.version + "\n")
        write_atomic(self.root / name / "HISTORY", "\n".join(history) + "\n")
        return ref


class EmbedderNotFound(ModelNotFound):
    pass


class EmbedderRegistry(VersionedRegistry):
    """Fine-tuned sentence-transformers models (``rag train embedder``): ``embedder:<name>[@<version>]``."""

    kind = "embedder"
    marker = "modules.json"  # written by SentenceTransformer.save
    not_found = EmbedderNotFound


class RerankerNotFound(ModelNotFound):
    pass


class RerankerRegistry(VersionedRegistry):
    """Trained cross-encoders (``rag train reranker``): ``RAG_RERANK_MODEL=<name>[@<version>]``."""

    kind = "reranker"
    marker = "metadata.json"  # written last by the trainer, beside the CrossEncoder's files
    not_found = RerankerNotFound
