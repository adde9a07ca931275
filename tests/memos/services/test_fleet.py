"""Instances, their leases, and named fleet-wide leases, on SQLite and PostgreSQL."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from memcube.errors import Unauthorized
from memos.db.engine import Database
from memos.db.migrate import upgrade
from memos.db.models import JobRun
from memos.services.fleet import Instance, Leases, owner_gone
from memos.services.fleet.instance import load_instance_id


@pytest.fixture
def db(migrated_db):
    return migrated_db


def test_instance_id_is_kept_in_the_data_dir(tmp_path):
    first = load_instance_id(None, tmp_path)
    assert first.startswith("inst_")
    assert load_instance_id(None, tmp_path) == first  # a restart is the same instance
    assert load_instance_id("node-a", tmp_path) == "node-a"  # the setting wins


def test_work_of_a_live_daemon_is_never_taken_over(db):
    a = Instance(db, "inst_a", lease_s=1.0, heartbeat_s=0.2)
    b = Instance(db, "inst_b", lease_s=1.0, heartbeat_s=0.2)
    a.start()
    b.register()
    with db.write() as s:
        s.add_all(
            [
                JobRun(id="run_a", job_name="j", trigger="manual", status="running",
                       instance_id="inst_a"),
                JobRun(id="run_b", job_name="j", trigger="manual", status="running",
                       instance_id="inst_b"),
                JobRun(id="run_old", job_name="j", trigger="manual", status="running"),
            ]
        )  # fmt: skip

    def takeable(me: str) -> set[str]:
        with db.read() as s:
            return set(s.scalars(select(JobRun.id).where(owner_gone(JobRun.instance_id, me))))

    # b sees a alive (its heartbeat renews it), and its own earlier work as its own to recover.
    time.sleep(1.5)
    assert takeable("inst_b") == {"run_b", "run_old"}
    # b has not renewed: a may take b's work over, never b's while b's lease runs.
    assert takeable("inst_a") == {"run_a", "run_b", "run_old"}
    assert {m["id"] for m in a.members()} == {"inst_a"}
    a.stop()  # a clean stop ends the lease at once
    assert takeable("inst_b") == {"run_a", "run_b", "run_old"}


def test_a_lease_has_one_holder_until_it_expires(db):
    a, b = Leases(db, "inst_a"), Leases(db, "inst_b")
    assert a.try_acquire("scheduler", ttl_s=0.6)
    assert not b.try_acquire("scheduler", ttl_s=0.6)
    assert a.try_acquire("scheduler", ttl_s=0.6)  # renewed by its holder
    assert b.holder_of("scheduler") == "inst_a"
    time.sleep(0.8)
    assert b.holder_of("scheduler") is None
    assert b.try_acquire("scheduler", ttl_s=5)  # expired: taken over
    assert not a.try_acquire("scheduler", ttl_s=5)
    b.release("scheduler")
    assert a.try_acquire("scheduler", ttl_s=5)


@pytest.mark.postgres
def test_daemons_starting_together_share_one_admin(fresh_postgres_url, tmp_path):
    """Four daemons of a fleet, started at the same moment on a new database: every one
    starts (the first creates the admin, the others find it) and the shared key works."""
    from concurrent.futures import ThreadPoolExecutor

    from memos.services.auth import AuthService

    db = Database(fresh_postgres_url)
    upgrade(db)

    def start(i: int) -> str | None:
        own = Database(fresh_postgres_url)
        try:
            return AuthService(own).ensure_admin("fleet-admin-key-0123456789", tmp_path / f"{i}")
        finally:
            own.dispose()

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(start, range(4))) == [None] * 4  # none failed, none generated
    assert AuthService(db).authenticate("fleet-admin-key-0123456789").is_admin
    db.dispose()


@pytest.mark.postgres
def test_a_daemon_generating_its_own_admin_key_leaves_the_others_working(
    fresh_postgres_url, tmp_path
):
    """Two daemons of a fleet without MEMOS_ADMIN_KEY each generate a key into their own data
    dir: the second must not revoke the first's (SQLite, one daemon, still revokes)."""
    from memos.services.auth import AuthService

    db = Database(fresh_postgres_url)
    upgrade(db)
    auth = AuthService(db)
    files = [tmp_path / "a" / "admin.key", tmp_path / "b" / "admin.key"]
    for file in files:
        file.parent.mkdir()
        assert auth.ensure_admin(None, file) == str(file)
    keys = [file.read_text().strip() for file in files]
    assert keys[0] != keys[1]
    assert all(auth.authenticate(key).is_admin for key in keys)
    # A configured key is the admin's only key, in a fleet too.
    assert auth.ensure_admin("fleet-admin-key-0123456789", files[0]) is None
    assert auth.authenticate("fleet-admin-key-0123456789").is_admin
    for key in keys:
        with pytest.raises(Unauthorized):
            auth.authenticate(key)
    db.dispose()
