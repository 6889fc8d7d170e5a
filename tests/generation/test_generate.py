"""Answer generation: greedy and deterministic, bounded by tokens and time, past the native context."""

from __future__ import annotations

import random

import pytest
import torch

from generation.generate import generate_answer
from generation.grounding import clean_citations, strip_citations
from generation.loading import load_generator
from generation.prompt import ContextChunk, pack_prompt
from tests.generation.conftest import NATIVE
from tests.generation.test_prompt import random_chunks


@pytest.fixture(scope="module")
def scaled(tiny_model_dir):
    return load_generator(str(tiny_model_dir), context_window=2 * NATIVE)


def test_citation_parsing_and_stripping() -> None:
    assert clean_citations("Gustave Eiffel [2]", 3)[1] == [2]
    assert clean_citations("a [3] b [1, 2] c [3] [9] [0]", 3)[1:] == ([3, 1, 2], 2)
    assert clean_citations("no citations", 3)[1] == []
    assert strip_citations("Gustave  Eiffel [2] [1, 3]") == "Gustave Eiffel"


def test_greedy_generation_is_deterministic_and_bounded(scaled) -> None:
    packed = pack_prompt(scaled.tokenizer, "Who built it?", [ContextChunk("Eiffel built it.")],
                         context_window=scaled.context_window, max_new_tokens=8)
    first = generate_answer(scaled, packed, max_new_tokens=8)
    second = generate_answer(scaled, packed, max_new_tokens=8)
    # the checkpoint's generation_config asks for sampling (temperature 0.6); answers stay greedy
    assert first.text == second.text and first.text
    assert first.n_new_tokens == 8 and first.finish_reason == "length"
    assert first.n_prompt_tokens == packed.n_tokens


def test_prompt_beyond_native_context_packs_and_generates(scaled) -> None:
    chunks = random_chunks(random.Random(5), 120, 120)
    packed = pack_prompt(scaled.tokenizer, "Who built the tower?", chunks,
                         context_window=scaled.context_window, max_new_tokens=4)
    assert NATIVE < 0.9 * scaled.context_window < packed.n_tokens <= scaled.context_window - 4
    result = generate_answer(scaled, packed, max_new_tokens=4)
    assert result.n_new_tokens == 4 and result.n_prompt_tokens == packed.n_tokens


def test_stops_at_end_of_turn(tiny_model_dir) -> None:
    loaded = load_generator(str(tiny_model_dir), context_window=NATIVE)
    end_of_turn = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    head = loaded.model.lm_head
    forced = torch.nn.Linear(head.in_features, head.out_features, bias=True)  # end of turn always wins
    with torch.no_grad():
        forced.weight.copy_(head.weight)
        forced.bias.zero_()
        forced.bias[end_of_turn] = 1e4
    loaded.model.lm_head = forced
    packed = pack_prompt(loaded.tokenizer, "Anything?", [], context_window=NATIVE, max_new_tokens=16)
    result = generate_answer(loaded, packed, max_new_tokens=16)
    assert result.finish_reason == "stop" and result.n_new_tokens == 1 and result.text == ""


def test_timeout_returns_partial_answer(scaled) -> None:
    packed = pack_prompt(scaled.tokenizer, "Go on.", [], context_window=scaled.context_window, max_new_tokens=2000)
    result = generate_answer(scaled, packed, max_new_tokens=2000, timeout_s=0.3)
    assert result.finish_reason == "timeout"
    assert 0 < result.n_new_tokens < 2000 and result.elapsed_s < 10


def test_prompt_plus_new_tokens_must_fit_the_window(scaled) -> None:
    packed = pack_prompt(scaled.tokenizer, "Q?", [], context_window=scaled.context_window, max_new_tokens=8)
    with pytest.raises(ValueError, match="context window"):
        generate_answer(scaled, packed, max_new_tokens=scaled.context_window)


def test_abstain_margin_shifts_only_the_first_token_and_records_the_preference() -> None:
    import torch

    from generation.generate import AbstainMargin

    processor = AbstainMargin(token_id=3, margin=2.0, prompt_length=5)
    scores = torch.tensor([[0.0, 1.0, 0.5, 4.0, 2.0]])
    shifted = processor(torch.zeros((1, 5), dtype=torch.long), scores)
    assert processor.preference == 2.0 and shifted[0, 3] == 2.0 and scores[0, 3] == 4.0
    later = processor(torch.zeros((1, 6), dtype=torch.long), scores)
    assert later is scores and processor.preference == 2.0  # the second token is left alone


def test_abstain_token_is_the_first_answer_token_the_model_is_trained_on(smol_tokenizer) -> None:
    from generation.generate import abstain_token_id
    from generation.prompt import ABSTAIN_ANSWER, ContextChunk, build_training_text, pack_prompt

    packed = pack_prompt(smol_tokenizer, "Who?", [ContextChunk(text="Nobody here.", chunk_id="c", document_id="d")],
                         context_window=512, max_new_tokens=16)
    _, labels = build_training_text(smol_tokenizer, packed, ABSTAIN_ANSWER)
    assert next(t for t in labels if t != -100) == abstain_token_id(smol_tokenizer)


class Scripted(torch.nn.Module):
    """The LM head plus ``bias`` on ``script[n]`` at the n-th decoding step: a model that wants to write
    ``script`` whatever the prompt (a new instance per generate call)."""

    def __init__(self, head: torch.nn.Module, script: list[int], bias: float) -> None:
        super().__init__()
        self.head, self.script, self.bias, self.step = head, script, bias, 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        if self.step < len(self.script):
            logits[..., -1, self.script[self.step]] += self.bias
        self.step += 1
        return logits


def test_margin_decides_an_abstention_the_model_prefers_and_the_preference_is_recorded(tiny_model_dir) -> None:
    """A model preferring "I don't know." by about `bias` logits abstains at margin 0, records that preference,
    and writes something else once the margin exceeds it."""
    from generation.generate import abstain_token_id
    from generation.prompt import ABSTAIN_ANSWER, ContextChunk, pack_prompt

    bias = 20.0
    loaded = load_generator(str(tiny_model_dir), context_window=NATIVE)
    tokenizer, head = loaded.tokenizer, loaded.model.lm_head
    script = tokenizer(ABSTAIN_ANSWER, add_special_tokens=False).input_ids + [
        tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert script[0] == abstain_token_id(tokenizer)
    packed = pack_prompt(tokenizer, "Who?", [ContextChunk(text="Nobody.", chunk_id="c", document_id="d")],
                         context_window=NATIVE, max_new_tokens=8)

    def answer(margin: float):
        loaded.model.lm_head = Scripted(head, script, bias)
        return generate_answer(loaded, packed, max_new_tokens=8, abstain_margin=margin)

    abstained = answer(0.0)
    assert abstained.text == ABSTAIN_ANSWER and abstained.finish_reason == "stop"
    preference = abstained.abstain_preference
    assert preference == pytest.approx(bias, abs=2.0)  # the random model's own logits differ by < 2
    assert answer(preference - 0.5).text == ABSTAIN_ANSWER  # still preferred by more than the margin
    answered = answer(preference + 0.5)
    assert answered.abstain_preference == pytest.approx(preference)  # recorded before the margin applies
    assert not answered.text.startswith("I") and answered.text.endswith("don't know.")  # only the first token moved


def test_generation_records_token_logprobs_of_the_answer(scaled) -> None:
    from generation.prompt import ContextChunk, pack_prompt

    packed = pack_prompt(scaled.tokenizer, "Who?", [ContextChunk(text="Nobody.", chunk_id="c", document_id="d")],
                         context_window=scaled.context_window, max_new_tokens=6)
    result = generate_answer(scaled, packed, max_new_tokens=6)
    assert result.token_logprobs and all(lp <= 0 for lp in result.token_logprobs)
    # one per generated token; an end-of-turn token, when generated, is not part of the answer
    expected = result.n_new_tokens - (result.finish_reason == "stop")
    assert len(result.token_logprobs) == expected
    assert result.mean_logprob == sum(result.token_logprobs) / len(result.token_logprobs)


def test_streamed_text_joins_to_the_answer(scaled) -> None:
    from generation.prompt import ContextChunk, pack_prompt

    packed = pack_prompt(scaled.tokenizer, "Who?", [ContextChunk(text="Nobody.", chunk_id="c", document_id="d")],
                         context_window=scaled.context_window, max_new_tokens=12)
    deltas: list[str] = []
    result = scaled.generate(packed, max_new_tokens=12, on_text=deltas.append)
    assert len(deltas) > 1 and "".join(deltas) == result.text
    assert result.text == generate_answer(scaled, packed, max_new_tokens=12).text  # streaming changes nothing


def test_cancelling_stops_generation_at_the_next_token(scaled) -> None:
    import threading

    from generation.prompt import pack_prompt

    packed = pack_prompt(scaled.tokenizer, "Go on.", [], context_window=scaled.context_window, max_new_tokens=500)
    cancel = threading.Event()
    seen: list[str] = []

    def leave_after_three(text: str) -> None:
        seen.append(text)
        if len(seen) == 3:
            cancel.set()  # what a disconnecting client's stream does

    result = generate_answer(scaled, packed, max_new_tokens=500, on_text=leave_after_three, cancel=cancel)
    assert result.finish_reason == "cancelled" and result.n_new_tokens < 20
