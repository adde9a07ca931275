"""Opaque ids and page cursors."""

from __future__ import annotations

import base64
import hashlib
import secrets

from memcube.errors import InvalidArgument


def new_id(prefix: str) -> str:
    """e.g. `mem_3f9c0a1b2c3d4e5f6a7b`: a type prefix and 80 random bits."""
    return f"{prefix}_{secrets.token_hex(10)}"


def encode_cursor(position: int) -> str:
    return base64.urlsafe_b64encode(f"p{position}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    if cursor is None or cursor == "":
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not raw.startswith("p"):
            raise ValueError(raw)
        position = int(raw[1:])
        if not 0 <= position < 2**63:
            raise ValueError(raw)
        return position
    except ValueError:
        raise InvalidArgument(
            f"cursor {cursor!r} is not one this server issued; pass next_cursor back unchanged",
            code="invalid_cursor",
        ) from None


def note_chunk_id(memory_id: str, version: int) -> str:
    """The activation id of a note's KV chunk (`activations.notes`): derived from the note and
    its version, so "has this note a current chunk" is one primary-key lookup, and a chunk of
    an older version can never pass for the current one."""
    digest = hashlib.blake2b(f"{memory_id}@{version}".encode(), digest_size=10).hexdigest()
    return f"kvn_{digest}"
