"""Grounded or silent, measured: `rag eval generation` for the adapter and the base model on the same questions.

Four settings on held-out SQuAD articles (the shared dev files; the training side never sees them):

- gold: each question with its own paragraph (dev-v1.1);
- retrieval: the dev-v1.1 articles indexed, the service's retriever picks the chunks;
- SQuAD 2.0 retrieval: dev-v2.0 questions (about half unanswerable) over the dev-v1.1 articles;
- out of corpus: dev-v1.1 questions asked of an index of the training articles only (every question should
  abstain).

Every answer goes through the serving path's grounding decision. The table goes to BENCHMARKS.md
(section ``grounding``); the per-question reports to ``.cache/bench/grounding/``.

    python bench/grounding.py --limit 100 --ooc-limit 100
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import CACHE, REPO, update_section

SQUAD = REPO.parent / "shared" / "data" / "squad"
RUNS = {  # name -> (data file, mode, corpus files)
    "gold (dev-v1.1)": ("dev-v1.1.json", "gold", []),
    "retrieval (dev-v1.1)": ("dev-v1.1.json", "retrieval", []),
    "SQuAD 2.0 retrieval (dev-v2.0 over dev-v1.1 articles)": ("dev-v2.0.json", "retrieval", ["dev-v1.1.json"]),
    "out of corpus (dev-v1.1 over the training articles)": ("dev-v1.1.json", "retrieval", ["train-v1.1.json"]),
}
COLUMNS = [("em", "EM"), ("f1", "F1"), ("abstain_answerable", "abstains: answerable"),
           ("abstain_unanswerable", "abstains: unanswerable"), ("abstain_out_of_corpus", "abstains: out of corpus"),
           ("out_of_corpus_answered_right", "out of corpus, answered right"),
           ("citation_valid", "citation valid"), ("citation_valid_generated", "valid before verification"),
           ("citation_precision", "citation precision"), ("unsupported_rate", "unsupported"),
           ("answer_in_context", "answer in context")]


def run(name: str, adapter: str, limit: int, out_dir: Path, reuse: bool) -> dict:
    data, mode, corpus = RUNS[name]
    out = out_dir / f"{adapter}-{mode}-{data}-{'-'.join(corpus) or 'own'}-{limit}.json"
    if reuse and out.is_file():
        report = json.loads(out.read_text())
        report.pop("predictions", None)
        return report
    command = [sys.executable, "-m", "app.cli", "eval", "generation", "--data", str(SQUAD / data), "--mode", mode,
               "--adapter", adapter, "--limit", str(limit), "--json", str(out)]
    for file in corpus:
        command += ["--corpus", str(SQUAD / file)]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True)
    report = json.loads(out.read_text())
    report.pop("predictions", None)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="smollm2-squad")
    parser.add_argument("--limit", type=int, default=100, help="Seeded questions per in-corpus setting (both models).")
    parser.add_argument("--ooc-limit", type=int, default=100, help="Seeded out-of-corpus questions (both models).")
    parser.add_argument("--models", nargs="+", default=None,
                        help="Adapters to run ('none' = the base model); default: --adapter and none.")
    parser.add_argument("--reuse", action="store_true", help="Reuse reports of earlier runs with the same settings.")
    parser.add_argument("--run-only", action="store_true", help="Run, but leave BENCHMARKS.md alone.")
    parser.add_argument("--runs", nargs="*", default=list(RUNS), help="Settings to run (default: all).")
    args = parser.parse_args()
    out_dir = CACHE / "grounding"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.runs:
        for adapter in args.models or [args.adapter, "none"]:
            limit = args.ooc_limit if name.startswith("out of corpus") else args.limit
            report = run(name, adapter, limit, out_dir, args.reuse)
            rows.append((name, adapter if adapter != "none" else "base model", report))
    header = "| setting | model | questions | " + " | ".join(label for _, label in COLUMNS) + " | reasons |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 4)]
    for name, model, report in rows:
        n = report["n"] + report["n_unanswerable"] + report["n_out_of_corpus"]
        cells = ["" if report.get(key) is None else f"{report[key]:.1f}" for key, _ in COLUMNS]
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(report.get("abstain_reasons", {}).items()))
        lines.append(f"| {name} | {model} | {n} | " + " | ".join(cells) + f" | {reasons} |")
    grounding = rows[0][2].get("grounding") if rows else {}
    table = "\n".join(lines)
    print(table)
    if args.run_only:
        return
    body = ("### Grounded or silent: the shipped profile, adapter against base model\n\n"
            "Thresholds served for the adapter (its metadata, from `rag adapters calibrate`): "
            f"`{json.dumps(grounding)}`, "
            f"abstention margin {rows[0][2].get('abstain_margin') if rows else ''}; reranker "
            f"{rows[0][2].get('reranker') if rows else ''}. The base model has no calibration and is served with "
            "the defaults (support check only).\n\n" + table)
    update_section("grounding", body)


if __name__ == "__main__":
    main()
