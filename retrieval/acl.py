"""Document access control as the indexes store and filter it.

A document's ``acl`` is a tuple of group names; empty means public. A caller sees a chunk when it is
public or the caller holds one of its groups; ``groups=None`` (the local operator, a ``*`` key) sees
everything and filters nothing.

How the two indexes hold it (both filter before fusion, so top-k is filled from visible chunks):
- Chroma: metadata ``acl`` is a list (chromadb 1.x supports list values and ``$contains``). A public
  chunk stores ``["#public"]``, a restricted one its groups plus ``"#restricted"``; ``#`` is not a
  group character, so no group collides with a marker. A list is always written because Chroma merges
  metadata on upsert/update: a key left out would keep its old value. A chunk written before ACLs
  existed has no ``acl`` key; ``$not_contains`` matches it, so it stays public, like its ledger row.
- BM25: a string column aligned with the chunk ids, the groups joined by ``,`` ("" public), turned into
  a weight mask inside bm25s' scoring.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

GROUP_PATTERN = r"^[A-Za-z0-9_.:@*-]{1,128}$"
SEES_ALL = "*"
PUBLIC_MARK = "#public"
RESTRICTED_MARK = "#restricted"
Groups = frozenset[str] | None  # a caller's groups; None sees every document

_GROUP = re.compile(GROUP_PATTERN)


def group_error(group: object) -> str | None:
    """What is wrong with `group` as an entry of a document's acl, or None."""
    if not isinstance(group, str) or not _GROUP.match(group):
        return f"group {group!r} is invalid: use 1-128 letters, digits or _ . : @ * -"
    if group == SEES_ALL:
        return f"{SEES_ALL!r} is a key's group, not a document's; give no acl (or []) for a public document"
    return None


def normalize_acl(acl: Iterable[str]) -> tuple[str, ...]:
    """The acl as stored: sorted, without repeats. ValueError naming the first invalid group."""
    groups = tuple(acl)
    for position, group in enumerate(groups):
        error = group_error(group)
        if error:
            raise ValueError(f"acl[{position}]: {error}")
    return tuple(sorted(set(groups)))


def visible(acl: Sequence[str], groups: Groups) -> bool:
    return groups is None or not acl or not groups.isdisjoint(acl)


def chroma_acl(acl: Sequence[str]) -> list[str]:
    """The chunk's ``acl`` metadata value in Chroma."""
    return [*acl, RESTRICTED_MARK] if acl else [PUBLIC_MARK]


def chroma_acl_where(groups: Groups) -> dict[str, Any] | None:
    """The Chroma `where` clause for what `groups` may see; None: no restriction."""
    if groups is None:
        return None
    public = {"acl": {"$not_contains": RESTRICTED_MARK}}
    if not groups:
        return public
    return {"$or": [public, *({"acl": {"$contains": group}} for group in sorted(groups))]}


def bm25_acl(acl: Sequence[str]) -> str:
    """The chunk's value in the BM25 index's acl column."""
    return ",".join(acl)
