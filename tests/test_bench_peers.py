"""bench/peers.py's update audit: the one function that counts stale, deleted and duplicate chunks for every
system, so what it calls stale must be exactly "text the current document no longer holds"."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from peers import audit, marker, squash  # noqa: E402

TITLES = {"a": "Aspirin and pain", "b": "Beta blockers", "c": "Gone"}
OLD_A = "Aspirin relieves pain. It is cheap. It is old."
NEW_A = f"{marker('a')} It is cheap. It is old."
CURRENT = {"a": squash(f"{TITLES['a']}\n{NEW_A}"), "b": squash(f"{TITLES['b']}\nThey slow the heart.  Rest helps.")}


def counts(chunks):
    return audit(chunks, titles=TITLES, current=CURRENT, changed={"a"}, deleted={"c"})


def test_old_text_of_a_changed_document_is_stale_and_its_new_text_fresh():
    result = counts([("a", f"{TITLES['a']}\n{OLD_A}"), ("a", f"{TITLES['a']}\n{NEW_A}")])
    assert (result["stale"], result["fresh"], result["unmatched"]) == (1, 1, 0)


def test_unchanged_slices_count_as_current_with_or_without_a_title_header_and_other_whitespace():
    result = counts([("a", "It is cheap.\nIt is old."), ("b", "Beta blockers\nRest helps."),
                     ("b", "They slow the heart. Rest helps.")])
    assert result["chunks"] == 3 and result["stale"] == result["unmatched"] == 0


def test_chunks_of_deleted_documents_and_second_copies_are_counted():
    result = counts([("c", "Gone\nanything"), ("b", "Rest helps."), ("b", "Rest  helps.")])
    assert (result["deleted"], result["duplicate"]) == (1, 1)


def test_a_chunk_with_text_its_unchanged_document_never_had_is_unmatched_not_stale():
    result = counts([("b", "Beta blockers\nThey cure everything.")])
    assert (result["unmatched"], result["stale"]) == (1, 0)
