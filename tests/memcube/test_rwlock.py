"""The readers-writer lock of a cube index: who waits for whom."""

from __future__ import annotations

import threading

from memcube.rwlock import ReadWriteLock

BLOCKED_S = 0.2  # long enough for a thread that could go on to have done so


def _in_thread(fn) -> tuple[threading.Thread, threading.Event]:
    """Run fn in a thread; the event is set once fn returned."""
    done = threading.Event()

    def run() -> None:
        fn()
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done


def _hold(lock: ReadWriteLock, mode: str, release: threading.Event) -> threading.Event:
    """Hold the lock (`read` or `write`) in a thread until `release`; returns 'entered'."""
    entered = threading.Event()

    def run() -> None:
        with getattr(lock, mode)():
            entered.set()
            release.wait()

    threading.Thread(target=run, daemon=True).start()
    return entered


def test_readers_share_it():
    lock, release = ReadWriteLock(), threading.Event()
    assert _hold(lock, "read", release).wait(5)
    assert _hold(lock, "read", release).wait(5)  # a second reader goes in alongside
    release.set()


def test_a_writer_waits_for_readers_and_readers_for_a_writer():
    lock, release_reader, release_writer = ReadWriteLock(), threading.Event(), threading.Event()
    assert _hold(lock, "read", release_reader).wait(5)
    writer = _hold(lock, "write", release_writer)
    assert not writer.wait(BLOCKED_S)
    release_reader.set()
    assert writer.wait(5)
    reader = _hold(lock, "read", threading.Event())
    assert not reader.wait(BLOCKED_S)
    release_writer.set()
    assert reader.wait(5)


def test_a_waiting_writer_holds_back_later_readers():
    """A stream of searches cannot starve a change: once a writer waits, new readers queue."""
    lock, release_first = ReadWriteLock(), threading.Event()
    assert _hold(lock, "read", release_first).wait(5)
    release_writer = threading.Event()
    writer = _hold(lock, "write", release_writer)
    assert not writer.wait(BLOCKED_S)
    late = _hold(lock, "read", threading.Event())
    assert not late.wait(BLOCKED_S)  # behind the waiting writer, not beside the first reader
    release_first.set()
    assert writer.wait(5)
    assert not late.wait(BLOCKED_S)
    release_writer.set()
    assert late.wait(5)


def test_a_writer_yielding_between_steps_lets_every_waiting_reader_in_first():
    lock = ReadWriteLock()
    lock.acquire_write()
    assert not lock.yield_to_readers()  # nobody waiting: it keeps the lock
    order: list[str] = []
    readers = [_in_thread(lambda: (lock.acquire_read(), order.append("read"), lock.release_read()))
               for _ in range(3)]  # fmt: skip
    while lock.readers_waiting < 3:
        threading.Event().wait(0.005)
    assert lock.yield_to_readers()
    order.append("writer goes on")
    lock.release_write()
    assert all(done.wait(5) for _, done in readers)
    assert order == ["read", "read", "read", "writer goes on"]


def test_a_writer_that_never_yields_keeps_readers_out_until_it_is_done():
    lock = ReadWriteLock()
    lock.acquire_write()
    _, done = _in_thread(lambda: (lock.acquire_read(), lock.release_read()))
    assert not done.wait(BLOCKED_S)
    lock.release_write()
    assert done.wait(5)
