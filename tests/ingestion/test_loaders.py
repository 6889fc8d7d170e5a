"""Loaders: every format from real files, and the errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ingestion.chunker import split_sections
from ingestion.loaders import LoaderError, iter_documents, load_documents


def make_pdf(pages: list[str], title: str = "") -> bytes:
    """A minimal valid PDF: one Helvetica text line per page, optional /Title in the info dictionary."""
    n = len(pages)
    font_id, first_page_id = 3, 4
    objects: dict[int, bytes] = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids ["
        + b" ".join(f"{first_page_id + 2 * i} 0 R".encode() for i in range(n))
        + f"] /Count {n} >>".encode(),
        font_id: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    }
    for i, text in enumerate(pages):
        page_id, content_id = first_page_id + 2 * i, first_page_id + 2 * i + 1
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = f"BT /F1 12 Tf 72 720 Td ({escaped}) Tj ET".encode("latin-1")
        objects[page_id] = (
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {content_id} 0 R "
            f"/Resources << /Font << /F1 {font_id} 0 R >> >> >>"
        ).encode()
        objects[content_id] = b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream"
    info_id = max(objects) + 1
    objects[info_id] = f"<< /Title ({title}) >>".encode("latin-1")

    out = bytearray(b"%PDF-1.4\n")
    offsets = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += b"%d 0 obj\n" % number + objects[number] + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (info_id + 1)
    for number in range(1, info_id + 1):
        out += b"%010d 00000 n \n" % offsets[number]
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (info_id + 1, info_id, xref)
    return bytes(out)


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


# --- formats -----------------------------------------------------------------------------------


def test_markdown_text_and_title(tmp_path: Path) -> None:
    path = tmp_path / "guide.md"
    path.write_bytes(b"Intro line.\r\n\r\n# Guide\r\n\r\nSome text.\r\n## Install\r\nSteps.\r\n")
    [doc] = load_documents([path])
    assert doc.document_id == "guide.md"
    assert doc.source == str(path)
    assert doc.title == "Guide"
    assert "\r" not in doc.text
    assert doc.text.startswith("Intro line.\n\n# Guide\n")  # headings stay for the chunker
    assert [s for s, _ in split_sections(doc.text)] == ["", "Guide", "Guide > Install"]


def test_plain_text_title_is_stem(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("just some notes\nsecond line", encoding="utf-8")
    [doc] = load_documents([path])
    assert (doc.title, doc.text, doc.metadata["format"]) == ("notes", "just some notes\nsecond line", "text")


def test_html_headings_become_sections(tmp_path: Path) -> None:
    path = tmp_path / "page.html"
    path.write_text(
        """<!doctype html><html><head><title>My  Page</title><style>p {color: red}</style></head>
        <body><nav><a href="/">Home</a> menu</nav>
        <h1>Welcome</h1><p>First   paragraph
        with a <b>bold</b> word.</p>
        <script>var x = "# not a heading";</script>
        <h2>Install</h2><ul><li>Step one</li><li>Step two<ul><li>nested</li></ul></li></ul>
        <h3>Linux</h3><div>Use apt.<br>Or snap.</div><p># looks like a heading</p>
        <pre>line 1
# comment in code</pre>
        <table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>2</td></tr></table>
        </body></html>""",
        encoding="utf-8",
    )
    [doc] = load_documents([path])
    assert doc.title == "My Page"
    assert "menu" not in doc.text and "var x" not in doc.text and "color" not in doc.text
    assert "First paragraph with a bold word." in doc.text
    assert "- Step one" in doc.text and "- nested" in doc.text
    assert "Use apt.\nOr snap." in doc.text
    assert "a | b" in doc.text and "1 | 2" in doc.text
    sections = dict(split_sections(doc.text))
    assert list(sections) == ["Welcome", "Welcome > Install", "Welcome > Install > Linux"]
    assert sections["Welcome"] == "First paragraph with a bold word."
    assert "# comment in code" in sections["Welcome > Install > Linux"]  # in a fence, not a heading
    assert "\\# looks like a heading" in sections["Welcome > Install > Linux"]


def test_html_without_title_uses_first_h1_then_stem(tmp_path: Path) -> None:
    (tmp_path / "a.htm").write_text("<h1>Top</h1><p>x</p>", encoding="utf-8")
    (tmp_path / "b.html").write_text("<p>only text</p>", encoding="utf-8")
    docs = load_documents([tmp_path])
    assert [(d.document_id, d.title) for d in docs] == [("a.htm", "Top"), ("b.html", "b")]


def test_pdf_pages_and_metadata_title(tmp_path: Path) -> None:
    path = tmp_path / "paper.pdf"
    path.write_bytes(make_pdf(["First page text.", "Second page (more)."], title="A Paper"))
    [doc] = load_documents([path])
    assert doc.title == "A Paper"
    assert doc.text == "First page text.\n\nSecond page (more)."
    assert doc.metadata == {"format": "pdf", "pages": 2}


def test_pdf_without_title_uses_stem_and_broken_pdf_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "scan.pdf"
    path.write_bytes(make_pdf(["Hello."]))
    assert load_documents([path])[0].title == "scan"
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4\nthis is not really a pdf")
    with pytest.raises(LoaderError, match="broken.pdf"):
        load_documents([broken])


def test_jsonl_records_and_beir_lines(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "docs.jsonl",
        [
            {
                "document_id": "a",
                "text": "Alpha text.\r\nMore.",
                "title": "Alpha",
                "source": "https://example.com/a",
                "metadata": {"lang": "en", "year": 2020, "score": 0.5, "public": True, "gone": None},
                "created_at": "2024-05-01T12:00:00+02:00",
                "team": "search",
                "tags": None,
            },
            "",
            {"_id": "4983", "title": "BEIR title", "text": "BEIR text.", "metadata": {}},
        ],
    )
    a, beir = load_documents([path])
    assert (a.document_id, a.title, a.source, a.text) == ("a", "Alpha", "https://example.com/a", "Alpha text.\nMore.")
    assert a.metadata == {"lang": "en", "year": 2020, "score": 0.5, "public": True, "team": "search"}
    assert a.created_at == "2024-05-01T10:00:00+00:00"
    assert (beir.document_id, beir.title, beir.text, beir.source) == ("4983", "BEIR title", "BEIR text.", str(path))
    assert beir.metadata == {}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "x"}', "missing 'document_id'"),
        ('{"document_id": "", "text": "x"}', "'document_id' is empty"),
        ('{"document_id": 7, "text": "x"}', "'document_id' must be a string"),
        ('{"document_id": "b"}', "missing 'text'"),
        ('{"document_id": "b", "text": "   "}', "'text' is empty"),
        ('{"document_id": "b", "text": "x", "metadata": {"k": [1]}}', "metadata\\['k'\\]: list is not allowed"),
        ('{"document_id": "b", "text": "x", "metadata": "k"}', "'metadata' must be an object"),
        ('{"document_id": "b", "text": "x", "extra": {"a": 1}}', "extra key 'extra': dict is not allowed"),
        ('{"document_id": "b", "text": "x", "created_at": "yesterday"}', "'created_at' is not an ISO 8601"),
        ('{"document_id": "b", "_id": "c", "text": "x"}', "both 'document_id' and '_id'"),
        ('{"document_id": "b", "text": "x", "k": 1, "metadata": {"k": 2}}', "key 'k' given both"),
        ('{"document_id": "b", "text": "x",', "invalid JSON"),
        ('["b", "x"]', "expected a JSON object"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", [{"document_id": "a", "text": "ok"}, "", line])
    with pytest.raises(LoaderError, match=rf"docs\.jsonl:3: {message}"):
        load_documents([path])


def test_invalid_utf8_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(LoaderError, match=r"latin1\.txt: not valid UTF-8"):
        load_documents([bad])
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_bytes(b'{"document_id": "a", "text": "ok"}\n{"document_id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(LoaderError, match=r"bad\.jsonl:2: not valid UTF-8"):
        load_documents([bad_jsonl])


# --- folders, ids, errors ----------------------------------------------------------------------


def test_folder_walk_is_recursive_sorted_and_reports_skips(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "b.md").write_text("# B\nb", encoding="utf-8")
    (tmp_path / "a.txt").write_text("a", encoding="utf-8")
    (tmp_path / "sub" / "deeper" / "c.markdown").write_text("c", encoding="utf-8")
    (tmp_path / "sub" / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / ".hidden.md").write_text("h", encoding="utf-8")
    skipped: list[tuple[str, str]] = []
    docs = list(iter_documents([tmp_path], on_skip=lambda p, why: skipped.append((p.name, why))))
    assert [d.document_id for d in docs] == ["a.txt", "b.md", "sub/deeper/c.markdown"]
    assert docs[2].source == str(tmp_path / "sub" / "deeper" / "c.markdown")
    assert skipped == [("empty.txt", "no text"), ("image.png", "unsupported extension '.png'")]
    assert load_documents([tmp_path], on_skip=lambda p, why: None) == docs  # stable across runs


def test_skips_are_logged_by_default(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "x.docx").write_bytes(b"PK")
    assert load_documents([tmp_path]) == []
    assert "x.docx" in caplog.text and "unsupported extension" in caplog.text


def test_unsupported_file_named_directly_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "slides.pptx"
    path.write_bytes(b"PK")
    with pytest.raises(LoaderError, match=r"slides\.pptx: unsupported extension '\.pptx'"):
        load_documents([path])
    with pytest.raises(LoaderError, match="no such file or folder"):
        load_documents([tmp_path / "missing.md"])


def test_duplicate_ids_name_both_places(tmp_path: Path) -> None:
    first = write_jsonl(tmp_path / "one.jsonl", [{"document_id": "x", "text": "a"}])
    second = write_jsonl(tmp_path / "two.jsonl", [{"document_id": "y", "text": "b"}, {"document_id": "x", "text": "c"}])
    with pytest.raises(LoaderError, match=r"duplicate document_id 'x': .*one\.jsonl:1 and .*two\.jsonl:2"):
        load_documents([first, second])


def test_bad_line_late_in_input_means_nothing_is_returned(tmp_path: Path) -> None:
    good = tmp_path / "good.md"
    good.write_text("# Fine\ntext", encoding="utf-8")
    bad = write_jsonl(tmp_path / "later.jsonl", [{"document_id": "a", "text": "ok"}, {"document_id": "b"}])
    with pytest.raises(LoaderError, match=r"later\.jsonl:2: missing 'text'"):
        load_documents([good, bad])
    assert len(list(iter_documents([good]))) == 1
