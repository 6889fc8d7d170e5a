"""Side by side with the frameworks: this service, LlamaIndex and Haystack on SciFact, one machine, one run.

The same corpus (the first --docs SciFact abstracts, title and text), the same embedding model (the bundled
all-MiniLM-L6-v2 folder, given to each framework's sentence-transformers embedder), the same chunk limit
(the service's, in MiniLM tokens; in words for Haystack's word splitter), hybrid BM25 + dense retrieval in
each. Each system runs in its own process, one after the other (bench/peers_service.py in this
virtualenv; bench/peers_llamaindex.py and bench/peers_haystack.py in .venv-llamaindex and .venv-haystack,
created here with the pins below when missing), and hands back (document id, chunk text) pairs, which
this script scores with the same code for all: NDCG@10 and Recall@100 on SciFact's train judgments via
app.evaluation.scoring (a document ranks at its best chunk), and the update audit below.

Update correctness: 5% of the documents get their first sentence replaced by a marked one, 2% are
deleted, through each system's incremental path; then a probe per changed document (its removed
sentence) and per deleted one (its title and first sentence) counts the top --probe-k chunks that are
stale (text the current document no longer has), from deleted documents, or duplicates (the same
document and text twice); the whole store is audited the same way.

    python bench/peers.py [--docs 5183] [--queries 809] [--systems service,llamaindex,haystack] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tomllib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

from common import REPO, SCIFACT, _SENTENCE, update_section
from peers_worker import Plan

from app.container import build_embedder
from app.evaluation.scoring import load_qrels, load_queries, score_rankings
from app.settings import Settings
from ingestion.chunker import effective_limit
from ingestion.embedder import resolve_embedding_model

OUT = REPO / ".cache" / "peers"
CHANGED_SHARE, DELETED_SHARE = 0.05, 0.02
# Each framework in its own virtualenv, pinned; torch is pinned to the project's own build at run time.
VENVS = {
    "llamaindex": (".venv-llamaindex", ["llama-index-core==0.14.25", "llama-index-vector-stores-chroma==0.6.0",
                                        "llama-index-retrievers-bm25==0.8.0",
                                        "llama-index-embeddings-huggingface==0.8.0", "chromadb==1.5.9"]),
    "haystack": (".venv-haystack", ["haystack-ai==2.31.0", "sentence-transformers==6.2.0"]),
}
SYSTEMS = ("service", "llamaindex", "haystack")


def marker(doc_id: str) -> str:
    """The sentence a changed document starts with instead of its first one."""
    return f"Revision {doc_id}: this abstract was corrected and its first finding withdrawn."


def squash(text: str) -> str:
    """Text without whitespace: splitters rejoin words with other whitespace than the source had."""
    return "".join(text.split())


def is_current(text: str, title: str, current: str) -> bool:
    """Whether a chunk shows text the current document holds; a leading title header (the service's chunks
    carry one) is allowed in front of a slice from the middle. `current` is squash(title + text)."""
    body, head = squash(text), squash(title)
    return body in current or (body.startswith(head) and body[len(head):] in current)


def audit(chunks: Iterable[tuple[str, str]], *, titles: dict[str, str], current: dict[str, str],
          changed: set[str], deleted: set[str]) -> Counter:
    """Counts over (document id, text) chunks: chunks, stale (of a changed document, text it no longer has),
    deleted (of a deleted document), duplicate (an extra copy of the same document and text), unmatched
    (of an unchanged document yet not its text: expected 0, a check of this audit), fresh (with a changed
    document's new sentence)."""
    counts: Counter = Counter()
    seen: set[tuple[str, str]] = set()
    for doc, text in chunks:
        counts["chunks"] += 1
        key = (doc, squash(text))
        counts["duplicate"] += key in seen
        seen.add(key)
        if doc in deleted:
            counts["deleted"] += 1
        elif not is_current(text, titles.get(doc, ""), current.get(doc, "")):
            counts["stale" if doc in changed else "unmatched"] += 1
        elif doc in changed and squash(marker(doc)) in key[1]:
            counts["fresh"] += 1
    return counts


def read_corpus(n: int | None) -> list[dict[str, str]]:
    rows = []
    with (SCIFACT / "corpus.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            rows.append({"id": str(record["_id"]), "title": record.get("title", ""), "text": record["text"]})
    return rows[:n]


def make_plan(args: argparse.Namespace, settings: Settings) -> tuple[Plan, dict[str, dict[str, int]]]:
    """The plan every side runs, and the judgments it is scored on (restricted to the documents used)."""
    documents = read_corpus(args.docs)
    ids = {d["id"] for d in documents}
    qrels = {q: {d: s for d, s in judged.items() if d in ids} for q, judged in load_qrels(args.qrels).items()}
    qrels = dict(list({q: j for q, j in qrels.items() if j}.items())[:args.queries])
    texts = load_queries(SCIFACT / "queries.jsonl")

    rng = random.Random(0)
    picked = rng.sample(documents, round((CHANGED_SHARE + DELETED_SHARE) * len(documents)))
    n_changed = round(CHANGED_SHARE * len(documents))
    changed, probes = [], {}
    for doc in picked[:n_changed]:
        first, *rest = _SENTENCE.split(doc["text"], maxsplit=1)
        changed.append({**doc, "text": " ".join([marker(doc["id"]), *rest])})
        probes[f"changed:{doc['id']}"] = first
    deleted = [doc["id"] for doc in picked[n_changed:]]
    for doc in picked[n_changed:]:
        probes[f"deleted:{doc['id']}"] = f"{doc['title']} {_SENTENCE.split(doc['text'], maxsplit=1)[0]}"

    embedder = build_embedder(settings)
    limit = effective_limit(embedder, settings.chunk_max_tokens, settings.chunk_overlap_tokens)
    sample = documents[:500]
    tokens_per_word = (sum(embedder.count_tokens(d["text"]) for d in sample)
                       / sum(len(d["text"].split()) for d in sample))
    plan = Plan(embedding_model=resolve_embedding_model(settings.embedding_model), chunk_tokens=limit,
                overlap_tokens=settings.chunk_overlap_tokens, chunk_words=round(limit / tokens_per_word),
                overlap_words=round(settings.chunk_overlap_tokens / tokens_per_word), depth=100,
                candidates=max(settings.candidates, 100), probe_k=args.probe_k, documents=documents,
                queries={q: texts[q] for q in qrels}, changed=changed, deleted=deleted, probes=probes)
    return plan, qrels


def ensure_venv(name: str) -> Path:
    """The framework's virtualenv's python, created and installed from its pins when missing or stale."""
    folder, pins = VENVS[name]
    venv = REPO / folder
    pins = [*pins, f"torch=={version('torch')}"]  # the project's torch build (here the CPU wheel)
    stamp = venv / "peers-pins.txt"
    if not (stamp.exists() and stamp.read_text().split() == pins):
        print(f"creating {venv} with {' '.join(pins)}", file=sys.stderr, flush=True)
        subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--clear", str(venv)],
                       check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *pins], check=True)
        stamp.write_text("\n".join(pins) + "\n")
    return venv / "bin" / "python"


def run_side(name: str, plan_path: Path) -> dict:
    python = Path(sys.executable) if name == "service" else ensure_venv(name)
    out = OUT / f"{name}.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "ANONYMIZED_TELEMETRY": "False", "HAYSTACK_TELEMETRY_ENABLED": "False"}
    print(f"== {name}", file=sys.stderr, flush=True)
    subprocess.run([str(python), str(REPO / "bench" / f"peers_{name}.py"), str(plan_path), str(out)],
                   cwd=REPO, env=env, check=True)
    return json.loads(out.read_text())


def summarize(result: dict, plan: Plan, qrels: dict[str, dict[str, int]]) -> dict:
    rankings = {q: list(dict.fromkeys(docs)) for q, docs in result["rankings"].items()}
    metrics, _ = score_rankings(qrels, rankings)
    latencies = sorted(result["latencies_ms"])
    final = {d["id"]: d for d in plan.documents} | {d["id"]: d for d in plan.changed}
    for doc_id in plan.deleted:
        final.pop(doc_id)
    context = {"titles": {d: r["title"] for d, r in final.items()},
               "current": {d: squash(f"{r['title']}\n{r['text']}") for d, r in final.items()},
               "changed": {d["id"] for d in plan.changed}, "deleted": set(plan.deleted)}
    probes = Counter()
    found_new = 0
    for pid, chunks in result["probes"].items():
        counts = audit(chunks, **context)
        probes.update(counts)
        found_new += pid.startswith("changed:") and counts["fresh"] > 0
    store = audit(result["store"], **context) if result["store"] is not None else None
    indexed = {doc for doc, _ in result["store"]} if result["store"] is not None else set()
    return {**result, "metrics": metrics, "p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
            "probe_counts": probes, "found_new": found_new, "store_counts": store,
            "missing": len(set(final) - indexed) if store is not None else None}


def percentile(values: Sequence[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if len(values) else 0.0


def share(part: int, whole: int) -> str:
    return f"{part} ({100 * part / whole:.1f}%)" if whole else "0"


def tables(rows: list[dict], plan: Plan, qrels: dict) -> str:
    n = len(plan.documents)
    lines = [f"SciFact: {n} documents, {len(qrels)} judged train queries (qrels/train.tsv), all-MiniLM-L6-v2 "
             f"(the bundled folder) everywhere; each retriever hands {plan.candidates} chunks to fusion, "
             f"{plan.depth} fused chunks are kept; a document ranks at its best chunk; scored by "
             "app/evaluation/scoring.py (ir-measures) for every system.", "",
             "| system | chunks | ingest docs/s (wall) | docs per CPU-second | NDCG@10 | Recall@100 | "
             "query p50 / p95 ms | peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['chunks']} | {n / r['ingest_s']:.1f} ({r['ingest_s']:.0f} s) "
                     f"| {n / r['ingest_cpu_s']:.2f} "
                     f"| {r['metrics']['ndcg@10']:.4f} | {r['metrics']['recall@100']:.4f} "
                     f"| {r['p50']:.0f} / {r['p95']:.0f} | {r['peak_rss_mib']:.0f} |")
    n_changed, n_deleted = len(plan.changed), len(plan.deleted)
    lines += ["", f"**Updates**: {n_changed} documents changed (first sentence replaced by a marked one), "
                  f"{n_deleted} deleted; then {len(plan.probes)} probes (a changed document's removed sentence, "
                  f"a deleted document's title and first sentence), top {plan.probe_k} chunks each.", "",
              "| system | update s | probes: chunks | stale | of deleted docs | duplicates | changed docs whose "
              "new text is found | store: chunks | stale | of deleted docs | duplicates | docs missing |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, s = r["probe_counts"], r["store_counts"]
        store = (f"{s['chunks']} | {share(s['stale'], s['chunks'])} | {share(s['deleted'], s['chunks'])} | "
                 f"{share(s['duplicate'], s['chunks'])} | {r['missing']}") if s else "not listable | | | |"
        lines.append(f"| {r['system']} | {r['update_s']:.1f} | {p['chunks']} | {share(p['stale'], p['chunks'])} "
                     f"| {share(p['deleted'], p['chunks'])} | {share(p['duplicate'], p['chunks'])} "
                     f"| {share(r['found_new'], n_changed)} | {store} |")
    lines += ["", "What each ran:", ""]
    for r in rows:
        unmatched = (r["store_counts"] or Counter())["unmatched"] + r["probe_counts"]["unmatched"]
        versions = ", ".join(f"{k} {v}".strip() for k, v in r["versions"].items())
        lines.append(f"- **{r['system']}** ({versions}): chunking {r['chunking']}; retrieval {r['retrieval']}; "
                     f"{'; '.join(r['notes'])}" + (f"; {unmatched} chunks of unchanged documents did not match "
                                                   "their text (audit check)" if unmatched else "") + ".")
    return "\n".join(lines)


def project_version() -> str:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return f"{meta['name']} {meta['version']} (commit {commit})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=None, help="the first N SciFact documents (default: all)")
    parser.add_argument("--queries", type=int, default=None, help="the first N judged queries (default: all)")
    parser.add_argument("--qrels", type=Path, default=SCIFACT / "qrels" / "train.tsv")
    parser.add_argument("--probe-k", type=int, default=10)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--reuse", default="", help="systems whose last result to reuse when the plan is the same "
                                                    "(e.g. service, after a framework's run failed)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        raise SystemExit(f"--systems: unknown {unknown}; choose from {', '.join(SYSTEMS)}")
    for name in systems:
        if name != "service":
            ensure_venv(name)

    settings = Settings(_env_file=None)
    plan, qrels = make_plan(args, settings)
    OUT.mkdir(parents=True, exist_ok=True)
    plan_path = OUT / "plan.json"
    plan_text = json.dumps(asdict(plan))
    same_plan = plan_path.is_file() and plan_path.read_text(encoding="utf-8") == plan_text
    plan_path.write_text(plan_text, encoding="utf-8")
    reuse = {s.strip() for s in args.reuse.split(",") if s.strip()}
    rows = []
    for name in systems:
        saved = OUT / f"{name}.json"
        if name in reuse and same_plan and saved.is_file():  # the last run's result, on the very same plan
            print(f"== {name}: reusing {saved}", file=sys.stderr, flush=True)
            result = json.loads(saved.read_text())
        else:
            result = run_side(name, plan_path)
        if name == "service":
            result["versions"] = {project_version(): "", **result["versions"]}
        rows.append(summarize(result, plan, qrels))
    body = "### Side by side with the frameworks: ingest, retrieval quality and updates\n\n" + tables(rows, plan, qrels)
    print(body)
    if not args.no_write:
        update_section("peers", body)


if __name__ == "__main__":
    main()
