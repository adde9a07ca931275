"""Entity tags of memories: the ETag is the memory's version; If-Match names versions.

`ETag: "3"` is a strong tag (the version changes with every change of the memory). `If-Match`
takes a list of tags or `*`; weak tags (`W/"3"`) never match, as RFC 9110 asks of If-Match, and
a tag that is not a version matches nothing, so a malformed header gets 412, never a write.
"""

from __future__ import annotations


def etag(version: int) -> str:
    return f'"{version}"'


def parse_if_match(header: str | None) -> frozenset[int] | None:
    """The versions an `If-Match` header accepts; None when absent or `*` (any version)."""
    if header is None:
        return None
    if header.strip() == "*":
        return None
    versions = set()
    for part in header.split(","):
        tag = part.strip()
        if tag.startswith('"') and tag.endswith('"') and len(tag) >= 2:
            tag = tag[1:-1]
        if tag.isascii() and tag.isdigit() and len(tag) <= 18:
            versions.add(int(tag))
    return frozenset(versions)
