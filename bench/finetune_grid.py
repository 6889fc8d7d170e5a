"""Equal-budget LoRA grid (learning rate, rank, batch): every point trains on the same number of rows.

The budget is rows (contexts with their questions), not minutes: the machine is shared, so equal
minutes would give unequal work. Every point runs `rag train` on the committed config with overrides
(a step-based cosine schedule over rows / (batch x accumulation) steps), into a scratch registry, and is
compared on the held-out validation articles (answer-token loss, teacher-forced exact answers) and on
SQuAD EM / F1 and abstention of a fixed gold-mode sample of a dev file.

    python bench/finetune_grid.py --rows 24 --eval-data ../shared/data/squad/dev-v1.1.json --eval-limit 60
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import update_section

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "train" / "smollm2-squad.yaml"
REGISTRY = ROOT / ".cache" / "finetune" / "grid-registry"
POINTS = {  # name -> overrides of the committed config
    "lr5e-4_r16_ga2": {},
    "lr2e-4_r16_ga2": {"learning_rate": 2e-4},
    "lr1e-3_r16_ga2": {"learning_rate": 1e-3},
    "lr5e-4_r8_ga2": {"r": 8, "lora_alpha": 16},
    "lr5e-4_r16_ga4": {"grad_accumulation": 4},
    "lr5e-4_r32_ga2": {"r": 32, "lora_alpha": 64},
}


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as handle:
        subprocess.run(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=24, help="training rows per point")
    parser.add_argument("--points", nargs="*", default=list(POINTS))
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-data", type=Path)
    parser.add_argument("--abstain-margin", type=float, default=2.25,
                        help="the same abstention margin for every point (the shipped adapter's)")
    parser.add_argument("--eval-limit", type=int, default=60)
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "finetune" / "grid.json")
    args = parser.parse_args()
    rag = str(Path(sys.executable).parent / "rag")
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for point in args.points:
        if point in results:
            continue
        name = f"grid-{point}"
        overrides = POINTS[point]
        steps = args.rows // overrides.get("grad_accumulation", 2)  # batch_size 1 in the committed config
        sets = {"lr_scheduler": "cosine", "time_budget_minutes": None, "max_steps": steps, **overrides,
                "name": name, "num_threads": args.threads, "eval_steps": 1000}
        cmd = [rag, "train", "--config", str(CONFIG), "--registry", str(REGISTRY), "--no-activate"]
        for key, value in sets.items():
            cmd += ["--set", f"{key}={json.dumps(value)}"]
        log = args.out.parent / f"{name}.log"
        run(cmd, log)
        version = sorted((REGISTRY / name).glob("v*"), key=lambda p: int(p.name[1:]))[-1]
        meta = json.loads((version / "metadata.json").read_text())
        entry = {"overrides": POINTS[point], "adapter": str(version), **{k: meta["metrics"].get(k) for k in (
            "steps", "examples_seen", "row_tokens_per_s", "train_seconds", "final_eval_loss",
            "final_eval_answer_match", "final_eval_token_accuracy")}}
        if args.eval_data:
            report = args.out.parent / f"{name}-eval.json"
            run([rag, "eval", "generation", "--data", str(args.eval_data), "--mode", "gold", "--adapter",
                 str(version), "--limit", str(args.eval_limit), "--abstain-margin", str(args.abstain_margin),
                 "--json", str(report)],
                log.with_suffix(".eval.log"))
            scores = json.loads(report.read_text())
            entry.update({"gold_em": scores["em"], "gold_f1": scores["f1"], "gold_n": scores["n"],
                          "gold_abstain_answerable": scores["abstain_answerable"]})
        results[point] = entry
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(point, json.dumps(entry), flush=True)
    body = (f"### LoRA grid: every point trains on the same {args.rows} rows (contexts) from the committed config\n\n"
            + table(results) + f"\n\ngold EM / F1: {args.eval_limit} seeded questions of {args.eval_data}, "
            f"abstention margin {args.abstain_margin}.")
    print(body)
    if not args.no_write:
        update_section("finetune-grid", body)


def table(results: dict) -> str:
    lines = ["| point | steps | questions seen | train s | val loss | val answer match | gold EM | gold F1 "
             "| gold abstain (answerable) |", "|---|---|---|---|---|---|---|---|---|"]
    for point, e in results.items():
        lines.append(f"| {point} | {e['steps']} | {e['examples_seen']} | {e['train_seconds']} | "
                     f"{e['final_eval_loss']:.3f} | {e['final_eval_answer_match']:.3f} | "
                     f"{e.get('gold_em', '')} | {e.get('gold_f1', '')} | {e.get('gold_abstain_answerable', '')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
