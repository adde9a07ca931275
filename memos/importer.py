"""Plan and run `memos import`: which cube each checked file goes to, what it already holds.

An import is planned whole before anything is written: every file read and checked
(`jsonl_format.read_jsonl`), every target cube looked up, every resumed cube compared with its
file. Only a plan without problems is run.

Resuming needs no marker in the memories (an export imports back with its metadata unchanged):
batches are atomic and stored in file order, so an interrupted import leaves the cube holding
exactly the file's first K memories. `--resume` reads the cube back and checks that its memories,
in order, are the file's first K lines field by field (`jsonl_format.differences`), then sends
the rest. A cube that holds anything else (other memories, an edited or deleted one) is refused
with the first difference, never appended to blindly. So resume is for a cube that only this
file fills; to add a file to a cube with other memories, import without `--resume`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from memos.client import Cube, Memory, MemosClient, MemosConnectionError, MemosError
from memos.jsonl_format import JsonlFile, Line, differences


class ImportRefused(Exception):
    """The plan cannot run; nothing was written. `code` is snake_case, as the API's errors."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class PartialImport(Exception):
    """`failed`, a batch, got an error after `stored` lines went in (the earlier batches).

    `unknown` when no reply came (timeout, connection lost): the batch may be stored or not.
    """

    def __init__(self, stored: int, failed: Sequence[Line], error: MemosError) -> None:
        super().__init__(str(error))
        self.stored = stored
        self.failed = list(failed)
        self.error = error

    @property
    def unknown(self) -> bool:
        return isinstance(self.error, MemosConnectionError)


@dataclass(frozen=True)
class Target:
    """One file's share of the plan. `cube` is None for a cube still to be created."""

    file: JsonlFile
    name: str  # the cube's name (its id when it is addressed by id and not yet fetched)
    cube: Cube | None
    present: int = 0  # lines already in the cube (resume): sending starts after them
    skip: bool = False  # --skip-existing: the cube exists, leave it as it is

    @property
    def to_send(self) -> list[Line]:
        return [] if self.skip else self.file.lines[self.present :]


def resume_point(stored: Iterable[Memory], lines: Sequence[Line], where: str) -> int:
    """How many of `lines` the cube already holds: its memories must be exactly their prefix."""
    count = 0
    for memory in stored:
        if count == len(lines):
            raise ImportRefused(
                "resume_mismatch",
                f"{where} holds more memories than the file's {len(lines)}: "
                "it is not (only) an import of this file",
            )
        line = lines[count]
        if changed := differences(memory, line):
            raise ImportRefused(
                "resume_mismatch",
                f"{where}: memory {count + 1} ({memory.id}) differs from line {line.lineno} "
                f"in {', '.join(changed)}: the cube is not an interrupted import of this file",
            )
        count += 1
    return count


def plan_into(client: MemosClient, cube_id: str, file: JsonlFile, resume: bool) -> Target:
    """`memos import CUBE_ID FILE`: the cube must exist; with `resume`, compared first."""
    cube = client.get_cube(cube_id)
    present = 0
    if resume:
        present = resume_point(client.iter_memories(cube.id), file.lines, f"cube {cube.id}")
    return Target(file, cube.name, cube, present)


def plan_by_name(
    client: MemosClient, files: Sequence[tuple[str, JsonlFile]], existing: str
) -> list[Target]:
    """`memos import --create FILE...`: one cube per (name, file), owned by the caller.

    `existing` says what to do with a name the caller already owns: "refuse" (the default:
    the whole import is refused, naming them), "skip" or "resume".
    """
    owned = {c.name: c for c in client.list_cubes() if c.role == "owner"}
    clashes = [f"{name} ({owned[name].id})" for name, _ in files if name in owned]
    if clashes and existing == "refuse":
        raise ImportRefused(
            "cube_exists",
            f"you already have cubes named {', '.join(clashes)}; pass --skip-existing to leave "
            "them as they are or --resume to continue their import",
        )
    targets = []
    for name, file in files:
        cube = owned.get(name)
        if cube is None:
            targets.append(Target(file, name, None))
        elif existing == "skip":
            targets.append(Target(file, name, cube, skip=True))
        else:
            where = f"cube {name} ({cube.id})"
            present = resume_point(client.iter_memories(cube.id), file.lines, where)
            targets.append(Target(file, name, cube, present))
    return targets


def batches(lines: Sequence[Line], max_items: int, max_bytes: int) -> Iterator[list[Line]]:
    """Consecutive runs of at most `max_items` lines and about `max_bytes` of JSON each.

    A single line larger than `max_bytes` goes alone (the daemon judges it by its own limits).
    """
    batch: list[Line] = []
    size = 0
    for line in lines:
        cost = len(json.dumps(line.payload, ensure_ascii=False).encode("utf-8")) + 2
        if batch and (len(batch) == max_items or size + cost > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(line)
        size += cost
    if batch:
        yield batch


def upload(
    client: MemosClient,
    cube_id: str,
    lines: Sequence[Line],
    max_items: int,
    max_bytes: int,
    progress: Callable[[int], None],
) -> int:
    """Send `lines` in order, batch by batch; `PartialImport` says how many got in first."""
    done = 0
    for batch in batches(lines, max_items, max_bytes):
        try:
            client.add_memories(cube_id, [line.item for line in batch])
        except MemosError as exc:
            raise PartialImport(done, batch, exc) from exc
        done += len(batch)
        progress(len(batch))
    return done
