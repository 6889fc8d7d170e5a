"""Cut Documents into Chunks: structure first (Markdown sections), then meaning (sentence similarity).

A document is split into sections at ATX headings; each section into sentences. A section that fits in
one chunk is one chunk. A longer one is cut where neighbouring sentences are far apart in embedding
space (distance above the document's ``breakpoint_percentile``) or where the next sentence would pass
the token limit. ``fixed_size_chunks`` is the plain token-window baseline of the same size and overlap.

Decisions:
- Chunk text is ``"<context header>\\n" + a verbatim slice of the section body``. The header is the
  document title and section path ("Guide > Install > Linux"), so a chunk cut from the middle of a
  section still names what it is about, for BM25, the encoder and the generator alike. It counts
  toward the limit and is capped at a quarter of it; ``context_header=False`` leaves it out.
- The limit is ``min(max_tokens, embedder.max_passage_tokens)`` and holds for
  ``embedder.count_tokens(chunk.text)`` of every chunk, header and overlap included: the encoder never
  truncates a chunk.
- Sentences are embedded only in sections longer than one chunk, in one batched call per document
  (``chunk_many``: per batch of documents), so short documents cost a tokenizer pass and no model
  call. The percentile is taken over the distances inside those sections (distances across section
  boundaries mean nothing: sections are hard boundaries anyway).
- ``breakpoint_vectors="encoder"`` embeds those sentences with the encoder (about as much encoding work
  again as the chunks themselves); ``"static"`` averages the encoder's input token embeddings instead
  (no forward pass, so ingestion runs at the encoder's speed on the chunks alone).
- A breakpoint ends a chunk only once the chunk holds ``max(limit // 4, overlap)`` tokens of new text,
  so a semantic cut never leaves a sliver that the next chunk's overlap would repeat whole. Overlap is
  carried across semantic breakpoints too (every chunk after the first in a section starts with one).
- Sentences longer than ``limit - header - overlap`` tokens are cut into token windows (at word starts
  where possible) by character offsets, so the text keeps its case and accents.
- Text before the first heading gets section "" (the header still names the document title).
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ingestion.documents import Chunk, Document, chunk_id_for, content_hash

if TYPE_CHECKING:
    from ingestion.embedder import Embedder

SECTION_SEPARATOR = " > "

ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
FENCE_OPEN = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_LIST_ITEM = re.compile(r"^[ \t]*(?:[-*+]|\d{1,9}[.)])[ \t]+\S")
_SENTENCE_END = re.compile(r"""[.!?…]+["'”’)\]]*(?=\s+["'“‘(\[]?[A-Z0-9])""")
_WORD_BEFORE = re.compile(r"""[^\s(\[{"'“‘]*$""")
_DOTTED = re.compile(r"(?:[a-z]\.)+[a-z]")  # "e.g", "i.e", "u.s" (the final "." is the match)

ABBREVIATIONS = frozenset(
    """mr mrs ms dr prof sr jr st mt vs cf al fig figs eq eqs ref refs no nos vol vols pp ch sec
    approx ca inc ltd co corp dept univ est gen col lt sgt capt rev hon viz resp jan feb mar apr jun
    jul aug sep sept oct nov dec""".split()
)


# --- structure ---------------------------------------------------------------------------------


def fence_state(line: str, fence: str) -> tuple[str, bool]:
    """Follow fenced code one line at a time: (open fence marker or "", is this line code)."""
    match = FENCE_OPEN.match(line)
    if fence:
        closes = match is not None and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence)
        closes = closes and not line.strip().lstrip(fence[0])
        return ("" if closes else fence), True
    if match:
        return match.group(1), True
    return "", False


def split_sections(text: str) -> list[tuple[str, str]]:
    """(section path, body) pairs in document order, from ATX headings outside fenced code.

    The path joins the enclosing headings: "Install > Linux". Bodies are stripped and exclude the
    heading line. Text before the first heading comes first with path "" (only if it is not blank);
    a heading with nothing under it still gives a pair, with body "".
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    sections: list[tuple[str, str]] = []
    stack: list[tuple[int, str]] = []  # (level, title) of the enclosing headings
    path, lines, fence, seen_heading = "", [], "", False
    for line in text.split("\n"):
        fence, is_code = fence_state(line, fence)
        match = None if is_code else ATX_HEADING.match(line)
        if match is None:
            lines.append(line)
            continue
        body = "\n".join(lines).strip()
        if seen_heading or body:
            sections.append((path, body))
        level, title = len(match.group(1)), " ".join((match.group(2) or "").split())
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, title))
        path = SECTION_SEPARATOR.join(t for _, t in stack if t)
        lines, seen_heading = [], True
    body = "\n".join(lines).strip()
    if seen_heading or body:
        sections.append((path, body))
    return sections


def split_sentences(text: str) -> list[str]:
    """Sentences, list items, paragraphs and fenced code blocks of a text, stripped, in order."""
    return [text[start:end] for start, end in sentence_spans(text)]


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of ``split_sentences``; they never overlap and never hold edge spaces.

    Boundaries: blank lines, list items, headings and table rows start new blocks; fenced code is one
    block; inside a block, [.!?] followed by space and a capital, digit or opening quote ends a sentence
    unless the word before is an abbreviation ("e.g.", "Dr.", "et al."), an initial, or dotted ("U.S.").
    """
    spans: list[tuple[int, int]] = []
    for start, end, is_code in _blocks(text):
        if is_code:
            _add_span(spans, text, start, end)
            continue
        block = text[start:end]
        cut = 0
        for match in _SENTENCE_END.finditer(block):
            if match.group().startswith(".") and not match.group().startswith("..") and _is_abbreviation(
                block, match.start()
            ):
                continue
            _add_span(spans, text, start + cut, start + match.end())
            cut = match.end()
        _add_span(spans, text, start + cut, end)
    return spans


def _blocks(text: str) -> list[tuple[int, int, bool]]:
    """(start, end, is_code) of paragraphs, list items, headings, table rows and fenced code blocks."""
    blocks: list[tuple[int, int, bool]] = []
    block_start: int | None = None
    fence = ""
    pos = 0
    for line in text.splitlines(keepends=True):
        line_start, pos = pos, pos + len(line)
        bare = line.rstrip("\r\n")
        was_code = bool(fence)
        fence, is_code = fence_state(bare, fence)
        if is_code:
            if not was_code:  # a fence opens: close the prose block, start a code block
                if block_start is not None:
                    blocks.append((block_start, line_start, False))
                block_start = line_start
            if not fence:  # the fence closed on this line
                blocks.append((block_start if block_start is not None else line_start, pos, True))
                block_start = None
            continue
        if not bare.strip():
            if block_start is not None:
                blocks.append((block_start, line_start, False))
            block_start = None
            continue
        standalone = ATX_HEADING.match(bare) is not None or bare.lstrip().startswith("|")
        if standalone or _LIST_ITEM.match(bare):
            if block_start is not None:
                blocks.append((block_start, line_start, False))
            block_start = line_start
            if standalone:
                blocks.append((line_start, pos, False))
                block_start = None
        elif block_start is None:
            block_start = line_start
    if block_start is not None:
        blocks.append((block_start, pos, bool(fence)))
    return blocks


def _is_abbreviation(block: str, period: int) -> bool:
    word = _WORD_BEFORE.search(block, 0, period).group().lower()  # type: ignore[union-attr]
    return word in ABBREVIATIONS or (len(word) == 1 and word.isalpha()) or _DOTTED.fullmatch(word) is not None


def _add_span(spans: list[tuple[int, int]], text: str, start: int, end: int) -> None:
    piece = text[start:end]
    stripped = piece.strip()
    if stripped:
        lead = len(piece) - len(piece.lstrip())
        spans.append((start + lead, start + lead + len(stripped)))


def chunk_header(title: str, section: str) -> str:
    """"Title > Section > Subsection", without repeating a title that is also the first heading."""
    parts = section.split(SECTION_SEPARATOR) if section else []
    title = " ".join(title.split())
    if title and (not parts or parts[0] != title):
        parts.insert(0, title)
    return SECTION_SEPARATOR.join(parts)


# --- token helpers -----------------------------------------------------------------------------


def _offsets(embedder: Embedder, text: str) -> list[tuple[int, int]]:
    """Character span of every token of ``text`` (no special tokens), in order."""
    return embedder.token_offsets(text)


def _starts_word(offsets: list[tuple[int, int]], j: int) -> bool:
    """Token j follows whitespace (or starts the text): cutting before it keeps words whole."""
    return j == 0 or offsets[j][0] > offsets[j - 1][1]


def _cut_before(offsets: list[tuple[int, int]], lo: int, hi: int) -> int:
    """End of a window [lo, cut): the last word start in the second half of (lo, hi], else hi
    (a very long word is cut mid-way rather than giving a window under half its size)."""
    if hi >= len(offsets):
        return len(offsets)
    for j in range(hi, lo + (hi - lo) // 2, -1):
        if _starts_word(offsets, j):
            return j
    return hi


def _word_start_from(offsets: list[tuple[int, int]], lo: int, hi: int) -> int:
    """First word start in [lo, hi); lo itself when none."""
    for j in range(lo, hi):
        if _starts_word(offsets, j):
            return j
    return lo


def _header_prefix(embedder: Embedder, header: str, cap: int) -> str:
    """``header + "\\n"`` cut to at most ``cap`` tokens (or "" when there is no header or no room)."""
    if not header or cap <= 0:
        return ""
    offsets = _offsets(embedder, header)
    keep = min(len(offsets), cap)
    while keep > 0:
        prefix = header[: offsets[keep - 1][1]].rstrip() + "\n"
        if embedder.count_tokens(prefix) <= cap:
            return prefix
        keep -= 1
    return ""


def _make_chunk(document: Document, index: int, text: str, section: str, embedder: Embedder) -> Chunk:
    return Chunk(
        chunk_id=chunk_id_for(document.document_id, index, text),
        document_id=document.document_id,
        text=text,
        section=section,
        chunk_index=index,
        chunk_size_tokens=embedder.count_tokens(text),
        created_at=document.created_at,
        source=document.source,
        content_hash=content_hash(text),
        acl=document.acl,
    )


def effective_limit(embedder: Embedder, max_tokens: int, overlap_tokens: int) -> int:
    """The token limit a chunk must hold; raises ValueError on an impossible configuration."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    limit = min(max_tokens, embedder.max_passage_tokens)
    if not 0 <= overlap_tokens < limit:
        raise ValueError(
            f"overlap_tokens must be in [0, {limit}) (the effective limit, min(max_tokens={max_tokens}, "
            f"encoder max {embedder.max_passage_tokens})), got {overlap_tokens}"
        )
    if not getattr(embedder.tokenizer, "is_fast", False):
        raise ValueError("the chunker needs a fast tokenizer (character offsets)")
    return limit


def _header_cap(limit: int, overlap: int) -> int:
    # leaves at least half of (limit - overlap) for new text in every chunk
    return min(limit // 4, (limit - overlap) // 2)


# --- semantic chunker --------------------------------------------------------------------------


@dataclass
class _Piece:
    """A sentence, or a token window of a long one: body[start:end], tokens [tok_lo, tok_hi)."""

    start: int
    end: int
    tok_lo: int
    tok_hi: int
    break_after: bool = False


@dataclass
class _SectionPlan:
    section: str
    prefix: str  # header line(s) every chunk of the section starts with, "" or ending in "\n"
    body: str
    offsets: list[tuple[int, int]]  # body token spans
    budget: int  # tokens left for body text after the prefix
    pieces: list[_Piece] | None = None  # None: the whole body is one chunk


class SemanticChunker:
    """Section- and similarity-aware chunker; every chunk fits the encoder whole."""

    def __init__(
        self,
        embedder: Embedder,
        *,
        max_tokens: int = 512,
        overlap_tokens: int = 50,
        breakpoint_percentile: float = 90.0,
        context_header: bool = True,
        breakpoint_vectors: str = "static",  # as Settings (RAG_CHUNK_BREAKPOINT_VECTORS): one default
    ) -> None:
        self.limit = effective_limit(embedder, max_tokens, overlap_tokens)
        if not 0.0 <= breakpoint_percentile <= 100.0:
            raise ValueError(f"breakpoint_percentile must be in [0, 100], got {breakpoint_percentile}")
        if breakpoint_vectors not in ("encoder", "static"):
            raise ValueError(f"breakpoint_vectors must be 'encoder' or 'static', got {breakpoint_vectors!r}")
        self.breakpoint_vectors = breakpoint_vectors
        self.embedder = embedder
        self.max_tokens = max_tokens
        self.overlap_tokens = overlap_tokens
        self.breakpoint_percentile = breakpoint_percentile
        self.context_header = context_header
        # a breakpoint ends a chunk only once it holds this much new text (after the carried overlap):
        # no slivers that the next chunk's overlap would repeat whole
        self.min_break_tokens = max(self.limit // 4, overlap_tokens)

    def chunk(self, document: Document) -> list[Chunk]:
        return self.chunk_many([document])[0]

    def chunk_many(self, documents: Sequence[Document]) -> list[list[Chunk]]:
        """Chunks of each document; the sentences of all of them go through one embedding call (full
        batches: about twice the throughput of one call per short document). Breakpoint percentiles
        stay per document."""
        plans = [self._plan(document) for document in documents]
        self._mark_breakpoints([[plan for plan in doc_plans if plan.pieces] for doc_plans in plans])
        return [self._assemble(document, doc_plans) for document, doc_plans in zip(documents, plans)]

    def _plan(self, document: Document) -> list[_SectionPlan]:
        """Per section: header, token offsets and, when longer than one chunk, its pieces."""
        plans: list[_SectionPlan] = []
        for section, body in split_sections(document.text):
            if not body:
                continue
            header = chunk_header(document.title, section) if self.context_header else ""
            prefix = _header_prefix(self.embedder, header, _header_cap(self.limit, self.overlap_tokens))
            budget = self.limit - self.embedder.count_tokens(prefix)
            offsets = _offsets(self.embedder, body)
            plan = _SectionPlan(section, prefix, body, offsets, budget)
            if len(offsets) > budget or self.embedder.count_tokens(prefix + body) > self.limit:
                plan.pieces = self._pieces(body, offsets, budget - self.overlap_tokens)
            plans.append(plan)
        return plans

    def _assemble(self, document: Document, plans: list[_SectionPlan]) -> list[Chunk]:
        chunks: list[Chunk] = []
        for plan in plans:
            spans = self._group(plan) if plan.pieces else [(0, len(plan.body))]
            for start, end in spans:
                text = plan.prefix + plan.body[start:end]
                chunks.append(_make_chunk(document, len(chunks), text, plan.section, self.embedder))
        return chunks

    def _pieces(self, body: str, offsets: list[tuple[int, int]], piece_budget: int) -> list[_Piece]:
        """Sentences of the body; those over ``piece_budget`` tokens cut into windows at word starts."""
        starts = [s for s, _ in offsets]
        pieces: list[_Piece] = []
        for start, end in sentence_spans(body):
            lo, hi = bisect_left(starts, start), bisect_left(starts, end)
            while hi - lo > piece_budget:
                cut = _cut_before(offsets, lo, lo + piece_budget)
                pieces.append(_Piece(offsets[lo][0], offsets[cut - 1][1], lo, cut))
                lo = cut
            pieces.append(_Piece(offsets[lo][0] if hi > lo else start, end, lo, hi))
        return pieces

    def _mark_breakpoints(self, documents: list[list[_SectionPlan]]) -> None:
        """Set ``break_after`` where neighbour distance exceeds its document's percentile.
        ``documents``: per document, the plans of its sections that have pieces."""
        texts = [plan.body[p.start : p.end] for plans in documents for plan in plans for p in plan.pieces or ()]
        if len(texts) < 3 or self.breakpoint_percentile >= 100.0:  # then no distance can exceed it
            return
        if self.breakpoint_vectors == "static":
            vectors = self.embedder.static_sentence_vectors(texts)  # (n, d), unit rows
        else:
            vectors = self.embedder.embed_sentences(texts)  # (n, d), unit rows
        row = 0
        for plans in documents:
            distances: list[np.ndarray] = []  # per section, (len(pieces) - 1,)
            for plan in plans:
                block = vectors[row : row + len(plan.pieces or ())]
                row += len(block)
                distances.append(1.0 - np.einsum("ij,ij->i", block[:-1], block[1:]))
            flat = np.concatenate(distances) if distances else np.zeros(0)
            if flat.size < 2:
                continue
            threshold = float(np.percentile(flat, self.breakpoint_percentile))
            for plan, section_distances in zip(plans, distances):
                for piece, distance in zip(plan.pieces or (), section_distances):
                    piece.break_after = bool(distance > threshold)

    def _group(self, plan: _SectionPlan) -> list[tuple[int, int]]:
        """Character spans of the section's chunks; each holds >= 1 new piece after its overlap."""
        prefix, body, offsets, budget = plan.prefix, plan.body, plan.offsets, plan.budget
        pieces = plan.pieces or []
        spans: list[tuple[int, int]] = []
        carry: tuple[int, int] | None = None  # (char start, token start) of the overlap for the next chunk
        i = 0
        while i < len(pieces):
            start, tok_start = carry if carry else (pieces[i].start, pieces[i].tok_lo)
            j = i
            while j + 1 < len(pieces) and pieces[j + 1].tok_hi - tok_start <= budget:
                if pieces[j].break_after and pieces[j].tok_hi - pieces[i].tok_lo >= self.min_break_tokens:
                    break
                j += 1
            # the estimate counts tokens in context; recount the real text and, if it is over (a piece
            # cut mid-word tokenizes differently alone), give back new pieces, then overlap, piece by piece
            while self.embedder.count_tokens(prefix + body[start : pieces[j].end]) > self.limit:
                if j > i:
                    j -= 1
                elif start < pieces[i].start:
                    start = min(p.start for p in pieces[: i + 1] if p.start > start)
                else:
                    self._split_piece(pieces, i, offsets, body, prefix)
            spans.append((start, pieces[j].end))
            carry = self._overlap(pieces, start, j, offsets) if j + 1 < len(pieces) else None
            i = j + 1
        return spans

    def _split_piece(
        self, pieces: list[_Piece], i: int, offsets: list[tuple[int, int]], body: str, prefix: str
    ) -> None:
        """Piece i alone is over the limit once re-tokenized (a word cut mid-way): keep a shorter head."""
        piece = pieces[i]
        excess = self.embedder.count_tokens(prefix + body[piece.start : piece.end]) - self.limit
        keep = piece.tok_hi - piece.tok_lo - max(excess, 1)
        if keep < 1:
            raise RuntimeError(f"cannot fit a single token of {body[piece.start:piece.end][:40]!r} in the limit")
        cut = piece.tok_lo + keep
        rest = _Piece(offsets[cut][0], piece.end, cut, piece.tok_hi, piece.break_after)
        pieces[i] = _Piece(piece.start, offsets[cut - 1][1], piece.tok_lo, cut)
        pieces.insert(i + 1, rest)

    def _overlap(
        self, pieces: list[_Piece], chunk_start: int, j: int, offsets: list[tuple[int, int]]
    ) -> tuple[int, int] | None:
        """Start of the tail of the chunk ending at piece j: whole pieces up to ``overlap_tokens``, or
        the last ``overlap_tokens`` tokens of piece j when it alone is longer."""
        if self.overlap_tokens == 0:
            return None
        k = j
        while k >= 0 and pieces[k].start >= chunk_start and pieces[j].tok_hi - pieces[k].tok_lo <= self.overlap_tokens:
            k -= 1
        if k < j:
            first = next((m for m in range(k + 1, j + 1) if _starts_word(offsets, pieces[m].tok_lo)), k + 1)
            return pieces[first].start, pieces[first].tok_lo
        piece = pieces[j]
        if piece.tok_hi - piece.tok_lo < 2:
            return None
        lo = max(piece.tok_hi - self.overlap_tokens, piece.tok_lo + 1)
        first = _word_start_from(offsets, lo, piece.tok_hi)
        return offsets[first][0], first


# --- fixed-size baseline -----------------------------------------------------------------------


def fixed_size_chunks(
    document: Document,
    embedder: Embedder,
    max_tokens: int,
    overlap_tokens: int,
    *,
    context_header: bool = True,
) -> list[Chunk]:
    """Token windows over the whole text (no sections, no sentences), cut at word starts where
    possible, each starting ``overlap_tokens`` (or fewer, to a word start) before the previous end."""
    limit = effective_limit(embedder, max_tokens, overlap_tokens)
    header = " ".join(document.title.split()) if context_header else ""
    prefix = _header_prefix(embedder, header, _header_cap(limit, overlap_tokens))
    budget = limit - embedder.count_tokens(prefix)
    text = document.text.strip()
    offsets = _offsets(embedder, text)
    chunks: list[Chunk] = []
    lo = 0
    while lo < len(offsets):
        hi = _cut_before(offsets, lo, lo + budget)
        while True:
            chunk_text = prefix + text[offsets[lo][0] : offsets[hi - 1][1]]
            excess = embedder.count_tokens(chunk_text) - limit
            if excess <= 0:
                break
            hi = max(lo + 1, hi - excess)
        chunks.append(_make_chunk(document, len(chunks), chunk_text, "", embedder))
        if hi >= len(offsets):
            break
        lo = _word_start_from(offsets, max(hi - overlap_tokens, lo + 1), hi) if overlap_tokens else hi
    return chunks
