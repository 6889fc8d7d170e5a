"""Answer generation from a packed prompt: greedy decoding, bounded in tokens and wall-clock time.

Text can be streamed as it is decoded (``on_text``) and a generation cancelled from another thread
(``cancel``); both are what the HTTP layer's streamed answers and disconnecting clients use.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from generation.loading import LoadedGenerator
from generation.grounding import Thresholds
from generation.prompt import ABSTAIN_ANSWER, PackedPrompt, stop_token_ids


@dataclass
class GenerationResult:
    text: str
    n_prompt_tokens: int
    n_new_tokens: int
    finish_reason: str = "stop"  # "stop" (end of turn), "length" (max_new_tokens), "timeout" or "cancelled"
    elapsed_s: float = 0.0
    abstain_preference: float | None = None  # first-token logit of the abstention minus the best other one
    # log-probabilities of the generated tokens (end of turn excluded), under the model's own distribution
    token_logprobs: list[float] = field(default_factory=list)

    @property
    def mean_logprob(self) -> float | None:
        return sum(self.token_logprobs) / len(self.token_logprobs) if self.token_logprobs else None


class Generator(Protocol):
    """The interface every backend offers (LoadedGenerator in-process, generation.vllm_backend.VllmGenerator):
    what a prompt is packed for (``tokenizer``, ``context_window``), its calibrated ``grounding`` thresholds,
    the ``prompt_template_version`` its prompts are packed with (its adapter's, else the current one), its
    calibrated ``abstain_margin``, and ``generate`` (greedy; see :func:`generate_answer` for the arguments)."""

    tokenizer: Any
    context_window: int
    grounding: Thresholds
    prompt_template_version: str
    abstain_margin: float

    def generate(self, packed: PackedPrompt, *, max_new_tokens: int, timeout_s: float | None = None,
                 abstain_margin: float | None = None, on_text: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None) -> GenerationResult: ...


def abstain_token_id(tokenizer: Any) -> int:
    """The first token of :data:`ABSTAIN_ANSWER` as the model writes it at the start of its answer."""
    return cast(int, tokenizer(ABSTAIN_ANSWER, add_special_tokens=False).input_ids[0])


class AbstainMargin(LogitsProcessor):
    """On the first answer token only: records how much the model prefers to start the abstention
    (its logit minus the best other token's) and lowers that logit by ``margin``.

    Greedy decoding then abstains only when the model preferred it by more than ``margin``: the
    generative form of SQuAD 2.0's null-score threshold, calibrated per adapter on held-out questions.
    """

    def __init__(self, token_id: int, margin: float, prompt_length: int) -> None:
        self.token_id, self.margin, self.prompt_length = token_id, margin, prompt_length
        self.preference: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] != self.prompt_length:  # (batch=1, length)
            return scores
        row = scores[0]
        others = torch.cat([row[: self.token_id], row[self.token_id + 1:]])
        self.preference = float(row[self.token_id] - others.max())
        if self.margin:
            adjusted = scores.clone()
            adjusted[:, self.token_id] -= self.margin
            return cast(torch.FloatTensor, adjusted)  # clone() of a FloatTensor is typed as a plain Tensor
        return scores


class TextDeltas(BaseStreamer):
    """Calls ``on_text`` with each new piece of the decoded answer (end-of-turn tokens left out).

    The whole answer is decoded again at each token and only what was added is passed on, so
    multi-byte characters split across tokens arrive whole and the deltas join to the final text.
    """

    def __init__(self, tokenizer: Any, stops: list[int], on_text: Callable[[str], None]) -> None:
        self.tokenizer, self.stops, self.on_text = tokenizer, set(stops), on_text
        self.ids: list[int] = []
        self.sent = ""
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() passes the prompt first
            self._prompt_seen = True
            return
        self.add(value.reshape(-1).tolist())

    def add(self, token_ids: list[int]) -> None:
        """New answer tokens (any backend); passes on the text they add."""
        self.ids.extend(t for t in token_ids if t not in self.stops)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete character: wait for its next byte
            return
        text = text.lstrip()
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text

    def end(self) -> None:
        pass


class Cancelled(StoppingCriteria):
    """Stops generation once ``event`` is set (a client went away)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        stop = torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
        return cast(torch.BoolTensor, stop)  # torch.full(dtype=torch.bool) is typed as a plain Tensor


def generate_answer(
    loaded: LoadedGenerator,
    packed: PackedPrompt,
    *,
    max_new_tokens: int,
    timeout_s: float | None = None,
    abstain_margin: float | None = None,
    on_text: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
) -> GenerationResult:
    """Greedy-decode an answer to ``packed``; stops at EOS / end of turn, ``max_new_tokens``, ``timeout_s``
    or when ``cancel`` is set.

    ``abstain_margin`` (default: the generator's calibrated one) is what the abstention must win by on
    the first token (see :class:`AbstainMargin`). On timeout (or cancellation) the text generated so far
    is returned with ``finish_reason="timeout"`` (``"cancelled"``). ``on_text`` receives the answer's
    text as it is decoded (see :class:`TextDeltas`).
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
    margin = loaded.abstain_margin if abstain_margin is None else abstain_margin
    abstain = AbstainMargin(abstain_token_id(tokenizer), margin, input_ids.shape[1])

    stopping = StoppingCriteriaList([Cancelled(cancel)] if cancel is not None else [])
    streamer = TextDeltas(tokenizer, stops, on_text) if on_text is not None else None

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
            logits_processor=LogitsProcessorList([abstain]),
            stopping_criteria=stopping,
            streamer=streamer,
            output_logits=True,
            return_dict_in_generate=True,
        )
    elapsed = time.perf_counter() - start
    new_ids = output.sequences[0, input_ids.shape[1]:].tolist()  # (n_new,), end-of-turn token included
    n_new = len(new_ids)
    # output.logits: n_new tensors (1, vocab), raw (before the abstention margin), one per generated token
    logprobs = [float(torch.log_softmax(step[0].float(), dim=-1)[token]) for step, token in zip(output.logits, new_ids)]

    if new_ids and new_ids[-1] in stops:
        finish_reason = "stop"
    elif cancel is not None and cancel.is_set():
        finish_reason = "cancelled"
    elif n_new >= max_new_tokens:
        finish_reason = "length"
    else:
        finish_reason = "timeout" if timeout_s is not None else "stop"
    while new_ids and new_ids[-1] in stops:
        new_ids.pop()
    logprobs = logprobs[: len(new_ids)]
    text = tokenizer.decode(new_ids, skip_special_tokens=True).strip()
    return GenerationResult(
        text=text,
        n_prompt_tokens=packed.n_tokens,
        n_new_tokens=n_new,
        finish_reason=finish_reason,
        elapsed_s=elapsed,
        abstain_preference=abstain.preference,
        token_logprobs=logprobs,
    )
