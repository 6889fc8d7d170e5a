"""The adapter registry: PEFT adapters (LoRA, DoRA, IA3, prompt/prefix tuning) by name and version, an ACTIVE
pointer per name, rollback.

Layout::

    <root>/<name>/<version>/   adapter_config.json, adapter_model.safetensors, metadata.json, ...
    <root>/<name>/ACTIVE       the version served for <name> (one line)
    <root>/<name>/HISTORY      versions activated, oldest first; rollback steps back through it

Versions are ``v1``, ``v2``, ... in publication order. A reference is ``name`` (its active version, else
its latest) or ``name@version``. The registry mechanics (pointers, publish, rollback) are ingestion/registry.py's.
Before an adapter is served, :func:`check_compatible` compares its metadata with the serving settings, and the
method its metadata records with what its files hold.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any, cast

from generation.methods import METHODS, peft_kind, spec_kind
from ingestion.registry import ModelNotFound, RegistryRef, VersionedRegistry, write_atomic

METADATA = "metadata.json"
# name or name@version: what a request may name (never a path: no '/', and no leading '.')
ADAPTER_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}(@[A-Za-z0-9][A-Za-z0-9._-]{0,49})?$")


class AdapterNotFound(ModelNotFound):
    pass


class AdapterMismatch(ValueError):
    """The adapter was trained for other serving settings than the current ones."""


class AdapterBroken(RuntimeError):
    """The adapter is in the registry but its files do not load."""


AdapterRef = RegistryRef


class AdapterRegistry(VersionedRegistry):
    kind = "adapter"
    marker = "adapter_config.json"
    not_found = AdapterNotFound

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
    write_atomic(Path(folder) / METADATA, json.dumps(metadata, indent=2) + "\n")


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
