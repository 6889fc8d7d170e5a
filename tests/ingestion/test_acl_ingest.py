"""Document ACLs on the way in: JSONL lines, folder .acl files, the loader's default, and a ledger written
before ACLs existed (migrated at open, its documents public and unchanged)."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest

from ingestion.documents import Chunk, Document
from ingestion.ledger import SCHEMA, Ledger
from ingestion.loaders import LoaderError, load_documents


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_acl_precedence_jsonl_line_then_nearest_acl_file_then_default(tmp_path):
    root = tmp_path / "docs"
    write(root / "open.md", "# Open\nFor everyone.")
    write(root / "hr" / ".acl", "# who may read HR documents\nhr\n\nmanagers  # and their managers\nhr\n")
    write(root / "hr" / "pay.md", "# Pay\nSalary bands.")
    write(root / "hr" / "public" / ".acl", "")  # an empty .acl makes a subtree public again
    write(root / "hr" / "public" / "holidays.txt", "Public holidays.")
    write(root / "hr" / "deep" / "reviews.txt", "Reviews inherit hr's .acl.")
    write(root / "hr" / "lines.jsonl", "\n".join(json.dumps(r) for r in [
        {"document_id": "own", "text": "Its own acl.", "acl": ["legal", "hr"]},
        {"document_id": "public-line", "text": "Explicitly public.", "acl": []},
        {"document_id": "inherits", "text": "No acl given.", "acl": None},
    ]))
    found = {d.document_id: d.acl for d in load_documents([root], acl=["staff"])}
    assert found == {"open.md": ("staff",), "hr/pay.md": ("hr", "managers"), "hr/public/holidays.txt": (),
                     "hr/deep/reviews.txt": ("hr", "managers"), "own": ("hr", "legal"), "public-line": (),
                     "inherits": ("hr", "managers")}
    assert {d.document_id: d.acl for d in load_documents([root])}["open.md"] == ()
    # a file named directly takes its folder's .acl as well: naming it cannot publish an HR document
    assert load_documents([root / "hr" / "deep" / "reviews.txt"])[0].acl == ("hr", "managers")
    # the acl is part of the content hash: the same text with another acl is a change
    pay = load_documents([root / "hr" / "pay.md"])[0]
    assert Document("x", "t", acl=("a",)).content_hash != Document("x", "t", acl=("b",)).content_hash
    assert pay.content_hash != Document(**{**pay.__dict__, "acl": ()}).content_hash


def test_bad_groups_name_the_file_and_line(tmp_path):
    write(tmp_path / "a" / ".acl", "hr\nnot a group\n")
    write(tmp_path / "a" / "doc.txt", "text")
    with pytest.raises(LoaderError, match=r"a/\.acl:2: group 'not a group' is invalid"):
        load_documents([tmp_path / "a"])
    lines = write(tmp_path / "b" / "docs.jsonl",
                  '{"document_id": "ok", "text": "fine", "acl": ["hr"]}\n'
                  '{"document_id": "bad", "text": "t", "acl": ["hr", "*"]}\n')
    with pytest.raises(LoaderError, match=r"docs\.jsonl:2: acl\[1\]: '\*' is a key's group, not a document's"):
        load_documents([lines])
    write(lines, '{"document_id": "bad", "text": "t", "acl": "hr"}\n')
    with pytest.raises(LoaderError, match=r"docs\.jsonl:1: 'acl' must be a list of group names, got str"):
        load_documents([lines])
    with pytest.raises(LoaderError, match=r"--acl: acl\[0\]: group 'a b' is invalid"):
        load_documents([tmp_path / "b"], acl=["a b"])


def test_a_ledger_written_before_acls_is_migrated_and_keeps_working(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    old_schema = re.sub(r",\n\s*acl_json\s+TEXT NOT NULL DEFAULT '\[\]'", "", SCHEMA)
    assert "acl_json" not in old_schema
    document = Document("guide", "The guide text.", title="Guide", source="guide.md",
                        created_at="2024-01-01T00:00:00+00:00")
    db = sqlite3.connect(path)
    db.executescript(old_schema)
    db.execute("INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?, ?, 1, 'live', ?)",
               (document.document_id, document.title, document.text, document.source, "{}", document.created_at,
                document.content_hash, document.created_at))
    db.execute("INSERT INTO chunks VALUES (1, 'c1', 'guide', 0, '', 'The guide text.', 4, ?, 'guide.md', 'h')",
               (document.created_at,))
    db.commit()
    db.close()

    ledger = Ledger(path)
    row = ledger.get_document("guide")
    assert row.document.acl == () and row.content_hash == document.content_hash  # unchanged: not re-indexed
    assert ledger.get_chunks(1, ["c1"])["c1"].acl == () and ledger.chunk_acls(1) == {"c1": ""}
    with ledger.transaction() as tx:
        ledger.upsert_document(tx, Document("guide", "The guide text.", acl=("hr",)))
        ledger.insert_chunks(tx, 1, [Chunk("c1", "guide", "The guide text.", "", 0, 4, "t", "guide.md", "h",
                                           acl=("hr",))])
    ledger.close()
    reopened = Ledger(path)  # a second open finds nothing to migrate
    assert reopened.get_document("guide").document.acl == ("hr",) and reopened.chunk_acls(1) == {"c1": "hr"}
    assert reopened.get_document("guide").version == 2
    reopened.close()
