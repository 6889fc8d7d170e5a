"""Equal-budget LoRA grid (learning rate, rank, batch): each point trains for the same wall-clock minutes.

Every point runs `rag train` on the committed config with overrides, into a scratch registry, and is
compared on the held-out validation articles (answer-token loss and teacher-forced exact answers, from
the run's metadata) and, optionally, on SQuAD EM / F1 of a gold-mode sample of a dev file.

    python bench/finetune_grid.py --minutes 8 --eval-data ../shared/data/squad/dev-v1.1.json --eval-limit 60
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "train" / "smollm2-squad.yaml"
REGISTRY = ROOT / ".cache" / "finetune" / "grid-registry"
POINTS = {  # name -> overrides of the committed config
    "lr5e-4_r16_ga2": {},
    "lr2e-4_r16_ga2": {"learning_rate": 2e-4},
    "lr1e-3_r16_ga2": {"learning_rate": 1e-3},
    "lr5e-4_r8_ga2": {"r": 8, "lora_alpha": 16},
    "lr5e-4_r32_ga2": {"r": 32, "lora_alpha": 64},
    "lr5e-4_r16_ga4": {"grad_accumulation": 4},
}


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as handle:
        subprocess.run(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--points", nargs="*", default=list(POINTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-data", type=Path)
    parser.add_argument("--eval-limit", type=int, default=60)
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "finetune" / "grid.json")
    args = parser.parse_args()
    rag = str(Path(sys.executable).parent / "rag")
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for point in args.points:
        if point in results:
            continue
        name = f"grid-{point}"
        sets = {**POINTS[point], "name": name, "time_budget_minutes": args.minutes, "num_threads": args.threads,
                "eval_steps": 1000}
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
                 str(version), "--limit", str(args.eval_limit), "--json", str(report)], log.with_suffix(".eval.log"))
            scores = json.loads(report.read_text())
            entry.update({"gold_em": scores["em"], "gold_f1": scores["f1"], "gold_n": scores["n"]})
        results[point] = entry
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(point, json.dumps(entry), flush=True)
    print(table(results))


def table(results: dict) -> str:
    lines = ["| point | steps | questions seen | row tok/s | val loss | val answer match | gold EM | gold F1 |",
             "|---|---|---|---|---|---|---|---|"]
    for point, e in results.items():
        lines.append(f"| {point} | {e['steps']} | {e['examples_seen']} | {e['row_tokens_per_s']} | "
                     f"{e['final_eval_loss']:.3f} | {e['final_eval_answer_match']:.3f} | "
                     f"{e.get('gold_em', '')} | {e.get('gold_f1', '')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
