"""Answer generation from a packed prompt: greedy decoding, bounded in tokens and wall-clock time."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from generation.loading import LoadedGenerator
from generation.prompt import CITATION_RE, PackedPrompt, stop_token_ids


@dataclass
class GenerationResult:
    text: str
    n_prompt_tokens: int
    n_new_tokens: int
    finish_reason: str = "stop"  # "stop" (end of turn), "length" (max_new_tokens) or "timeout"
    elapsed_s: float = 0.0


def generate_answer(
    loaded: LoadedGenerator,
    packed: PackedPrompt,
    *,
    max_new_tokens: int,
    timeout_s: float | None = None,
) -> GenerationResult:
    """Greedy-decode an answer to ``packed``; stops at EOS / end of turn, ``max_new_tokens`` or ``timeout_s``.

    On timeout the text generated so far is returned with ``finish_reason="timeout"``.
    """
    if packed.n_tokens + max_new_tokens > loaded.context_window:
        raise ValueError(
            f"{packed.n_tokens} prompt + {max_new_tokens} new tokens exceed the "
            f"{loaded.context_window}-token context window"
        )
    model, tokenizer = loaded.model, loaded.tokenizer
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    input_ids = torch.tensor([packed.input_ids], dtype=torch.long, device=device)  # (1, n_prompt)

    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            # sampling defaults some checkpoints ship (Llama-2: temperature 0.6, top_p 0.9) do not apply
            temperature=None,
            top_p=None,
            top_k=None,
            num_beams=1,
            eos_token_id=stops,
            pad_token_id=pad_id,
            max_time=timeout_s,
        )
    elapsed = time.perf_counter() - start
    new_ids = output[0, input_ids.shape[1]:].tolist()  # (n_new,), end-of-turn token included
    n_new = len(new_ids)

    if new_ids and new_ids[-1] in stops:
        finish_reason = "stop"
    elif n_new >= max_new_tokens:
        finish_reason = "length"
    else:
        finish_reason = "timeout" if timeout_s is not None else "stop"
    while new_ids and new_ids[-1] in stops:
        new_ids.pop()
    text = tokenizer.decode(new_ids, skip_special_tokens=True).strip()
    return GenerationResult(
        text=text,
        n_prompt_tokens=packed.n_tokens,
        n_new_tokens=n_new,
        finish_reason=finish_reason,
        elapsed_s=elapsed,
    )


def cited_refs(text: str, n_chunks: int) -> list[int]:
    """Citations ``[n]`` (or ``[n, m]``) in ``text`` that name an included chunk, 1-based, first-seen order."""
    refs: list[int] = []
    for match in CITATION_RE.finditer(text):
        for part in match.group(1).split(","):
            ref = int(part)
            if 1 <= ref <= n_chunks and ref not in refs:
                refs.append(ref)
    return refs


def strip_citations(text: str) -> str:
    """The answer without its ``[n]`` citations, whitespace collapsed (for exact-match / F1 scoring)."""
    return " ".join(CITATION_RE.sub(" ", text).split())
