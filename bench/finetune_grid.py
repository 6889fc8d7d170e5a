"""Equal-rows LoRA grid: learning rate, rank, alpha, dropout and batch x accumulation, one knob at a time.

The budget is rows (contexts with their questions), not minutes: the machine is shared, so equal
minutes would give unequal work. Every point runs `rag train` on the committed config with overrides
(a step-based cosine schedule over rows / (batch x accumulation) steps), into a scratch registry, and is
compared on the held-out validation articles (answer-token loss, teacher-forced exact answers) and on
SQuAD EM / F1 and abstention of one fixed, seeded gold-mode sample of a dev file. Each point's F1 is also
compared with the shipped point's question by question (paired bootstrap, 95% interval), so a difference
the sample cannot resolve is shown as such. Writes a table to BENCHMARKS.md and a PNG of score against
each knob.

    python bench/finetune_grid.py --rows 24 --eval-data ../shared/data/squad/dev-v1.1.json --eval-limit 60 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from common import update_section

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "train" / "smollm2-squad.yaml"
REGISTRY = ROOT / ".cache" / "finetune" / "grid-registry"
PLOT = ROOT / "docs" / "img" / "finetune_grid.png"
SHIPPED = "shipped"
KNOBS = ("learning_rate", "r", "lora_alpha", "lora_dropout", "batch_size", "grad_accumulation")
POINTS: dict[str, dict[str, Any]] = {  # name -> overrides of the committed config (one knob moved)
    SHIPPED: {},
    "lr2e-4": {"learning_rate": 2e-4},
    "lr1e-3": {"learning_rate": 1e-3},
    "r8_alpha16": {"r": 8, "lora_alpha": 16},
    "r32_alpha64": {"r": 32, "lora_alpha": 64},
    "alpha16": {"lora_alpha": 16},
    "alpha64": {"lora_alpha": 64},
    "dropout0": {"lora_dropout": 0.0},
    "dropout0.1": {"lora_dropout": 0.1},
    "ga1": {"grad_accumulation": 1},
    "ga4": {"grad_accumulation": 4},
    "bs2_ga1": {"batch_size": 2, "grad_accumulation": 1},
}
# The plot's panels: which points move each knob (the shipped point sits in every panel).
PANELS = {"learning rate": ("learning_rate", ["lr2e-4", "lr1e-3"]),
          "rank (alpha = 2 x rank)": ("r", ["r8_alpha16", "r32_alpha64"]),
          "alpha (rank 16)": ("lora_alpha", ["alpha16", "alpha64"]),
          "dropout": ("lora_dropout", ["dropout0", "dropout0.1"]),
          "rows per optimizer step": ("rows_per_step", ["ga1", "ga4", "bs2_ga1"])}


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as handle:
        subprocess.run(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, check=True)


def knobs_of(point: str) -> dict[str, Any]:
    config = yaml.safe_load(CONFIG.read_text())
    values = {k: config[k] for k in KNOBS} | POINTS[point]
    values["rows_per_step"] = values["batch_size"] * values["grad_accumulation"]
    return values


def measure(point: str, args: argparse.Namespace, rag: str) -> dict[str, Any]:
    """Train one point and score it: the entry of the results file."""
    name = f"grid-{point}"
    knobs = knobs_of(point)
    sets = {"lr_scheduler": "cosine", "time_budget_minutes": None, "max_steps": args.rows // knobs["rows_per_step"],
            **POINTS[point], "name": name, "num_threads": args.threads, "eval_steps": 1000, "save_best": False}
    cmd = [rag, "train", "--config", str(CONFIG), "--registry", str(REGISTRY), "--no-activate"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    log = args.out.parent / f"{name}.log"
    print(f"{point}: training ({log})", flush=True)
    run(cmd, log)
    version = sorted((REGISTRY / name).glob("v*"), key=lambda p: int(p.name[1:]))[-1]
    meta = json.loads((version / "metadata.json").read_text())
    entry: dict[str, Any] = {"knobs": knobs, "adapter": str(version), **{k: meta["metrics"].get(k) for k in (
        "steps", "examples_seen", "row_tokens_per_s", "train_seconds", "final_eval_loss",
        "final_eval_answer_match", "final_eval_token_accuracy")}}
    if args.eval_data:
        report = args.out.parent / f"{name}-eval.json"
        print(f"{point}: scoring", flush=True)
        run([rag, "eval", "generation", "--data", str(args.eval_data), "--mode", "gold", "--adapter",
             str(version), "--limit", str(args.eval_limit), "--abstain-margin", str(args.abstain_margin),
             "--json", str(report)], log.with_suffix(".eval.log"))
        entry.update(gold_scores(report))
    print(point, json.dumps({k: v for k, v in entry.items() if k != "question_f1"}), flush=True)
    return entry


def gold_scores(report: Path) -> dict[str, Any]:
    """The entry's fields from a `rag eval generation --json` report; F1 per question for the paired test."""
    scores = json.loads(report.read_text())
    return {"gold_em": scores["em"], "gold_f1": scores["f1"], "gold_n": scores["n"],
            "gold_abstain_answerable": scores["abstain_answerable"], "gold_f1_answered": scores["f1_answered"],
            "question_f1": {r["id"]: r["f1"] for r in scores["predictions"]}}


def paired_interval(point: dict[str, float], shipped: dict[str, float], *, seed: int = 0) -> tuple[float, float, float]:
    """F1 of ``point`` minus the shipped point's over the same questions: (mean, 2.5%, 97.5%) by bootstrap."""
    ids = sorted(set(point) & set(shipped))
    diff = 100.0 * np.array([point[i] - shipped[i] for i in ids])
    draws = np.random.default_rng(seed).choice(diff, size=(4000, len(diff))).mean(axis=1)
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=24, help="training rows per point")
    parser.add_argument("--points", nargs="*", default=list(POINTS), choices=list(POINTS))
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per point")
    parser.add_argument("--jobs", type=int, default=1, help="points trained at once (each on --threads)")
    parser.add_argument("--eval-data", type=Path)
    parser.add_argument("--abstain-margin", type=float, default=2.25,
                        help="the same abstention margin for every point (the shipped adapter's)")
    parser.add_argument("--eval-limit", type=int, default=60)
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "finetune" / "grid.json",
                        help="results file; points already in it are not measured again")
    args = parser.parse_args()
    rag = str(Path(sys.executable).parent / "rag")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    todo = [p for p in args.points if p not in results]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for point, entry in zip(todo, pool.map(lambda p: measure(p, args, rag), todo)):
            results[point] = entry
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    results = {p: results[p] for p in POINTS if p in results}
    body = (f"### LoRA grid: every point trains on the same {args.rows} rows (contexts) from the committed config\n\n"
            + table(results) + f"\n\ngold EM / F1: {args.eval_limit} seeded questions of {args.eval_data}, "
            f"abstention margin {args.abstain_margin}; ΔF1: against the shipped point on the same questions, "
            f"mean and 95% paired-bootstrap interval; F1 of answered: over the answerable questions not abstained on. "
            f"Plot: `{PLOT.relative_to(ROOT)}`.")
    print(body)
    if all("gold_f1" in e for e in results.values()):
        plot(results, PLOT)
        print(f"wrote {PLOT}")
    if not args.no_write:
        update_section("finetune-grid", body)


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| point | lr | rank | alpha | dropout | batch x accum. | steps | questions seen | train s "
             "| val loss | val answer match | gold EM | gold F1 | ΔF1 vs shipped [95%] | abstain (answerable) "
             "| F1 of answered |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    shipped = results.get(SHIPPED, {}).get("question_f1")
    for point, e in results.items():
        k = e["knobs"]
        delta = ""
        if shipped and point != SHIPPED and "question_f1" in e:
            mean, low, high = paired_interval(e["question_f1"], shipped)
            delta = f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]"
        gold = (f"{e['gold_em']:.1f} | {e['gold_f1']:.1f}" if "gold_f1" in e else " | ")
        abstain = f"{e['gold_abstain_answerable']:.1f}%" if "gold_f1" in e else ""
        answered = f"{e['gold_f1_answered']:.1f}" if e.get("gold_f1_answered") is not None else ""
        lines.append(f"| {point} | {k['learning_rate']:g} | {k['r']} | {k['lora_alpha']} | {k['lora_dropout']:g} "
                     f"| {k['batch_size']} x {k['grad_accumulation']} | {e['steps']} | {e['examples_seen']} "
                     f"| {e['train_seconds']:.0f} | {e['final_eval_loss']:.3f} | {e['final_eval_answer_match']:.3f} "
                     f"| {gold} | {delta} | {abstain} | {answered} |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.6))
    f1_top = 5 + max(max(e["gold_f1"], e.get("gold_f1_answered") or 0) for e in results.values())
    losses = [e["final_eval_loss"] for e in results.values()]
    for ax, (title, (knob, points)) in zip(axes, PANELS.items()):
        shown = sorted((p for p in [SHIPPED, *points] if p in results), key=lambda p: results[p]["knobs"][knob])
        if not shown:
            ax.set_visible(False)
            continue
        x = [results[p]["knobs"][knob] for p in shown]
        ax.plot(x, [results[p]["gold_f1"] for p in shown], "o-", color="tab:blue", label="gold F1")
        ax.plot(x, [results[p].get("gold_f1_answered") for p in shown], "o:", color="tab:blue", alpha=0.5,
                label="F1 of answered")
        ax.set_ylim(0, f1_top)
        ax.set_ylabel("F1", color="tab:blue")
        loss = ax.twinx()
        loss.plot(x, [results[p]["final_eval_loss"] for p in shown], "s--", color="tab:orange")
        loss.set_ylim(min(losses) - 0.1, max(losses) + 0.1)
        loss.set_ylabel("validation loss", color="tab:orange")
        shipped_x = results[SHIPPED]["knobs"][knob] if SHIPPED in results else None
        if shipped_x is not None:
            ax.axvline(shipped_x, color="grey", linewidth=0.8, linestyle=":")
        if knob == "learning_rate":
            ax.set_xscale("log")
            ax.minorticks_off()
        ax.set_xticks(x, [f"{v:g}" for v in x])
        ax.set_xlabel(title)
        ax.set_title(f"{title} (shipped: {shipped_x:g})" if shipped_x is not None else title, fontsize=9)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("LoRA knobs, one at a time, at equal training rows (F1: blue, left; validation loss: orange, right)",
                 fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
