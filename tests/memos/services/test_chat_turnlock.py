"""The fleet-wide chat turn lock (`memos/services/chats/turnlock.py`) on SQLite and PostgreSQL:
one holder at a time, renewed while held, taken over only once expired, released at the end."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from memcube.errors import NotFound
from memos.db.engine import Database
from memos.db.models import Chat, Cube, User
from memos.services.chats.catalogue import ChatCatalogue, ChatSpec
from memos.services.chats.turnlock import TurnLocks


@pytest.fixture
def db(migrated_db):
    db = migrated_db
    with db.write() as s:
        s.add(User(id="u1", name="u"))
        s.flush()
        s.add(Cube(id="c1", name="c", owner_id="u1"))
    return db


def _chat(db: Database) -> str:
    spec = ChatSpec(None, {"top_k": 0, "filters": {}}, 256, {"temperature": 0.0})
    return ChatCatalogue(db).create("c1", None, spec).id


def _row(db: Database, chat_id: str) -> tuple[str | None, object]:
    with db.read() as s:
        row = s.execute(select(Chat.turn_holder, Chat.turn_until).where(Chat.id == chat_id)).one()
    return row[0], row[1]


def test_one_holder_at_a_time_and_a_released_chat_is_free(db):
    chat_id = _chat(db)
    a = TurnLocks(db, "inst_a", lease_s=30, renew_s=10)
    b = TurnLocks(db, "inst_b", lease_s=30, renew_s=10)
    assert a.take(chat_id)
    assert not b.take(chat_id)  # a holds it
    assert a.take(chat_id)  # its own: the service's in-process lock keeps a to one turn
    assert _row(db, chat_id)[0] == "inst_a"
    b.give(chat_id)  # not b's: nothing changes
    assert _row(db, chat_id)[0] == "inst_a"
    a.give(chat_id)
    assert _row(db, chat_id) == (None, None) and a.held() == []
    assert b.take(chat_id) and b.held() == [chat_id]
    b.close()
    a.close()


def test_an_unrenewed_lease_is_taken_over_a_renewed_one_is_not(db):
    chat_id, other_id = _chat(db), _chat(db)
    alive = TurnLocks(db, "inst_alive", lease_s=1.0, renew_s=0.2)
    dead = TurnLocks(db, "inst_dead", lease_s=1.0, renew_s=0.2)
    dead.close()  # stops its renewer before it starts: a daemon killed mid-turn
    peer = TurnLocks(db, "inst_peer", lease_s=1.0, renew_s=0.2)
    assert alive.take(chat_id) and dead.take(other_id)
    time.sleep(1.6)  # past both leases; only the alive holder's renewer extended its own
    assert not peer.take(chat_id)
    assert peer.take(other_id)
    assert _row(db, other_id)[0] == "inst_peer"
    assert dead.renew() == 0  # the dead holder has lost it
    assert not dead.confirm(other_id)  # a turn of it would store nothing
    assert alive.confirm(chat_id) and peer.confirm(other_id)
    alive.close()
    peer.close()


def test_a_deleted_chat_is_404_not_busy(db):
    locks = TurnLocks(db, "inst_a", lease_s=30, renew_s=10)
    with pytest.raises(NotFound):
        locks.take("chat_missing")
    locks.close()
