"""The activation-bytes quota check that the activation build path calls (the other quotas are
tested over HTTP in tests/memos/api/test_quotas.py)."""

from __future__ import annotations

import pytest

from memcube.errors import NotFound, QuotaExceeded
from memos.db.engine import Database
from memos.db.migrate import upgrade
from memos.db.models import Activation, Cube, User
from memos.db.types import utcnow
from memos.services.quotas import QuotaService
from memos.settings import QuotasConfig


@pytest.fixture
def db(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'q.db'}")
    upgrade(db)
    with db.write() as s:
        s.add_all([User(id="usr_a", name="a"), User(id="usr_b", name="b")])
        s.flush()
        s.add_all(
            Cube(id=cube_id, name=cube_id, owner_id=owner, generation=0)
            for cube_id, owner in (("cube_a1", "usr_a"), ("cube_a2", "usr_a"), ("cube_b", "usr_b"))
        )
        s.flush()
        for n, (cube_id, size) in enumerate((("cube_a1", 30), ("cube_a2", 40), ("cube_b", 500))):
            s.add(
                Activation(
                    id=f"act_{n}", cube_id=cube_id, model="m", source={}, compression={},
                    tokens=1, kept_tokens=1, bits=4, bytes=size, state="ready", progress=1.0,
                    created_at=utcnow(),
                )
            )  # fmt: skip
    yield db
    db.dispose()


def test_activation_bytes_count_every_cube_of_the_owner(db):
    quotas = QuotaService(db, QuotasConfig(max_activation_bytes_per_user=100))
    quotas.check_activation_bytes("cube_a1", 30)  # 30 + 40 used, 30 more: exactly the limit
    with pytest.raises(QuotaExceeded) as refused:
        quotas.check_activation_bytes("cube_a2", 31)
    assert refused.value.limit == "max_activation_bytes_per_user"
    assert refused.value.code == "quota_exceeded" and refused.value.retry_after is None
    assert "70" in refused.value.message and "100" in refused.value.message
    with pytest.raises(QuotaExceeded):  # usr_b is over already: 500 stored
        quotas.check_activation_bytes("cube_b", 1)
    with db.write() as s:  # inside a caller's transaction
        quotas.check_activation_bytes("cube_a1", 10, s)
    with pytest.raises(NotFound):
        quotas.check_activation_bytes("cube_gone", 1)


def test_zero_means_unlimited(db):
    quotas = QuotaService(db, QuotasConfig(max_activation_bytes_per_user=0))
    quotas.check_activation_bytes("cube_b", 10**12)
    quotas.check_activation_bytes("cube_gone", 1)  # not even looked up
