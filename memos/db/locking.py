"""Row locks taken in one order, so that transactions updating several rows never deadlock.

PostgreSQL locks the rows a multi-row UPDATE touches in the order it finds them, which differs
from one statement to another: two transactions updating overlapping sets of memories (one
daemon releasing its enrichment claims while another flushes recall counts, or commits an
enrichment that evolves a neighbour) can each hold a row the other waits for, and PostgreSQL
then fails one of them ("deadlock detected"). Taking the locks first, in primary-key order, with
one SELECT ... FOR NO KEY UPDATE, removes the cycle. SQLite runs one write transaction at a
time: nothing to do there.

The order, for every write that changes a cube's memories: the cube's row first (`lock_cube`:
the write bumps its generation anyway), then the memories, by seq (`lock_memories`, or a
SELECT ... ORDER BY seq FOR UPDATE). A write that locked a memory and then the cube would meet
an enrichment commit holding the cube and waiting for that memory.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from memos.db.models import Activation, Cube, Memory


def _postgres(s: Session) -> bool:
    return s.get_bind().dialect.name == "postgresql"


def lock_cube(s: Session, cube_id: str) -> None:
    """Lock the cube's row before any of its memories (PostgreSQL; no-op on SQLite). NO KEY:
    inserts of memories into the cube (foreign key checks) are not held up."""
    if _postgres(s):
        s.execute(select(Cube.id).where(Cube.id == cube_id).with_for_update(key_share=True))


def lock_memories(s: Session, *where: ColumnElement[bool]) -> None:
    """Lock the memories `where` selects, in seq order (PostgreSQL; no-op on SQLite). NO KEY:
    inserts of rows that reference them (links, history) are not held up."""
    if _postgres(s):
        query = select(Memory.seq).where(*where).order_by(Memory.seq)
        s.execute(query.with_for_update(key_share=True))


def lock_activations(s: Session, *where: ColumnElement[bool]) -> None:
    """Lock the activations `where` selects, in id order (PostgreSQL; no-op on SQLite)."""
    if _postgres(s):
        query = select(Activation.id).where(*where).order_by(Activation.id)
        s.execute(query.with_for_update(key_share=True))
