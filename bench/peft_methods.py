"""Every PEFT method on equal footing: the same rows, seed and wall-clock budget, then scored the same way.

Each method trains with `rag train` on its committed config (configs/train/smollm2-squad[-METHOD].yaml), the
same overrides for all: ``train_rows`` (the same articles, paragraphs and questions; prompt and prefix tuning
pack the same contexts into the window their virtual tokens leave), ``seed``, ``time_budget_minutes`` with
the ``cosine_time`` schedule, and a step cap of ``--max-epochs`` passes over the rows (one, as the shipped
config; at full size the budget ends every run first; warmup is 5% of the cap). Each adapter is scored with
`rag eval generation`, the serving path, with one abstention margin for all: gold-paragraph F1 / EM
(dev-v1.1), retrieval-mode F1 (dev-v1.1 indexed) and abstention on SQuAD 2.0 (dev-v2.0 questions over the
dev-v1.1 articles: answerable / unanswerable). The base model is the first row (scored the same way; its
validation loss computed on the same held-out rows). ``merge`` loads each adapter merged and unmerged and
reports the largest first-token logit difference over a few prompts, or the refusal.

One table goes to BENCHMARKS.md (section ``peft-methods``), a figure to docs/img/peft_methods.png, the raw
numbers to .cache/bench/peft_methods/results.json (``--reuse`` skips methods already there).

    python bench/peft_methods.py --budget-minutes 20 --rows 640 --questions 100
    python bench/peft_methods.py --budget-minutes 1 --rows 8 --questions 10 --train-files small.json \\
        --no-write --plot /tmp/peft.png --work /tmp/peft-smoke   # a smoke run, nothing written
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import CACHE, REPO, update_section

SQUAD = REPO.parent / "shared" / "data" / "squad"
CONFIGS = REPO / "configs" / "train"
METHODS = {  # method -> committed config
    "lora": "smollm2-squad.yaml",
    "qlora": "smollm2-squad-qlora.yaml",
    "lora-8bit": "smollm2-squad-lora-8bit.yaml",
    "dora": "smollm2-squad-dora.yaml",
    "ia3": "smollm2-squad-ia3.yaml",
    "prompt_tuning": "smollm2-squad-prompt-tuning.yaml",
    "prefix_tuning": "smollm2-squad-prefix-tuning.yaml",
}
EVALS = {  # name -> (data file, mode, corpus files)
    "gold": ("dev-v1.1.json", "gold", []),
    "retrieval": ("dev-v1.1.json", "retrieval", []),
    "squad2": ("dev-v2.0.json", "retrieval", ["dev-v1.1.json"]),
}
MERGE_PROMPTS = [("How many vacation days do employees get per year?",
                  "Employees get 28 vacation days per year; up to 5 unused days carry over into the next year."),
                 ("When did the harbor open?", "The harbor of Lumen opened in 1852. Its lighthouse is red."),
                 ("Who wrote the report?", "The report on river levels was written by the survey office.")]


def cli(*args: str, log: Path) -> None:
    command = [sys.executable, "-m", "app.cli", *args]
    print("+", " ".join(command), flush=True)
    with log.open("w") as handle:
        done = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}), see {log}:\n" + log.read_text()[-3000:])


def overrides(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """What every method shares: rows, seed, budget, the step cap (``--max-epochs`` passes over the rows)."""
    from generation.finetune.config import TrainConfig

    committed = TrainConfig.from_yaml(CONFIGS / METHODS[method])
    steps = max(1, round(args.max_epochs * args.rows / (committed.batch_size * committed.grad_accumulation)))
    values: dict[str, Any] = {"name": f"bench-{method.replace('_', '-')}", "train_rows": args.rows,
                              "seed": args.seed, "time_budget_minutes": args.budget_minutes,
                              "lr_scheduler": "cosine_time", "max_steps": steps}
    if args.threads:
        values["num_threads"] = args.threads
    if args.train_files:
        values["train_files"] = [str(f.resolve()) for f in args.train_files]
    return values


def train(args: argparse.Namespace, method: str, work: Path) -> Path:
    """Train ``method`` into the scratch registry; the published version's folder."""
    sets = overrides(args, method)
    command = ["train", "--config", str(CONFIGS / METHODS[method]), "--registry", str(work / "registry"),
               "--no-activate"]
    for key, value in sets.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    cli(*command, log=work / f"train-{method}.log")
    versions = sorted((work / "registry" / sets["name"]).glob("v*"), key=lambda p: int(p.name[1:]))
    return versions[-1]


def evaluate(args: argparse.Namespace, adapter: str, label: str, work: Path) -> dict[str, dict[str, Any]]:
    """The three scorings of one model (``adapter``: a folder, or 'none')."""
    reports = {}
    for name, (data, mode, corpus) in EVALS.items():
        out = work / f"eval-{label}-{name}.json"
        command = ["eval", "generation", "--data", str(SQUAD / data), "--mode", mode, "--adapter", adapter,
                   "--limit", str(args.questions), "--seed", str(args.seed), "--abstain-margin",
                   str(args.abstain_margin), "--json", str(out)]
        for file in corpus:
            command += ["--corpus", str(SQUAD / file)]
        cli(*command, log=out.with_suffix(".log"))
        report = json.loads(out.read_text())
        report.pop("predictions", None)
        reports[name] = report
    return reports


def merge_check(folder: Path | None) -> str:
    """'yes (max |Δ logit| x)' where the merged adapter gives the unmerged answers, else why not."""
    import torch

    from app.settings import Settings
    from generation.bundled import resolve_generator_model
    from generation.loading import load_generator
    from generation.prompt import ContextChunk, pack_prompt

    if folder is None:
        return "—"
    settings = Settings(_env_file=None)
    model = resolve_generator_model(settings.generator_model, settings.models_path)
    unmerged = load_generator(model, context_window=settings.context_window, adapter_path=str(folder))
    try:
        merged = load_generator(model, context_window=settings.context_window, adapter_path=str(folder),
                                merge_adapter=True)
    except ValueError:
        return "refused (virtual tokens)"
    diff = 0.0
    for question, text in MERGE_PROMPTS:
        packed = pack_prompt(unmerged.tokenizer, question, [ContextChunk(text=text, chunk_id="c", document_id="d")],
                             context_window=unmerged.context_window, max_new_tokens=settings.max_new_tokens)
        ids = torch.tensor([packed.input_ids])
        with torch.no_grad():
            a, b = (g.model(input_ids=ids).logits[0, -1].float() for g in (merged, unmerged))
        diff = max(diff, float((a - b).abs().max()))
    return f"yes (max abs logit diff {diff:.1e})"


def base_validation_loss(args: argparse.Namespace) -> float:
    """The base model's answer-token loss on the held-out rows the LoRA run validated on (from the rows cache)."""
    import torch
    from transformers import AutoTokenizer

    from app.cli.train import FINETUNE_CACHE
    from app.evaluation.indexes import corpus_opener, retrieval_key
    from app.settings import Settings
    from generation.bundled import resolve_generator_model
    from generation.finetune.config import TrainConfig
    from generation.finetune.data import prepare_rows
    from generation.finetune.pipeline import resolve_files
    from generation.finetune.train import RowCollator, answer_loss
    from generation.loading import load_generator

    settings = Settings(_env_file=None)
    config = TrainConfig.from_yaml(CONFIGS / METHODS["lora"], overrides(args, "lora"))
    model_path = resolve_generator_model(config.base_model, settings.models_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rows, _ = prepare_rows(config, tokenizer, resolve_files(config, REPO), FINETUNE_CACHE,
                           open_index=corpus_opener(settings, FINETUNE_CACHE), retrieval_key=retrieval_key(settings))
    base = load_generator(model_path, context_window=config.context_window)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows["validation"]:
            loss, correct, _ = answer_loss(base.model, RowCollator(pad_id=0)([row]))
            total, count = total + float(loss), count + int(correct.numel())
    return total / max(count, 1)


def measure(args: argparse.Namespace, method: str, work: Path) -> dict[str, Any]:
    if method == "base":
        entry: dict[str, Any] = {"val_loss": base_validation_loss(args), "merge": "—"}
        reports = evaluate(args, "none", "base", work)
    else:
        folder = train(args, method, work)
        meta = json.loads((folder / "metadata.json").read_text())
        metrics = meta["metrics"]
        trainable, total = meta["trainable_params"], meta["total_params"]
        entry = {"adapter": str(folder), "trainable": trainable,
                 "trainable_pct": 100 * trainable / (total - trainable),  # of the base's parameters
                 "size_bytes": (folder / "adapter_model.safetensors").stat().st_size,
                 "peak_rss_mb": metrics["peak_rss_mb"], "tokens_per_s": metrics["row_tokens_per_s"],
                 "steps": metrics["steps"], "train_seconds": metrics["train_seconds"],
                 "stopped_by_time_budget": metrics["stopped_by_time_budget"],
                 "val_loss": metrics.get("final_eval_loss", metrics.get("best_eval_loss")),
                 "merge": merge_check(folder)}
        reports = evaluate(args, str(folder), method, work)
    entry.update({"gold_f1": reports["gold"]["f1"], "gold_em": reports["gold"]["em"],
                  "retrieval_f1": reports["retrieval"]["f1"],
                  "abstain_answerable": reports["squad2"]["abstain_answerable"],
                  "abstain_unanswerable": reports["squad2"]["abstain_unanswerable"],
                  "questions": {name: r["n"] + r["n_unanswerable"] for name, r in reports.items()}})
    return entry


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| method | trainable params (count, % of base) | adapter size on disk | peak RSS in training "
             "| training tokens/s | held-out validation loss | gold F1 / EM | retrieval-mode F1 "
             "| abstention (answerable / unanswerable) | merge |", "|" + "---|" * 10]
    for method, e in results.items():
        trained = "trainable" in e
        lines.append(" | ".join([
            f"| {'base model' if method == 'base' else method}",
            f"{e['trainable']:,} ({e['trainable_pct']:.2f}%)" if trained else "—",
            f"{e['size_bytes'] / 2**20:.2f} MiB" if trained else "—",
            f"{e['peak_rss_mb'] / 1024:.1f} GiB" if trained else "—",
            f"{e['tokens_per_s']:.0f}" if trained else "—",
            f"{e['val_loss']:.3f}" if e.get("val_loss") is not None else "—",
            f"{e['gold_f1']:.1f} / {e['gold_em']:.1f}", f"{e['retrieval_f1']:.1f}",
            f"{e['abstain_answerable']:.1f}% / {e['abstain_unanswerable']:.1f}%", f"{e['merge']} |"]))
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [("base model" if m == "base" else m) for m in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(names))
    for offset, key, label in ((-0.2, "gold_f1", "gold F1"), (0.2, "retrieval_f1", "retrieval-mode F1")):
        left.bar([i + offset for i in x], [results[m][key] for m in results], width=0.4, label=label)
    left.set_xticks(list(x), names, rotation=30, ha="right")
    left.set_ylabel("F1")
    left.legend()
    left.set_title("answers (same questions, same scoring)")
    trained = [m for m in results if "trainable" in results[m]]
    right.scatter([results[m]["trainable"] for m in trained], [results[m]["val_loss"] for m in trained])
    for m in trained:
        right.annotate(m, (results[m]["trainable"], results[m]["val_loss"]))
    if results.get("base", {}).get("val_loss") is not None:
        right.axhline(results["base"]["val_loss"], color="grey", linestyle="--", label="base model")
        right.legend()
    right.set_xscale("log")
    right.set_xlabel("trainable parameters")
    right.set_ylabel("held-out validation loss")
    right.set_title("same rows, seed and wall-clock budget")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-minutes", type=float, default=20.0, help="training wall-clock per method")
    parser.add_argument("--rows", type=int, default=640, help="training rows (contexts) built, the same for all")
    parser.add_argument("--questions", type=int, default=100, help="seeded questions per scoring")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-epochs", type=float, default=1.0,
                        help="step cap, in passes over the rows (the budget usually ends training first)")
    parser.add_argument("--train-files", type=Path, nargs="+", default=None,
                        help="SQuAD files to train on instead of the configs' (a small one for a smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in training (default: torch's)")
    parser.add_argument("--abstain-margin", type=float, default=0.0,
                        help="the one abstention margin every model is scored with (logits)")
    parser.add_argument("--work", type=Path, default=CACHE / "peft_methods")
    parser.add_argument("--reuse", action="store_true", help="keep results of methods already measured")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "img" / "peft_methods.png")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.work / "results.json"
    results: dict[str, dict[str, Any]] = json.loads(out.read_text()) if args.reuse and out.is_file() else {}
    for method in ["base", *args.methods]:
        if method not in results:
            results[method] = measure(args, method, args.work)
            out.write_text(json.dumps(results, indent=2) + "\n")
            print(method, json.dumps(results[method]), flush=True)
    results = {m: results[m] for m in ["base", *args.methods]}
    plot(results, args.plot)
    questions = results["base"]["questions"]
    figure = args.plot.relative_to(REPO) if args.plot.is_relative_to(REPO) else args.plot
    body = ("### PEFT methods on equal footing: the same rows, seed and wall-clock budget\n\n"
            f"Each method: {args.rows} training rows, seed {args.seed}, at most {args.budget_minutes:g} min "
            f"or {args.max_epochs:g} pass(es) over the rows (steps: "
            + ", ".join(f"{m} {e['steps']}{'' if e['stopped_by_time_budget'] else ' (rows done)'}"
                        for m, e in results.items() if "steps" in e)
            + "), cosine over the time budget, its committed config otherwise. Scored by `rag eval "
            f"generation` with abstention margin {args.abstain_margin:g}: gold F1 / EM on {questions['gold']} "
            f"dev-v1.1 questions with their paragraph, retrieval-mode F1 on {questions['retrieval']} over the "
            f"indexed dev-v1.1 articles, abstention on {questions['squad2']} dev-v2.0 questions over the same "
            "index. Validation loss: answer tokens of the held-out training articles (best checkpoint). "
            "Adapters trained on a quantized base are scored on the full-precision base, as served by default.\n\n"
            + table(results) + f"\n\n![PEFT methods]({figure})")
    print(body)
    if not args.no_write:
        update_section("peft-methods", body)


if __name__ == "__main__":
    main()
