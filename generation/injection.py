"""Defusing prompt injection through documents (OWASP LLM01): retrieved text can never open a turn.

Chunks are data written by whoever wrote the documents, and the prompt packer (generation/prompt.py) puts
them inside the user turn. Before that, :func:`neutralize_context` takes out of the text everything that
could end the turn or start another one, or impersonate the prompt's own layout:

1. special tokens: every added token of the generator's tokenizer (ChatML's ``<|im_start|>``,
   ``<|im_end|>``, ``<|endoftext|>``, ...) and the turn markers of other common chat templates
   (``<|eot_id|>``, ``<|start_header_id|>``, ``[INST]``, ``<<SYS>>``, ``<start_of_turn>``, ``</s>``, any
   ``<|word|>``) are removed, until none is left (removing one cannot join the pieces of another);
2. prompt-structure tags (``<context>``, ``</context>``, ``<system>``, ``<instructions>``, ...) are removed;
3. role labels (``Assistant: ``, ``### System:``, ``**User:**``, ``Question:`` / ``Answer:`` /
   ``Context:`` of this prompt's layout, and a role word alone on its line, as ChatML leaves
   ``assistant`` once its markers are gone) become ``(assistant)``: the words stay readable, the turn
   shape does not.

Markers and tags are replaced by a line break (what followed them starts a line); the packer then puts
the chunk on one line. The text is only what the model sees: citations and the grounding
checks keep the stored chunk text. :func:`neutralize_question` applies step 1 to the caller's question.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

# Turn markers of common chat templates, whether or not the generator's tokenizer knows them.
_TEMPLATE_MARKER_RE = (
    r"<\|[A-Za-z0-9_.\-]{1,64}\|>"  # ChatML, Llama-3, Phi-3, Granite: <|im_start|>, <|eot_id|>, <|user|>
    r"|\[/?INST\]|<</?SYS>>"  # Llama-2 chat
    r"|</?s>"  # SentencePiece BOS / EOS
    r"|<(?:start|end)_of_turn>"  # Gemma
)
_STRUCTURE_WORDS = ("context|contexts|documents?|passages?|sources?|system|user|assistant|human|instructions?|"
                    "prompt|question|answer|input|output|im_start|im_end")
_STRUCTURE_TAG_RE = re.compile(rf"<\s*/?\s*(?:{_STRUCTURE_WORDS})\b[^<>\n]{{0,80}}>", re.IGNORECASE)
_ROLES = ("system|user|assistant|human|ai|bot|model|developer|tool|function|sys|gpt|chatgpt|"
          "instructions?|context|question|answer")
# A role label: the role word in optional markup (###, **, >, [) followed by ": " anywhere, or alone on its line
# (as ChatML leaves "assistant" once its markers are gone).
_ROLE_LABEL_RE = re.compile(
    rf"(?:[#*>_=|\-\[(][ \t]*)*\b({_ROLES})\b[ \t*_\])]*:[*_]*(?=\s|$)"
    rf"|^[ \t#*>_=|\-\[(]*\b({_ROLES})\b[ \t*_\])]*$",
    re.IGNORECASE | re.MULTILINE)


def special_token_strings(tokenizer: Any) -> tuple[str, ...]:
    """The tokenizer's added tokens that are markup, not words (``<|im_start|>``, ``<filename>``, ``</s>``).

    Added tokens are matched in raw text before byte-pair encoding, so each of them in a chunk would
    become its control id. Added tokens that are plain words or whitespace are text, not markup, and stay.
    """
    added: dict[str, int] = getattr(tokenizer, "get_added_vocab", dict)()
    specials = list(getattr(tokenizer, "all_special_tokens", []))
    markup = {t for t in [*added, *specials] if len(t) > 1 and t.strip() == t and not re.fullmatch(r"\w+", t)}
    return tuple(sorted(markup, key=lambda t: (-len(t), t)))


@lru_cache(maxsize=16)
def _marker_re(special_tokens: tuple[str, ...]) -> re.Pattern[str]:
    literal = "|".join(re.escape(t) for t in special_tokens)  # longest first: no token shadows a longer one
    return re.compile(f"{literal}|{_TEMPLATE_MARKER_RE}" if literal else _TEMPLATE_MARKER_RE)


def _remove_markers(text: str, special_tokens: tuple[str, ...], tags: bool) -> str:
    marker = _marker_re(special_tokens)
    while True:
        cleaned = marker.sub("\n", text)
        if tags:
            cleaned = _STRUCTURE_TAG_RE.sub("\n", cleaned)
        if cleaned == text:
            return text
        text = cleaned


def neutralize_context(text: str, special_tokens: tuple[str, ...] = ()) -> str:
    """``text`` with special tokens, prompt-structure tags and role labels defused (see the module doc).

    ``special_tokens``: :func:`special_token_strings` of the generator's tokenizer. Line breaks are kept.
    """
    text = _remove_markers(text, special_tokens, tags=True)
    return _ROLE_LABEL_RE.sub(lambda m: f"({(m.group(1) or m.group(2)).lower()})", text)


def neutralize_question(text: str, special_tokens: tuple[str, ...] = ()) -> str:
    """The question with special tokens and template markers removed (its words otherwise as asked)."""
    return _remove_markers(text, special_tokens, tags=False)
