"""Where a model's files come from when it is not bundled: a local folder, or the local Hugging Face cache.

The service does not download models at run time (``HF_HUB_OFFLINE=1`` is the default the CLI sets);
a hub id that is not in the local cache is a :class:`ModelUnavailable` naming the setting and what to
do, raised before anything tries to load it, instead of a library traceback.
"""

from __future__ import annotations

import os
from pathlib import Path


class ModelUnavailable(OSError):
    """A configured model cannot be found on this machine."""


def local_model(name: str, setting: str) -> str:
    """A folder ``from_pretrained`` can load for ``name`` (a folder or a hub id), or ModelUnavailable."""
    if Path(name).is_dir():
        return name
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    if not offline:
        return name  # downloads allowed by the operator: the library fetches it
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id=name, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError):
        raise ModelUnavailable(
            f"{setting}={name!r}: not a folder and not in the local Hugging Face cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}); the service does not download at run time. "
            f"Fetch it once where the hub is reachable (huggingface-cli download {name}), set {setting} to a "
            "local folder, or allow downloads with HF_HUB_OFFLINE=0") from None
