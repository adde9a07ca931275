"""Batching and the resume check of `memos import`, on their own (the CLI tests run them whole)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from memos.client import Memory, MemosClient
from memos.importer import ImportRefused, PartialImport, batches, resume_point, upload
from memos.jsonl_format import Line, read_jsonl


def _lines(tmp_path: Path, contents: list[str]) -> list[Line]:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"content": c}) + "\n" for c in contents))
    return read_jsonl(path).lines


def _stored(contents: list[str]) -> list[Memory]:
    return [
        Memory.model_validate(
            {"id": f"mem_{i}", "cube_id": "cube_1", "content": c, "timestamp": "2024-01-01T00:00Z",
             "version": 1, "created_at": "2024-01-01T00:00Z", "updated_at": "2024-01-01T00:00Z"}
        )
        for i, c in enumerate(contents)
    ]  # fmt: skip


def test_batches_bound_items_and_bytes(tmp_path: Path) -> None:
    lines = _lines(tmp_path, ["a" * 100] * 7 + ["b" * 1000] + ["c"] * 3)
    by_count = [[line.lineno for line in b] for b in batches(lines, 3, 1 << 20)]
    assert by_count == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11]]
    # Each "a" line costs 117 bytes as JSON (+2): 4 fit in 500; the 1,017-byte line goes alone.
    by_bytes = [[line.lineno for line in b] for b in batches(lines, 1000, 500)]
    assert by_bytes == [[1, 2, 3, 4], [5, 6, 7], [8], [9, 10, 11]]
    assert list(batches([], 10, 100)) == []


def test_resume_point_is_the_matching_prefix(tmp_path: Path) -> None:
    lines = _lines(tmp_path, ["a", "b", "c", "d"])
    assert resume_point([], lines, "cube x") == 0
    assert resume_point(_stored(["a", "b"]), lines, "cube x") == 2
    assert resume_point(_stored(["a", "b", "c", "d"]), lines, "cube x") == 4


def test_resume_refuses_a_cube_that_is_not_this_import(tmp_path: Path) -> None:
    lines = _lines(tmp_path, ["a", "b", "c"])
    with pytest.raises(ImportRefused) as edited:
        resume_point(_stored(["a", "B"]), lines, "cube x")
    assert (edited.value.code, edited.value.message) == (
        "resume_mismatch",
        "cube x: memory 2 (mem_1) differs from line 2 in content: "
        "the cube is not an interrupted import of this file",
    )
    with pytest.raises(ImportRefused, match="holds more memories than the file's 3"):
        resume_point(_stored(["a", "b", "c", "d"]), lines, "cube x")


def test_upload_without_a_reply_leaves_the_batch_fate_unknown(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    lines = _lines(tmp_path, ["a", "b", "c"])
    seen: list[int] = []
    with MemosClient(closed, timeout=2) as client, pytest.raises(PartialImport) as failed:
        upload(client, "cube_1", lines, 2, 1 << 20, seen.append)
    assert (failed.value.stored, [line.lineno for line in failed.value.failed]) == (0, [1, 2])
    assert failed.value.unknown and failed.value.error.code == "connection_error"
    assert seen == []
