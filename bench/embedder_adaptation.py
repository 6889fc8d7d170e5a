"""Embedder adaptation on SciFact: BM25, dense and hybrid NDCG@10 / Recall@100 before and after fine-tuning.

Every model is measured the way a refresh would serve it: the corpus chunked by the service's chunker
built on that model, the chunks embedded by it (cached under .cache/bench/embedder/), BM25 over the same
chunks (retrieval/bm25.py), dense = exact cosine top-200 over the chunk vectors (what Chroma's HNSW index
approximates), hybrid = the service's fusion code (retrieval/fusion.py) over each side's top RAG_CANDIDATES.
Documents rank at their best chunk; scored by app/evaluation/scoring.py. --documents N measures over a
fixed subset of the corpus instead (every judged document of the splits plus seeded random others, N in all):
cheaper on a busy CPU, and easier than the full corpus (fewer distractors), so compare rows with each other,
not with the full-corpus figures of `rag eval retrieval`.

The judged queries of --qrels are split as `rag train embedder --set dev_fraction=F` splits them (same
seed): the train part is where fusion is re-tuned for each model (app/evaluation/tuning.py's sweep), the
dev part is reported. --test-qrels adds a held-out split, measured at the alpha tuned on the train part.

    python bench/embedder_adaptation.py --models bundled:all-MiniLM-L6-v2 embedder:scifact-dev@v1 \
        [--registry .cache/emb/reg] [--dev-fraction 0.2] [--test-qrels .../qrels/test.tsv] [--documents N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from functools import partial
from pathlib import Path

import numpy as np
from common import CACHE, SCIFACT, update_section
from tqdm import tqdm

from app.container import build_chunker
from app.evaluation.scoring import MethodRuns, Qrels, document_ranking, load_qrels, load_queries, score_rankings
from app.evaluation.tuning import OBJECTIVE, choose, fused_metrics, sweep
from app.settings import Settings
from generation.finetune.embedder_training import EmbedderTrainConfig, load_labelled, split_queries
from ingestion.embedder import Embedder, resolve_embedding_model
from ingestion.loaders import load_documents
from retrieval.bm25 import BM25Index
from retrieval.fusion import fuse
from retrieval.hybrid import Hit

DEPTH = 200  # chunk candidates per retriever, as `rag eval retrieval`
OUT = CACHE / "embedder"


def model_key(ref: str, registry: Path) -> str:
    """Changes when the model's weights change (folder path + weight file sizes and times)."""
    folder = Path(resolve_embedding_model(ref, registry))
    stats = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in folder.glob("*.safetensors"))
    return hashlib.sha256(json.dumps([str(folder.resolve()), stats]).encode()).hexdigest()[:16]


def chunks_and_vectors(ref: str, registry: Path, settings: Settings, documents: list,
                       backend: str = "torch") -> tuple[Embedder, dict, np.ndarray]:
    """(embedder, {"ids", "documents", "texts"}, (n, d) unit vectors), cached per model, backend and document
    set. ``backend``: RAG_EMBEDDING_BACKEND's choices (openvino gives torch's vectors about 4x faster here)."""
    embedder = Embedder(ref, registry_root=registry, batch_size=settings.embedding_batch_size, backend=backend,
                        cache_dir=CACHE / "encoders")
    subset_key = hashlib.sha256("\x1f".join(d.document_id for d in documents).encode()).hexdigest()[:8]
    backend_key = "" if backend == "torch" else f"-{backend}"
    folder = OUT / f"{model_key(ref, registry)}-{subset_key}{backend_key}"
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "vectors.npy").exists():
        return embedder, json.loads((folder / "chunks.json").read_text()), np.load(folder / "vectors.npy")
    chunker = build_chunker(settings, embedder)
    chunks = [c for start in tqdm(range(0, len(documents), 64), desc=f"chunk ({ref})", unit="batch")
              for doc_chunks in chunker.chunk_many(documents[start:start + 64]) for c in doc_chunks]
    table = {"ids": [c.chunk_id for c in chunks], "documents": [c.document_id for c in chunks],
             "texts": [c.text for c in chunks]}
    with tqdm(total=len(chunks), desc=f"embed ({ref})", unit="chunk") as bar:
        vectors = embedder.embed_passages(table["texts"], on_batch=bar.update)
    (folder / "chunks.json").write_text(json.dumps(table))
    np.save(folder / "vectors.npy", vectors)
    return embedder, table, vectors


def retrieve(embedder: Embedder, table: dict, vectors: np.ndarray, questions: dict[str, str]) -> MethodRuns:
    """BM25 and dense top-DEPTH chunk hits of every question."""
    ids = table["ids"]
    bm25 = BM25Index.build(ids, table["texts"], {"document_id": table["documents"]})
    query_vectors = embedder.embed_queries(list(questions.values()))  # (q, d), unit length
    scores = query_vectors @ vectors.T  # (q, n) cosine similarities
    runs = MethodRuns({"bm25": {}, "dense": {}}, {}, {})
    for row, qid in enumerate(tqdm(questions, desc="retrieve", unit="q")):
        top = np.argpartition(-scores[row], DEPTH)[:DEPTH]
        top = top[np.argsort(-scores[row][top], kind="stable")]
        runs.hits["dense"][qid] = [Hit(ids[i], float(scores[row][i])) for i in top]
        runs.hits["bm25"][qid] = [Hit(cid, score) for cid, score in bm25.search(questions[qid], DEPTH)]
    return runs


def document_subset(documents: list, splits: dict[str, Qrels], n: int, seed: int) -> list:
    """Every judged document of the splits, then seeded random others up to `n`, in corpus order."""
    judged = {d for qrels in splits.values() for docs in qrels.values() for d in docs}
    others = [d.document_id for d in documents if d.document_id not in judged]
    keep = judged | set(random.Random(seed).sample(others, max(0, min(len(others), n - len(judged)))))
    return [d for d in documents if d.document_id in keep]


def subset(runs: MethodRuns, qids: set[str]) -> MethodRuns:
    return MethodRuns({m: {q: h for q, h in hits.items() if q in qids} for m, hits in runs.hits.items()}, {}, {})


def measure(runs: MethodRuns, qrels: Qrels, chunk_document: dict[str, str], alpha: float,
            candidates: int) -> dict[str, dict[str, float]]:
    part = subset(runs, set(qrels))
    out = {name: score_rankings(qrels, {q: document_ranking(h, chunk_document) for q, h in part.hits[name].items()})[0]
           for name in ("bm25", "dense")}
    out["hybrid"] = fused_metrics(part, qrels, chunk_document, candidates,
                                  partial(fuse, fusion="convex", alpha=alpha, rrf_k=0))
    return out


def record_in_metadata(folder: Path, report: dict, ref: str, base: str) -> None:
    """metadata.json's metrics["retrieval"]: this run's figures for the base model and for this one."""
    from generation.adapters import read_metadata, write_metadata

    metadata = read_metadata(folder)
    metadata.setdefault("metrics", {})["retrieval"] = {
        "command": "python bench/embedder_adaptation.py", "documents": report["documents"],
        "splits": report["splits"], "before": report["models"].get(base), "after": report["models"][ref]}
    write_metadata(folder, metadata)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="RAG_EMBEDDING_MODEL values, base model first")
    parser.add_argument("--registry", type=Path, default=Settings().embedders_dir)
    parser.add_argument("--qrels", type=Path, default=SCIFACT / "qrels" / "train.tsv")
    parser.add_argument("--dev-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--test-qrels", type=Path)
    parser.add_argument("--documents", type=int, help="measure over a fixed subset of N documents (see above)")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnx", "onnx-int8", "openvino"],
                        help="the embedder's backend (RAG_EMBEDDING_BACKEND); the same for every model")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    settings = Settings()
    corpus, queries = SCIFACT / "corpus.jsonl", SCIFACT / "queries.jsonl"

    documents = load_documents([corpus])
    labelled = load_labelled(EmbedderTrainConfig(corpus=str(corpus), queries=str(queries), qrels=str(args.qrels)),
                             [corpus, queries, args.qrels], {d.document_id: "" for d in documents})
    train_part, dev_part = split_queries(labelled, args.dev_fraction, args.seed)
    qrels = load_qrels(args.qrels)
    splits = {"train part": {q: qrels[q] for q in train_part}, "dev": {q: qrels[q] for q in dev_part}}
    if args.test_qrels:
        splits["test"] = load_qrels(args.test_qrels)
    splits = {name: split for name, split in splits.items() if split}  # --dev-fraction 0: no dev rows
    all_queries = load_queries(queries)
    questions = {q: all_queries[q] for split in splits.values() for q in split}
    candidates = min(settings.candidates, DEPTH)
    if args.documents:
        documents = document_subset(documents, splits, args.documents, args.seed)

    report: dict = {"splits": {k: len(v) for k, v in splits.items()}, "documents": len(documents), "models": {}}
    for ref in args.models:
        embedder, table, vectors = chunks_and_vectors(ref, args.registry, settings, documents, args.backend)
        runs = retrieve(embedder, table, vectors, questions)
        chunk_document = dict(zip(table["ids"], table["documents"]))
        tune_runs = subset(runs, set(splits["train part"]))
        chosen = choose(sweep(tune_runs, splits["train part"], chunk_document, [candidates]))
        alphas = {"shipped": settings.fusion_alpha, "tuned on train part": chosen["fusion_alpha"]}
        report["models"][ref] = {"chunks": len(table["ids"]), "alphas": alphas, "metrics": {
            label: {split: measure(runs, split_qrels, chunk_document, alpha, candidates)
                    for split, split_qrels in splits.items()} for label, alpha in alphas.items()}}
        print(ref, json.dumps(report["models"][ref]["alphas"]), flush=True)
        if ref.startswith("embedder:") and not args.no_write:  # the registry model's metadata: before / after
            record_in_metadata(Path(resolve_embedding_model(ref, args.registry)), report, ref, args.models[0])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    body = format_report(report, args, candidates)
    print(body)
    if not args.no_write:
        update_section("embedder-adaptation", body)


def format_report(report: dict, args: argparse.Namespace, candidates: int) -> str:
    sizes = ", ".join(f"{name} {n} queries" for name, n in report["splits"].items())
    scope = (f"a fixed subset of {report['documents']} documents (every judged one + random others)"
             if args.documents else f"the full corpus ({report['documents']} documents)")
    lines = ["### Adapting the embedder to the corpus (SciFact; NDCG@10 / Recall@100 over documents)", "",
             f"Over {scope}. Judgments {args.qrels.name} split by query (seed {args.seed}, "
             f"dev {args.dev_fraction:.0%}): {sizes}. "
             f"Hybrid = convex fusion over {candidates} candidates per retriever, at the shipped alpha and at the "
             f"alpha re-tuned on the train part ({OBJECTIVE}). Dense is exact cosine search over every chunk; "
             f"embeddings by the {args.backend} backend.", "",
             "| model | chunks | alpha | split | bm25 | dense | hybrid |", "|---|---|---|---|---|---|---|"]
    for ref, entry in report["models"].items():
        for label, by_split in entry["metrics"].items():
            for split, m in by_split.items():
                cells = " | ".join(f"{m[k]['ndcg@10']:.4f} / {m[k]['recall@100']:.4f}"
                                   for k in ("bm25", "dense", "hybrid"))
                lines.append(f"| {ref} | {entry['chunks']} | {entry['alphas'][label]} ({label}) | {split} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
