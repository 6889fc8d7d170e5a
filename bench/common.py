"""Shared helpers for the benchmarks: corpora, timing, the machine, and BENCHMARKS.md sections."""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SCIFACT = Path(os.environ.get("RAG_SCIFACT_DIR", REPO.parent / "shared" / "data" / "scifact"))
CACHE = REPO / ".cache" / "bench"
BENCHMARKS = REPO / "BENCHMARKS.md"
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {memory_gib:.0f} GiB RAM, Python {platform.python_version()}"


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


def update_section(name: str, body: str) -> None:
    """Replace (or append) the ``<!-- bench:NAME -->`` section of BENCHMARKS.md."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    stamp = time.strftime("%Y-%m-%d")
    block = f"{start}\n{body.strip()}\n\n_`{command_line()}` on {machine()}, {stamp}._\n{end}"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS.write_text(text)


def percentiles(values_ms: Sequence[float]) -> tuple[float, float]:
    values = np.asarray(values_ms, dtype=float)
    return float(np.percentile(values, 50)), float(np.percentile(values, 95))


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """(milliseconds, result) of one call."""
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return 1000 * (time.perf_counter() - started), result


def scifact_abstracts() -> list[tuple[str, str]]:
    """(doc id, "title\\ntext") of every SciFact abstract."""
    rows = []
    with (SCIFACT / "corpus.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            rows.append((record["_id"], f"{record.get('title', '')}\n{record['text']}"))
    return rows


def scifact_queries(n: int | None = None) -> list[str]:
    texts = [json.loads(line)["text"] for line in (SCIFACT / "queries.jsonl").open(encoding="utf-8")]
    return texts[:n]


def scifact_sentences() -> list[str]:
    return [s for _, text in scifact_abstracts() for s in _SENTENCE.split(text.replace("\n", " ")) if s.strip()]


def real_chunks(n: int) -> list[str]:
    """About `n` real chunks: SciFact abstracts cut into windows of ~6 sentences, repeated if needed."""
    chunks = []
    for _, text in scifact_abstracts():
        sentences = [s for s in _SENTENCE.split(text.replace("\n", " ")) if s.strip()]
        chunks.extend(" ".join(sentences[i:i + 6]) for i in range(0, len(sentences), 6))
    out = list(chunks)
    while len(out) < n:  # repeated with a marker word so copies stay distinct documents
        out.extend(f"{c} copy{len(out) // len(chunks)}" for c in chunks)
    return out[:n]


def synthetic_chunks(n: int, *, seed: int = 0) -> list[str]:
    """`n` chunks of 4-10 real SciFact sentences drawn at random: a real vocabulary and term statistics."""
    rng = np.random.default_rng(seed)
    sentences = np.asarray(scifact_sentences(), dtype=object)
    lengths = rng.integers(4, 11, size=n)
    picks = rng.integers(0, len(sentences), size=int(lengths.sum()))
    out, at = [], 0
    for length in lengths:
        out.append(" ".join(sentences[picks[at:at + length]]))
        at += length
    return out


def random_unit_vectors(n: int, dim: int, *, seed: int = 0) -> np.ndarray:
    """(n, dim) float32 rows of L2 norm 1."""
    vectors = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def both_backends(stack, settings, url: str | None, label: str):
    """(transformers generator in process, vLLM generator) for the same settings; without ``url`` a vLLM
    server is started from .venv-vllm (``make vllm-venv``) and stopped with ``stack`` (an ExitStack)."""
    import tempfile

    from app.container import build_generator
    from generation.bundled import resolve_generator_model
    from tests.app.vllm_server import VllmServer

    if url is None:
        model_dir = resolve_generator_model(settings.generator_model, settings.models_path)
        log = Path(tempfile.mkdtemp(prefix=f"vllm-{label}-")) / "vllm.log"
        url = stack.enter_context(VllmServer(model_dir, log, context_window=settings.context_window)).url
        print(f"vLLM on {url} (log {log})", flush=True)
    local = build_generator(settings, strict=True)
    remote = build_generator(settings.model_copy(update={"generator_backend": "vllm", "vllm_url": url}), strict=True)
    return local, remote
