"""The demo questions through a real service over the demo corpus, with grounding, against a baseline tree.

Each question in demo/questions.jsonl goes to ``POST /query`` (FastAPI TestClient, real models, real Chroma)
``--repeat`` times; the table gives what came back (answer, abstention and its reason, the cited document)
and the /query latency. With ``--baseline-tree DIR`` (for example a ``git worktree`` of the commit before
grounding), the same script runs once more in a subprocess with that tree's packages (and adapters)
first on ``sys.path`` (checked), and both are tabulated side by side. A tree without the ``cited``
field gets its answer checked, not its citation.

    git worktree add /tmp/rag-baseline <commit> && python bench/demo_queries.py --baseline-tree /tmp/rag-baseline
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, percentiles, update_section

QUESTIONS = REPO / "demo" / "questions.jsonl"


def measure(repeat: int) -> dict:
    from fastapi.testclient import TestClient

    import app
    from app.cli.common import DEMO_CORPUS
    from app.container import build_services
    from app.main import create_app
    from app.settings import Settings
    from ingestion.loaders import load_documents

    code = Path(app.__file__).resolve().parent.parent  # the tree under test: its adapters, its models cache

    cases = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(_env_file=None, data_dir=Path(data_dir), model_cache_dir=REPO / ".cache" / "models",
                            adapters_dir=code / "adapters")
        services = build_services(settings)
        services.indexer().apply(load_documents([DEMO_CORPUS]))
        rows, latencies = [], []
        with TestClient(create_app(settings, services=services)) as client:
            client.post("/query", json={"question": "warm-up"})
            for case in cases:
                for attempt in range(repeat):
                    started = time.perf_counter()
                    body = client.post("/query", json={"question": case["question"]}).json()
                    latencies.append(1000 * (time.perf_counter() - started))
                cited = [body["citations"][r - 1]["document_id"] for r in body.get("cited", [])
                         if 0 < r <= len(body["citations"])]
                rows.append({**case, "returned": body["answer"], "abstained": body.get("abstained"),
                             "reason": body.get("abstain_reason"), "cited_documents": cited})
        services.ledger.close()
    p50, p95 = percentiles(latencies)
    return {"rows": rows, "p50_ms": p50, "p95_ms": p95, "requests": len(latencies)}


def correct(row: dict) -> bool:
    if not row["answerable"]:
        return row["returned"] == "I don't know."
    return (row["answer"].lower() in row["returned"].lower() and row["returned"] != "I don't know."
            and row.get("document_id") in (row.get("cited_documents") or [row.get("document_id")]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline-tree", type=Path)
    parser.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)  # the baseline subprocess
    args = parser.parse_args()
    if args.json_only:
        # bench/common.py put this checkout first on sys.path: the baseline tree goes first instead
        tree = Path(os.environ["RAG_BENCH_TREE"]).resolve()
        sys.path = [str(tree)] + [p for p in sys.path if Path(p or ".").resolve() != REPO.resolve()]
        result = measure(args.repeat)
        import app

        print(json.dumps({**result, "code": str(Path(app.__file__).resolve().parent.parent)}))
        return
    runs = {"grounded (this tree)": measure(args.repeat)}
    if args.baseline_tree:
        env = {**os.environ, "RAG_BENCH_TREE": str(args.baseline_tree.resolve())}
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--json-only", "--repeat",
                              str(args.repeat)], env=env, cwd=args.baseline_tree, check=True,
                             capture_output=True, text=True).stdout
        baseline = json.loads(out.strip().splitlines()[-1])
        if Path(baseline["code"]) != args.baseline_tree.resolve():
            raise SystemExit(f"the baseline run imported {baseline['code']}, not {args.baseline_tree}")
        runs[f"baseline ({args.baseline_tree.name})"] = baseline
    names = list(runs)
    lines = ["| question | answerable | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for i, case in enumerate(runs[names[0]]["rows"]):
        cells = []
        for name in names:
            row = runs[name]["rows"][i]
            reason = f" ({row['reason']})" if row.get("reason") else ""
            mark = "ok" if correct(row) else "WRONG"
            cells.append(f"{row['returned']}{reason} — {mark}")
        lines.append(f"| {case['question']} | {'yes' if case['answerable'] else 'no'} | " + " | ".join(cells) + " |")
    lines.append("| **/query p50 / p95 ms** | | " + " | ".join(
        f"{runs[n]['p50_ms']:.0f} / {runs[n]['p95_ms']:.0f} ({runs[n]['requests']} requests)" for n in names) + " |")
    lines.append("| **correct** | | " + " | ".join(
        f"{sum(correct(r) for r in runs[n]['rows'])} / {len(runs[n]['rows'])}" for n in names) + " |")
    table = "\n".join(lines)
    print(table)
    if args.baseline_tree:
        ratio = runs[names[0]]["p50_ms"] / runs[names[1]]["p50_ms"]
        table += f"\n\n/query p50, grounded / baseline: {ratio:.2f}x."
    update_section("demo-queries", "### The demo questions, grounded against the baseline\n\n" + table)


if __name__ == "__main__":
    main()
