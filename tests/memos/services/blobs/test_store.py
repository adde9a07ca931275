"""The blob store over a private Redis: write-through, fetch with sha256 checks, missing, down."""

from __future__ import annotations

import hashlib
import json
import signal
import time
from pathlib import Path

import pytest

import kv_runtime
from memos.services.blobs import BlobStore, BlobUnavailable, LocalDirectory, RedisTier

BLOB = "kv-0123abcd.safetensors"


def store(root: Path, url: str, alone: bool = True, max_bytes: int = 1 << 20) -> BlobStore:
    tier = RedisTier(url, timeout_s=1.0, retry_s=0.3, ttl_s=3600)
    return BlobStore(LocalDirectory(root), tier, lambda: alone, max_bytes, retry_after_s=7)


def save(root: Path, cube: str, act: str, payload: bytes, blob: str = BLOB) -> dict[str, bytes]:
    """What `kv_runtime.store` leaves: a blob and a manifest naming it (the store reads no
    more of it)."""
    folder = root / cube / act
    folder.mkdir(parents=True, exist_ok=True)
    manifest = json.dumps({"blob": blob, "payload": len(payload)}).encode()
    (folder / blob).write_bytes(payload)
    (folder / "manifest.json").write_bytes(manifest)
    return {"manifest.json": manifest, blob: payload}


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_published_activation_is_fetched_by_another_daemon_byte_for_byte(tmp_path, private_redis):
    a, b = store(tmp_path / "a", private_redis.url), store(tmp_path / "b", private_redis.url)
    written = save(a.root, "cube_1", "act_1", b"\x01\x02" * 5000)
    a.publish("cube_1", "act_1")
    stored = private_redis.client().hgetall("memos:act:cube_1:act_1")
    assert stored == {
        **{f"file:{n}".encode(): d for n, d in written.items()},
        **{f"sha256:{n}".encode(): hashlib.sha256(d).hexdigest().encode()
           for n, d in written.items()},
    }  # fmt: skip
    assert 0 < private_redis.client().ttl("memos:act:cube_1:act_1") <= 3600
    path = b.fetch("cube_1", "act_1")
    assert path == tmp_path / "b" / "cube_1" / "act_1"
    assert files(path) == written and (a.published, b.fetched) == (1, 1)
    assert b.fetch("cube_1", "act_1") == path and b.fetched == 1  # on disk now, same manifest


def test_bytes_altered_in_redis_fail_their_sha256_and_nothing_is_written(tmp_path, private_redis):
    a, b = store(tmp_path / "a", private_redis.url), store(tmp_path / "b", private_redis.url)
    save(a.root, "cube_1", "act_1", b"\x05" * 4096)
    a.publish("cube_1", "act_1")
    private_redis.client().hset("memos:act:cube_1:act_1", f"file:{BLOB}", b"\x05" * 4095 + b"\x06")
    with pytest.raises(kv_runtime.ActivationCorrupt, match=f"{BLOB} in redis does not match"):
        b.fetch("cube_1", "act_1")
    assert not (b.root / "cube_1" / "act_1").exists()


def test_a_re_saved_activation_is_fetched_again_where_an_older_copy_is_on_disk(
    tmp_path, private_redis
):
    a, b = store(tmp_path / "a", private_redis.url), store(tmp_path / "b", private_redis.url)
    save(a.root, "cube_1", "act_1", b"old")
    a.publish("cube_1", "act_1")
    b.fetch("cube_1", "act_1")
    (a.root / "cube_1" / "act_1" / BLOB).unlink()
    newer = save(a.root, "cube_1", "act_1", b"requantized", blob="kv-ffff.safetensors")
    a.publish("cube_1", "act_1")  # (the migrate job re-quantized it on a)
    assert files(b.fetch("cube_1", "act_1")) == newer  # the old blob is gone from b's folder


def test_an_activation_in_neither_place_is_unavailable_not_corrupt(tmp_path, private_redis):
    b = store(tmp_path / "b", private_redis.url)
    with pytest.raises(BlobUnavailable) as refused:
        b.fetch("cube_1", "act_nowhere")
    assert refused.value.code == "activation_unavailable" and refused.value.retry_after == 7
    assert "neither on this daemon's disk nor in redis" in refused.value.message


def test_files_over_the_size_bound_are_not_written_to_redis(tmp_path, private_redis):
    a = store(tmp_path / "a", private_redis.url, max_bytes=1000)
    save(a.root, "cube_1", "small", b"x" * 100)
    save(a.root, "cube_1", "large", b"x" * 2000)
    a.publish("cube_1", "small")
    a.publish("cube_1", "large")
    assert (a.published, a.skipped) == (1, 1)
    assert private_redis.client().keys("memos:act:*") == [b"memos:act:cube_1:small"]


def test_removal_deletes_from_redis_too_and_a_cube_takes_only_its_own(tmp_path, private_redis):
    a = store(tmp_path / "a", private_redis.url)
    for cube, act in (("cube_1", "act_1"), ("cube_1", "act_2"), ("cube_2", "act_3")):
        save(a.root, cube, act, b"z")
        a.publish(cube, act)
    a.remove("cube_1", "act_1")
    assert not (a.root / "cube_1" / "act_1").exists()
    keys = sorted(private_redis.client().keys("memos:act:*"))
    assert keys == [b"memos:act:cube_1:act_2", b"memos:act:cube_2:act_3"]
    a.remove_cube("cube_1")
    assert private_redis.client().keys("memos:act:*") == [b"memos:act:cube_2:act_3"]
    assert not (a.root / "cube_1").exists() and (a.root / "cube_2" / "act_3").is_dir()


def test_gone_only_when_no_other_daemon_lives_and_redis_has_none(tmp_path, private_redis):
    alone = store(tmp_path / "a", private_redis.url)
    crowd = store(tmp_path / "b", private_redis.url, alone=False)
    assert alone.gone("cube_1", "act_1") and not crowd.gone("cube_1", "act_1")
    save(tmp_path / "c", "cube_1", "act_1", b"q")
    store(tmp_path / "c", private_redis.url).publish("cube_1", "act_1")
    assert not alone.gone("cube_1", "act_1")  # in redis: another daemon may fetch it
    private_redis.stop()
    assert not alone.gone("cube_1", "act_2")  # redis cannot say: not gone
    local_only = BlobStore(LocalDirectory(tmp_path / "d"))
    assert local_only.gone("cube_1", "act_1") and local_only.health() == "off"


def test_redis_down_answers_fast_serves_local_files_and_catches_up_when_back(
    tmp_path, private_redis
):
    a, b = store(tmp_path / "a", private_redis.url), store(tmp_path / "b", private_redis.url)
    save(a.root, "cube_1", "here", b"h")
    a.publish("cube_1", "here")
    assert a.health() == "ok"
    private_redis.stop()
    started = time.monotonic()
    assert a.fetch("cube_1", "here") == a.root / "cube_1" / "here"  # on disk: still served
    with pytest.raises(BlobUnavailable, match="redis is down"):
        b.fetch("cube_1", "here")
    assert a.health() == b.health() == "down"
    written = save(a.root, "cube_1", "built_meanwhile", b"m")
    a.publish("cube_1", "built_meanwhile")  # remembered, not lost
    a.remove("cube_1", "here")  # the delete too
    assert a.pending() == 2
    assert time.monotonic() - started < 2.0  # refused connections, then the back-off
    private_redis.start()
    time.sleep(0.4)  # past retry_s: the next call asks redis again
    assert a.health() == "ok"  # and replays what it missed, on a thread of its own
    deadline = time.monotonic() + 10
    while a.pending():
        assert time.monotonic() < deadline, "the missed writes were not replayed"
        time.sleep(0.02)
    assert private_redis.client().keys("memos:act:*") == [b"memos:act:cube_1:built_meanwhile"]
    assert files(b.fetch("cube_1", "built_meanwhile")) == written


def test_a_redis_that_hangs_costs_one_timeout_then_the_back_off_answers_at_once(
    tmp_path, private_redis
):
    b = store(tmp_path / "b", private_redis.url)
    assert private_redis.proc is not None
    private_redis.proc.send_signal(signal.SIGSTOP)  # accepts connections, never answers
    try:
        started = time.monotonic()
        with pytest.raises(BlobUnavailable, match="TimeoutError"):
            b.fetch("cube_1", "act_1")
        first = time.monotonic() - started
        started = time.monotonic()
        with pytest.raises(BlobUnavailable, match="not asked again yet"):
            b.fetch("cube_1", "act_2")
        second = time.monotonic() - started
        assert b.health() == "down"
    finally:
        private_redis.proc.send_signal(signal.SIGCONT)
    assert 0.9 <= first < 1.9 and second < 0.1, (first, second)  # timeout_s=1
    time.sleep(0.4)
    assert b.health() == "ok"


def test_a_redis_restarted_empty_gets_back_what_this_disk_holds(tmp_path, private_redis):
    a = store(tmp_path / "a", private_redis.url)
    for act in ("act_1", "act_2", "act_3"):
        save(a.root, "cube_1", act, act.encode())
        a.publish("cube_1", act)
    private_redis.stop()
    private_redis.start()  # --save '': empty
    time.sleep(0.4)  # past the back-off the stop may have started
    ready = [("cube_1", "act_1"), ("cube_1", "act_2"), ("cube_1", "act_3"), ("cube_1", "act_9")]
    assert a.republish(ready, limit=2) == 2  # act_9 is not on this disk
    assert a.republish(ready) == 1 and a.republish(ready) == 0
    keys = sorted(private_redis.client().keys("memos:act:*"))
    assert keys == [f"memos:act:cube_1:act_{i}".encode() for i in (1, 2, 3)]


def test_a_shared_directory_is_the_local_store_every_daemon_points_at(tmp_path):
    from memos.settings import Settings

    settings = Settings(data_dir=tmp_path / "data", blobs={"directory": tmp_path / "shared"})
    assert settings.activation_dir == tmp_path / "shared"
    assert Settings(data_dir=tmp_path / "data").activation_dir == tmp_path / "data/activations"
    a, b = (BlobStore(LocalDirectory(settings.activation_dir)) for _ in range(2))
    written = save(a.root, "cube_1", "act_1", b"s")
    assert files(b.fetch("cube_1", "act_1")) == written and b.health() == "off"
    with pytest.raises(BlobUnavailable, match="not on this daemon's disk"):
        b.fetch("cube_1", "act_2")
