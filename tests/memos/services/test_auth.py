"""The admin key: generated into a file, or configured; a configured key retires the file."""

from __future__ import annotations

import pytest

from memcube.errors import Unauthorized
from memos.db.engine import Database
from memos.db.migrate import upgrade
from memos.services.auth import ADMIN_USER_ID, AuthService


@pytest.fixture
def auth(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'auth.db'}")
    upgrade(db)
    yield AuthService(db)
    db.dispose()


def test_a_configured_key_removes_the_generated_key_file(auth, tmp_path):
    key_file = tmp_path / "admin.key"
    assert auth.ensure_admin(None, key_file) == str(key_file)
    generated = key_file.read_text().strip()
    assert auth.authenticate(generated).user_id == ADMIN_USER_ID
    assert auth.ensure_admin(None, key_file) is None  # a valid file is kept as it is
    assert key_file.read_text().strip() == generated

    assert auth.ensure_admin("configured-admin-key", key_file) is None
    assert not key_file.exists()  # it held a key that no longer works
    with pytest.raises(Unauthorized):
        auth.authenticate(generated)
    assert auth.authenticate("configured-admin-key").is_admin


def test_a_key_file_holding_the_configured_key_is_kept(auth, tmp_path):
    key_file = tmp_path / "admin.key"
    key_file.write_text("configured-admin-key\n")
    assert auth.ensure_admin("configured-admin-key", key_file) is None
    assert key_file.read_text() == "configured-admin-key\n"


def test_without_a_configured_key_a_new_file_replaces_a_stale_one(auth, tmp_path):
    key_file = tmp_path / "admin.key"
    auth.ensure_admin("configured-admin-key", key_file)
    key_file.write_text("msk_stale\n")  # e.g. left from another database
    assert auth.ensure_admin(None, key_file) == str(key_file)
    fresh = key_file.read_text().strip()
    assert fresh != "msk_stale" and auth.authenticate(fresh).is_admin
    with pytest.raises(Unauthorized):
        auth.authenticate("configured-admin-key")
