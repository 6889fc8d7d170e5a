"""The chunker against the real all-MiniLM-L6-v2 tokenizer and encoder."""

from __future__ import annotations

import pytest

from ingestion.chunker import (
    SemanticChunker,
    chunk_header,
    fixed_size_chunks,
    split_sections,
    split_sentences,
)
from ingestion.documents import Chunk, Document
from ingestion.embedder import Embedder

BEES = [
    "The honey bee colony is organized around a single queen that lays all of the eggs.",
    "Worker bees forage for nectar and pollen from flowers within several kilometres of the hive.",
    "Returning foragers perform a waggle dance that tells other workers the direction and distance of food.",
    "Nectar is processed into honey by evaporation and enzymes added by the workers.",
    "Drones are male bees whose only role is to mate with a queen from another colony.",
    "In winter the colony clusters tightly and the bees shiver their flight muscles to generate heat.",
    "Beekeepers inspect frames of comb regularly to check the health of the brood and the queen.",
    "Varroa mites are parasites that weaken bees and spread viruses through the colony.",
]
RATES = [
    "The central bank raised its benchmark interest rate by half a percentage point to fight inflation.",
    "Higher borrowing costs reduce demand for mortgages and business loans across the economy.",
    "Bond yields rose sharply after the announcement while stock indexes fell in afternoon trading.",
    "Economists expect consumer prices to slow over the next year as monetary policy tightens.",
    "The currency strengthened against the dollar because investors sought higher returns.",
    "Some analysts warned that aggressive rate hikes could push the economy into a recession.",
    "Government bond auctions drew weaker demand than in previous months.",
    "The bank's governor said further increases would depend on incoming labour market data.",
]


def long_markdown() -> str:
    install = " ".join(
        f"Step {i} of the installation copies file number {i} into the folder named target-{i} on Linux."
        for i in range(25)
    )
    giant = "This sentence never ends and lists " + " ".join(f"item{i}" for i in range(300)) + "."
    no_spaces = "See " + "/".join(f"seg{i}" for i in range(160)) + " for details."
    usage = "\n".join(f"- Option {i} sets the value of setting {i} (e.g. {i}.5 units)." for i in range(30))
    return (
        "Preamble before any heading.\n\n# Guide\n\nWhat this guide covers.\n\n## Install\n\n"
        f"{install}\n\n{giant}\n\n### Linux\n\n```\n# not a heading\nmake install\n```\n\n{no_spaces}\n\n"
        f"## Usage\n\n{usage}\n"
    )


def body_of(chunk: Chunk, title: str) -> str:
    header = chunk_header(title, chunk.section)
    assert chunk.text.startswith(header + "\n")
    return chunk.text[len(header) + 1 :]


def check_chunk_fields(chunks: list[Chunk], document: Document, embedder: Embedder, limit: int) -> None:
    assert [c.chunk_index for c in chunks] == list(range(len(chunks)))
    assert len({c.chunk_id for c in chunks}) == len(chunks)  # their values: see KNOWN_CHUNKS below
    for chunk in chunks:
        assert chunk.chunk_size_tokens == embedder.count_tokens(chunk.text) <= limit
        assert (chunk.document_id, chunk.source, chunk.created_at) == (
            document.document_id,
            document.source,
            document.created_at,
        )


def leading_overlap(previous: str, current: str) -> str:
    """Longest suffix of ``previous`` that ``current`` starts with."""
    for size in range(min(len(previous), len(current)), 0, -1):
        if current.startswith(previous[-size:]):
            return previous[-size:]
    return ""


# --- structure ---------------------------------------------------------------------------------


def test_split_sections_paths_preamble_and_fences() -> None:
    text = "intro\n# A\na1\n```\n# code, not a heading\n```\n## B\nb1\n### C ###\nc1\n## D\n# E\ne1\n"
    assert split_sections(text) == [
        ("", "intro"),
        ("A", "a1\n```\n# code, not a heading\n```"),
        ("A > B", "b1"),
        ("A > B > C", "c1"),
        ("A > D", ""),
        ("E", "e1"),
    ]
    assert split_sections("#hashtag is not a heading\ntext") == [("", "#hashtag is not a heading\ntext")]


def test_split_sentences_keeps_abbreviations_decimals_and_blocks() -> None:
    text = (
        "Dr. Smith et al. (2020) found e.g. a 3.14 ratio in the U.S. Army. It held! Did it? "
        '"Yes," they said. Results in Fig. 2 agree\nacross a wrapped line.\n\n'
        "- first item\n- second item. With two sentences.\n1. numbered\n\n```\nx = 1. Y\n```\nAfter."
    )
    assert split_sentences(text) == [
        "Dr. Smith et al. (2020) found e.g. a 3.14 ratio in the U.S. Army.",
        "It held!",
        "Did it?",
        '"Yes," they said.',
        "Results in Fig. 2 agree\nacross a wrapped line.",
        "- first item",
        "- second item.",
        "With two sentences.",
        "1. numbered",
        "```\nx = 1. Y\n```",
        "After.",
    ]


# --- config ------------------------------------------------------------------------------------


def test_config_is_validated(embedder: Embedder) -> None:
    assert SemanticChunker(embedder, max_tokens=1000).limit == embedder.max_passage_tokens == 254
    assert SemanticChunker(embedder, max_tokens=100).limit == 100
    with pytest.raises(ValueError, match="overlap_tokens"):
        SemanticChunker(embedder, max_tokens=100, overlap_tokens=100)
    with pytest.raises(ValueError, match="overlap_tokens"):
        SemanticChunker(embedder, max_tokens=1000, overlap_tokens=300)  # >= effective limit 254
    with pytest.raises(ValueError, match="breakpoint_percentile"):
        SemanticChunker(embedder, breakpoint_percentile=120)
    with pytest.raises(ValueError, match="max_tokens"):
        SemanticChunker(embedder, max_tokens=0)


# --- semantic chunker --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_document() -> Document:
    return Document(
        "guide.md", long_markdown(), title="Guide", source="docs/guide.md", created_at="2024-01-01T00:00:00+00:00"
    )


@pytest.fixture(scope="module")
def default_chunks(embedder: Embedder, long_document: Document) -> list[Chunk]:
    return SemanticChunker(embedder).chunk(long_document)  # limit 254 = the encoder's


@pytest.fixture(scope="module")
def small_chunks(embedder: Embedder, long_document: Document) -> list[Chunk]:
    return SemanticChunker(embedder, max_tokens=96, overlap_tokens=30).chunk(long_document)


@pytest.mark.parametrize(("fixture", "limit"), [("default_chunks", 254), ("small_chunks", 96)])
def test_limits_hold_with_the_real_tokenizer(
    request: pytest.FixtureRequest, embedder: Embedder, long_document: Document, fixture: str, limit: int
) -> None:
    chunks: list[Chunk] = request.getfixturevalue(fixture)
    check_chunk_fields(chunks, long_document, embedder, limit)
    assert len(chunks) > 4
    assert max(c.chunk_size_tokens for c in chunks) > limit * 0.8  # chunks are filled, not slivers

    # every chunk body is a verbatim slice of its section, and together they cover every section
    sections = dict(split_sections(long_document.text))
    for section, body in sections.items():
        covered = [False] * len(body)
        search_from = 0
        for chunk in (c for c in chunks if c.section == section):
            part = body_of(chunk, long_document.title)
            start = body.find(part, search_from)
            assert start >= 0, (section, part[:60])
            covered[start : start + len(part)] = [True] * len(part)
            search_from = start + 1
        assert all(covered[i] or body[i].isspace() for i in range(len(body))), section


def test_sections_come_from_headings(default_chunks: list[Chunk]) -> None:
    chunks = default_chunks
    order = ["", "Guide", "Guide > Install", "Guide > Install > Linux", "Guide > Usage"]
    sections = [c.section for c in chunks]
    assert sections == sorted(sections, key=order.index) and set(sections) == set(order)
    assert chunks[0].text == "Guide\nPreamble before any heading."
    assert chunks[1].text == "Guide\nWhat this guide covers."
    linux = [c for c in chunks if c.section == "Guide > Install > Linux"]
    assert linux[0].text.startswith("Guide > Install > Linux\n```\n# not a heading\nmake install\n```")


# Computed outside the code, from README's formula (sha256 of "<document_id>\x1f<chunk_index>\x1f<text>" in
# UTF-8, first 32 hex digits; content hash: sha256 of the text), e.g.
#   printf 'guide.md\x1f0\x1fGuide\nPreamble before any heading.' | sha256sum
KNOWN_CHUNKS = [  # (text, chunk_id, content_hash)
    ("Guide\nPreamble before any heading.", "3132a9995db1b10bdcba649f605ca7ce",
     "2bb984fc06857c9819aeae06172e6c3eed459ee5f6238b230acb15547fb94ac2"),
    ("Guide\nWhat this guide covers.", "c79dc00adbe5e1d31c2885d049f2957e",
     "a8bb1343080363ef00958e8a40a467e5b2897088ffb90c5896ddf504440ca0cc"),
]


def test_chunk_ids_and_hashes_are_the_documented_known_values(default_chunks: list[Chunk]) -> None:
    """Chunk id = sha256(document_id, chunk_index, text)[:32] and content hash = sha256(text), by value."""
    got = [(c.text, c.chunk_id, c.content_hash) for c in default_chunks[:2]]
    assert got == KNOWN_CHUNKS
    assert all(c.document_id == "guide.md" for c in default_chunks[:2])


def test_consecutive_chunks_of_a_section_overlap(embedder: Embedder, small_chunks: list[Chunk]) -> None:
    chunks = small_chunks
    pairs = [(a, b) for a, b in zip(chunks, chunks[1:]) if a.section == b.section]
    assert len(pairs) > 5
    for previous, current in pairs:
        tail = leading_overlap(body_of(previous, "Guide"), body_of(current, "Guide"))
        assert tail.strip(), (previous.text[-80:], current.text[:80])
        assert embedder.count_tokens(tail) <= 30 + 1  # +1: a word cut mid-way
        assert len(tail) < len(body_of(current, "Guide"))  # and new text after it


def test_no_overlap_when_disabled(embedder: Embedder, long_document: Document) -> None:
    chunker = SemanticChunker(
        embedder, max_tokens=96, overlap_tokens=0, context_header=False, breakpoint_percentile=100
    )
    chunks = chunker.chunk(long_document)
    install = "".join(c.text for c in chunks if c.section == "Guide > Install")
    expected = dict(split_sections(long_document.text))["Guide > Install"]
    assert "".join(install.split()) == "".join(expected.split())  # a partition: no text twice


def test_deterministic_ids(embedder: Embedder) -> None:
    chunker = SemanticChunker(embedder, max_tokens=96, overlap_tokens=30)
    text = "# A\n" + " ".join(BEES) + "\n\n# B\n" + " ".join(RATES)
    document = Document("d", text)
    first, again = chunker.chunk(document), chunker.chunk(document)
    assert len(first) > 4 and [c.chunk_id for c in again] == [c.chunk_id for c in first]
    assert again == first
    changed = chunker.chunk(Document("d", text.replace("Drones", "Male drones")))
    assert [c.chunk_id for c in changed] != [c.chunk_id for c in first]
    unchanged = [c.chunk_id for c in first if c.section == "B"]
    assert unchanged and unchanged == [c.chunk_id for c in changed if c.section == "B"]  # other sections keep ids
    renamed = chunker.chunk(Document("e", text))
    assert not {c.chunk_id for c in renamed} & {c.chunk_id for c in first}


def test_chunk_many_equals_one_by_one(embedder: Embedder) -> None:
    chunker = SemanticChunker(embedder, max_tokens=128)
    documents = [
        Document("bees", " ".join(BEES), title="Bees"),
        Document("short", "One line."),
        Document("rates", " ".join(RATES + BEES[:3]), title="Rates"),
    ]
    assert chunker.chunk_many(documents) == [chunker.chunk(d) for d in documents]


def test_topic_shift_splits_at_the_boundary(embedder: Embedder) -> None:
    text = " ".join(BEES) + "\n\n" + " ".join(RATES)
    document = Document("topics", text, title="Notes")
    assert embedder.count_tokens(text) > 200  # longer than one chunk ...
    assert embedder.count_tokens(" ".join(BEES + RATES[:2])) < 190  # ... but size alone would cut later

    chunks = SemanticChunker(embedder, max_tokens=200, overlap_tokens=50).chunk(document)
    bodies = [body_of(c, "Notes") for c in chunks]
    assert bodies[0] == " ".join(BEES)
    assert all(sentence not in bodies[0] for sentence in RATES)
    tail = leading_overlap(bodies[0], bodies[1])  # whole sentences of the old topic, <= 50 tokens
    assert tail in {" ".join(BEES[k:]) for k in range(1, len(BEES))} and embedder.count_tokens(tail) <= 50
    assert bodies[1][len(tail) :].strip() == " ".join(RATES)  # then the new topic, whole

    size_only = SemanticChunker(embedder, max_tokens=200, breakpoint_percentile=100).chunk(document)
    assert RATES[0] in size_only[0].text


def test_short_sections_are_one_chunk_each_without_embedding(
    embedder: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedder, "embed_sentences", lambda texts: pytest.fail("no sentence embedding needed"))
    document = Document("short", "# One\nFirst part. Two sentences.\n\n# Two\nSecond part.", title="Short")
    chunks = SemanticChunker(embedder).chunk(document)
    assert [(c.section, c.text) for c in chunks] == [
        ("One", "Short > One\nFirst part. Two sentences."),
        ("Two", "Short > Two\nSecond part."),
    ]
    assert SemanticChunker(embedder).chunk(Document("empty", "  \n", title="x")) == []


def test_headerless_chunks_are_verbatim(embedder: Embedder) -> None:
    document = Document("d", "# Title\nJust text here.", title="Title")
    [chunk] = SemanticChunker(embedder, context_header=False).chunk(document)
    assert (chunk.section, chunk.text) == ("Title", "Just text here.")


# --- fixed-size baseline -----------------------------------------------------------------------


def test_fixed_size_chunks_windows_and_overlap(embedder: Embedder, long_document: Document) -> None:
    chunks = fixed_size_chunks(long_document, embedder, 96, 20)
    check_chunk_fields(chunks, long_document, embedder, 96)
    assert {c.section for c in chunks} == {""}
    assert sum(c.chunk_size_tokens >= 90 for c in chunks) >= len(chunks) - 2
    for previous, current in zip(chunks, chunks[1:]):
        tail = leading_overlap(previous.text.split("\n", 1)[1], current.text.split("\n", 1)[1])
        assert tail.strip() and embedder.count_tokens(tail) <= 21
    assert fixed_size_chunks(long_document, embedder, 96, 20) == chunks
