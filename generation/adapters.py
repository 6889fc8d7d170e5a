"""The adapter registry: PEFT adapters (LoRA, DoRA, IA3, prompt/prefix tuning) by name and version, an ACTIVE
pointer per name, rollback.

Layout::

    <root>/<name>/<version>/   adapter_config.json, adapter_model.safetensors, metadata.json, ...
    <root>/<name>/ACTIVE       the version served for <name> (one line)
    <root>/<name>/HISTORY      versions activated, oldest first; rollback steps back through it

Versions are ``v1``, ``v2``, ... in publication order. A reference is ``name`` (its active version, else
its latest) or ``name@version``. Pointer files are replaced atomically (write + rename).
Before an adapter is served, :func:`check_compatible` compares its metadata with the serving settings, and the
method its metadata records with what its files hold.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from generation.methods import METHODS, peft_kind, spec_kind

METADATA = "metadata.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# name or name@version: what a request may name (never a path: no '/', and no leading '.')
ADAPTER_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}(@[A-Za-z0-9][A-Za-z0-9._-]{0,49})?$")


class AdapterNotFound(LookupError):
    pass


class AdapterMismatch(ValueError):
    """The adapter was trained for other serving settings than the current ones."""


class AdapterBroken(RuntimeError):
    """The adapter is in the registry but its files do not load."""


@dataclass(frozen=True)
class AdapterRef:
    name: str
    version: str
    path: Path

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


def _version_number(version: str) -> int:
    match = re.fullmatch(r"v(\d+)", version)
    return int(match.group(1)) if match else -1


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


class AdapterRegistry:
    """Versioned folders ``<root>/<name>/<version>/``; a version is a folder holding ``marker`` (the adapters'
    ``adapter_config.json``; the rerankers' registry uses ``metadata.json``)."""

    def __init__(self, root: Path, marker: str = "adapter_config.json") -> None:
        self.root = Path(root)
        self.marker = marker

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
        return sorted(found, key=lambda v: (_version_number(v), v))

    def active(self, name: str) -> str | None:
        pointer = self.root / name / "ACTIVE"
        if pointer.is_file():
            version = pointer.read_text().strip()
            return version or None
        return None

    def history(self, name: str) -> list[str]:
        path = self.root / name / "HISTORY"
        return [line for line in path.read_text().split() if line] if path.is_file() else []

    def resolve(self, ref: str) -> AdapterRef:
        """``name`` or ``name@version`` -> the adapter folder; AdapterNotFound names what was looked for."""
        name, _, version = ref.partition("@")
        versions = self.versions(name)
        if not versions:
            where = self.root / name
            raise AdapterNotFound(f"adapter {name!r} not found in the registry (no versions under {where})")
        version = version or self.active(name) or versions[-1]
        if version not in versions:
            raise AdapterNotFound(f"adapter {name!r} has no version {version!r} (have: {', '.join(versions)})")
        return AdapterRef(name, version, self.root / name / version)

    def entries(self) -> list[dict[str, Any]]:
        """Every version of every adapter, with its metadata summary and whether it is active."""
        rows = []
        for name in self.names():
            active = self.active(name)
            for version in self.versions(name):
                meta = read_metadata(self.root / name / version)
                rows.append({"name": name, "version": version, "active": version == active,
                             "created_at": meta.get("created_at"), "base_model": meta.get("base_model"),
                             "method": meta.get("method"),
                             "metrics": meta.get("metrics", {})})
        return rows

    # --- writing ---------------------------------------------------------------------------------
    def publish(self, name: str, source: Path, *, activate: bool = True) -> AdapterRef:
        """Copy the adapter folder ``source`` in as the next version of ``name``."""
        if not NAME_RE.match(name):
            raise ValueError(f"adapter name {name!r}: use letters, digits, '.', '_' and '-' (at most 100)")
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        numbers = [_version_number(v) for v in self.versions(name)]
        version = f"v{max(numbers, default=0) + 1}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=folder))
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        os.rename(tmp, folder / version)  # atomic: a version folder is complete or absent
        if activate:
            self.activate(name, version)
        return AdapterRef(name, version, folder / version)

    def activate(self, name: str, version: str | None = None) -> AdapterRef:
        """Point ``name`` at ``version`` (default: its latest) and record it for rollback."""
        if version is None:
            versions = self.versions(name)
            version = versions[-1] if versions else None
        ref = self.resolve(f"{name}@{version}" if version else name)
        _write_atomic(self.root / name / "ACTIVE", ref.version + "\n")
        history = self.history(name)
        if not history or history[-1] != ref.version:
            _write_atomic(self.root / name / "HISTORY", "\n".join(history + [ref.version]) + "\n")
        return ref

    def rollback(self, name: str) -> AdapterRef:
        """Re-activate the version active before the current one."""
        history = self.history(name)
        current = self.active(name)
        while history and history[-1] == current:
            history.pop()
        if not history:
            raise AdapterNotFound(f"adapter {name!r}: no earlier activation to roll back to")
        ref = self.resolve(f"{name}@{history[-1]}")
        _write_atomic(self.root / name / "ACTIVE", ref.version + "\n")
        _write_atomic(self.root / name / "HISTORY", "\n".join(history) + "\n")
        return ref


def locate(ref: str, registry_root: Path) -> tuple[Path, str]:
    """(folder, label) of ``ref``: a folder holding ``adapter_config.json`` as it is, else a name[@version]
    resolved in the registry at ``registry_root`` (AdapterNotFound when it holds none)."""
    candidate = Path(ref)
    if (candidate / "adapter_config.json").is_file():
        return candidate, candidate.name
    found = AdapterRegistry(registry_root).resolve(ref)
    return found.path, found.label


def read_metadata(folder: Path) -> dict[str, Any]:
    path = Path(folder) / METADATA
    if not path.is_file():
        return {}
    return cast(dict[str, Any], json.loads(path.read_text(encoding="utf-8")))


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """An adapter's ``adapter_config.json`` (peft's description of its files); {} when unreadable."""
    try:
        config = json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cast(dict[str, Any], config) if isinstance(config, dict) else {}


def write_metadata(folder: Path, metadata: dict[str, Any]) -> None:
    """Replace an adapter's metadata.json atomically (a loading service never reads half of it)."""
    _write_atomic(Path(folder) / METADATA, json.dumps(metadata, indent=2) + "\n")


def check_compatible(metadata: dict[str, Any], *, where: str, base_model: str, context_window: int,
                     rope_scaling: dict[str, Any] | None, prompt_template_versions: Collection[str],
                     adapter_config: dict[str, Any] | None = None) -> None:
    """Refuse an adapter trained for other serving settings; the message names both values.

    ``prompt_template_versions``: the versions this service can render (generation.prompt.SYSTEM_PROMPTS);
    an adapter trained with any of them is served with its own. The method must be recorded and known,
    and, given the adapter's ``adapter_config.json``, be what its files hold (a DoRA or IA3 adapter
    recorded as ``lora`` would otherwise load with the wrong serving rules).
    """
    serving = {"base_model": base_model, "context_window": context_window, "rope_scaling": rope_scaling}
    problems = []
    for key, value in serving.items():
        if key not in metadata:
            problems.append(f"{key}: not recorded by the adapter, serving {value!r}")
        elif _normalize(metadata[key]) != _normalize(value):
            problems.append(f"{key}: adapter trained with {metadata[key]!r}, serving {value!r}")
    known = ", ".join(repr(v) for v in prompt_template_versions)
    if "prompt_template_version" not in metadata:
        problems.append(f"prompt_template_version: not recorded by the adapter, serving one of {known}")
    elif metadata["prompt_template_version"] not in prompt_template_versions:
        problems.append(f"prompt_template_version: adapter trained with {metadata['prompt_template_version']!r}, "
                        f"unknown here (known: {known})")
    problem = method_problem(metadata, adapter_config)
    if problem:
        problems.append(problem)
    if problems:
        raise AdapterMismatch(f"adapter {where} does not match the serving settings: " + "; ".join(problems))


def method_problem(metadata: dict[str, Any], adapter_config: dict[str, Any] | None) -> str | None:
    method = metadata.get("method")
    if method is None:
        return "method: not recorded by the adapter"
    if method not in METHODS:
        return f"method: {method!r} is not one of {', '.join(METHODS)}"
    expected = spec_kind(METHODS[method])
    if adapter_config and peft_kind(adapter_config) != expected:  # unreadable files: the load says what is wrong
        return (f"method: metadata records {method} ({expected}), "
                f"adapter_config.json holds {peft_kind(adapter_config)}")
    return None


def _normalize(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                for k, v in value.items()}
    return value
