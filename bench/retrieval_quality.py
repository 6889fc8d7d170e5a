"""Retrieval quality for BENCHMARKS.md: SciFact (BM25, dense, both hybrids) and chunking on whole SQuAD articles.

Runs the same code as `rag eval retrieval` and `rag eval chunking` (indexes cached under .cache/eval, so
a second run only re-asks the questions) and writes the two tables. The SciFact run uses the service's
settings, tuning file included; pass --tune to re-tune on the given judgments first.

    python bench/retrieval_quality.py [--qrels ../shared/data/scifact/qrels/train.tsv] [--tune]
        [--squad ../shared/data/squad/dev-v1.1.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import REPO, SCIFACT, update_section

from app.settings import Settings
from app.evaluation.chunking import evaluate_chunking, format_chunking
from app.evaluation.retrieval import evaluate, format_table

SQUAD = REPO.parent / "shared" / "data" / "squad" / "dev-v1.1.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qrels", type=Path, default=SCIFACT / "qrels" / "train.tsv")
    parser.add_argument("--tune", action="store_true", help="re-tune fusion on --qrels (rewrites the tuning file)")
    parser.add_argument("--squad", type=Path, default=SQUAD)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    settings = Settings()

    report = evaluate(SCIFACT / "corpus.jsonl", SCIFACT / "queries.jsonl", args.qrels, settings,
                      split_name=f"SciFact {args.qrels.stem}", tune=args.tune,
                      plot_out=REPO / "docs" / "img" / "fusion_tuning.png" if args.tune else None)
    retrieval = ("### Retrieval quality (NDCG@10, Recall@100, MRR@10 over documents; a document ranks at its best "
                 "chunk)\n\n" + format_table(report))
    chunking_report = evaluate_chunking(args.squad, settings)
    semantic, fixed = (chunking_report["chunkers"][k] for k in ("semantic", "fixed"))
    chunking = ("### Chunking on long documents: answer recall@k (a top-k chunk contains a gold answer)\n\n"
                + format_chunking(chunking_report)
                + f"\n\nMean chunk size: semantic {semantic['mean_tokens']:.0f} tokens, "
                  f"fixed {fixed['mean_tokens']:.0f} "
                  f"(same limit, {semantic['effective_limit_tokens']} tokens, and overlap): at equal k the fixed "
                  f"windows put more text in front of the generator.")
    print(retrieval, "\n\n", chunking, sep="")
    if not args.no_write:
        update_section("retrieval", retrieval)
        update_section("chunking", chunking)


if __name__ == "__main__":
    main()
