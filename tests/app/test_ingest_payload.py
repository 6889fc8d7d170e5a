"""POST /ingest bodies: strict validation, errors that name the document and the field."""

import json

import pytest

from app.ingest_payload import PayloadError, parse_ingest_body


def parse(payload, *, raw: bytes | None = None, max_documents=10, max_document_bytes=1000):
    body = raw if raw is not None else json.dumps(payload).encode()
    return parse_ingest_body(body, max_documents=max_documents, max_document_bytes=max_document_bytes)


def error(payload=None, **kwargs) -> PayloadError:
    with pytest.raises(PayloadError) as caught:
        parse(payload, **kwargs)
    return caught.value


def test_valid_body_becomes_documents():
    request = parse({"documents": [{"document_id": "a", "text": "one\r\ntwo", "title": "T",
                                    "metadata": {"lang": "en", "n": 3, "x": 1.5, "ok": True}}],
                     "deletes": ["b"]})
    [document] = request.documents
    assert (document.document_id, document.text, document.title, document.source) == ("a", "one\ntwo", "T", "webhook")
    assert document.metadata == {"lang": "en", "n": 3, "x": 1.5, "ok": True}
    assert request.deletes == ["b"] and document.created_at


@pytest.mark.parametrize("payload, status, mentions", [
    ({"documents": [{"text": "x"}]}, 422, ["documents[0]", "document_id", "missing"]),
    ({"documents": [{"document_id": "a", "text": ""}]}, 422, ["documents[0] (document_id 'a')", "text"]),
    ({"documents": [{"document_id": "a", "text": "  \n "}]}, 422, ["(document_id 'a')", "text", "empty"]),
    ({"documents": [{"document_id": 7, "text": "x"}]}, 422, ["documents[0]", "document_id", "string"]),
    ({"documents": [{"document_id": "a", "text": 5}]}, 422, ["(document_id 'a')", "text", "string"]),
    ({"documents": [{"document_id": "a", "text": "x"}, {"document_id": "b", "text": "x", "colour": "red"}]},
     422, ["documents[1] (document_id 'b')", "colour", "unknown field"]),
    ({"documents": [{"document_id": "a", "text": "x", "metadata": {"k": [1]}}]}, 422, ["metadata.k", "array"]),
    ({"documents": [{"document_id": "a", "text": "x", "metadata": "nope"}]}, 422, ["(document_id 'a')", "metadata"]),
    ({"documents": [{"document_id": "a", "text": "x"}, {"document_id": "a", "text": "y"}]},
     422, ["documents[1] (document_id 'a')", "duplicate of documents[0]"]),
    ({"documents": [], "deletes": [""]}, 422, ["deletes[0]"]),
    ({"documents": []}, 422, ["nothing to do"]),
    ({"extra": 1}, 422, ["extra", "unknown field"]),
    ([1, 2], 422, ["expected a JSON object"]),
])
def test_invalid_bodies_name_document_and_field(payload, status, mentions):
    caught = error(payload)
    assert caught.status == status
    for text in mentions:
        assert text in caught.detail, caught.detail


def test_malformed_json_duplicate_keys_and_nan_are_400():
    assert error(raw=b'{"documents": [').status == 400
    assert "duplicate key" in error(raw=b'{"deletes": ["a"], "deletes": ["b"]}').detail
    assert error(raw=b'{"documents": [{"document_id": "a", "text": "x", "metadata": {"v": NaN}}]}').status == 400


def test_invalid_utf8_names_the_document_and_field():
    raw = b'{"documents": [{"document_id": "ok", "text": "fine"}, {"document_id": "bad", "text": "caf\xe9"}]}'
    caught = error(raw=raw)
    assert caught.status == 422 and "documents[1] (document_id 'bad'): text: not valid UTF-8" in caught.detail
    escaped = b'{"documents": [{"document_id": "s", "text": "lone \\ud800 surrogate"}]}'
    assert "(document_id 's'): text: not valid UTF-8" in error(raw=escaped).detail


def test_limits_are_413():
    too_many = {"documents": [{"document_id": str(i), "text": "x"} for i in range(11)]}
    caught = error(too_many)
    assert caught.status == 413 and "RAG_INGEST_MAX_DOCUMENTS" in caught.detail
    big = {"documents": [{"document_id": "small", "text": "x"}, {"document_id": "big", "text": "é" * 600}]}
    caught = error(big)
    assert caught.status == 413 and "documents[1] (document_id 'big'): text" in caught.detail


def test_a_document_also_deleted_is_accepted():
    request = parse({"documents": [{"document_id": "a", "text": "x"}], "deletes": ["a"]})
    assert [d.document_id for d in request.documents] == ["a"] and request.deletes == ["a"]
