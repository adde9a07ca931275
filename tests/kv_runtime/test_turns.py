"""The model lock hands the model over in turn: no barging, interactive before background, and
background work still gets a turn. Real threads; every wait is on the lock's own state."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from kv_runtime.turns import ModelLock, background


def _until(check: Callable[[], bool], what: str) -> None:
    """Poll the lock's state; the deadline only turns a hang into a failure."""
    deadline = time.monotonic() + 60
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.001)


def _take(lock: ModelLock, order: list[str], name: str, **kw: object) -> threading.Thread:
    def run() -> None:
        if lock.acquire(**kw):  # type: ignore[arg-type]
            order.append(name)
            lock.release()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_thread_asking_again_queues_behind_the_waiters() -> None:
    """What a decoding loop does between steps: release, then ask again at once. A plain lock
    usually gives it straight back, starving a request that has waited all along."""
    lock, order = ModelLock(), []
    lock.acquire()
    waiter = _take(lock, order, "waiter")
    _until(lambda: lock.waiting() == (1, 0), "the waiter queued")
    for _ in range(3):
        lock.release()
        lock.acquire()  # behind the waiter: it had its turn in between
    order.append("holder")
    lock.release()
    waiter.join(60)
    assert order == ["waiter", "holder"]
    assert not lock.locked()


def test_waiters_are_served_in_arrival_order() -> None:
    lock, order = ModelLock(), []
    lock.acquire()
    threads = []
    for i in range(4):
        threads.append(_take(lock, order, f"w{i}"))
        _until(lambda i=i: lock.waiting() == (i + 1, 0), f"w{i} queued")
    lock.release()
    for thread in threads:
        thread.join(60)
    assert order == ["w0", "w1", "w2", "w3"]


def test_interactive_work_goes_before_background_work() -> None:
    lock, order = ModelLock(background_turn_s=3600), []
    lock.acquire()
    slow = _take(lock, order, "build", background=True)
    _until(lambda: lock.waiting() == (0, 1), "the build queued")
    fast = _take(lock, order, "generation")
    _until(lambda: lock.waiting() == (1, 1), "the generation queued")
    lock.release()
    slow.join(60)
    fast.join(60)
    assert order == ["generation", "build"]


def test_background_work_gets_its_turn_once_it_has_waited_long_enough() -> None:
    lock, order = ModelLock(background_turn_s=0), []  # any wait is long enough
    lock.acquire()
    slow = _take(lock, order, "build", background=True)
    _until(lambda: lock.waiting() == (0, 1), "the build queued")
    fast = _take(lock, order, "generation")
    _until(lambda: lock.waiting() == (1, 1), "the generation queued")
    lock.release()
    slow.join(60)
    fast.join(60)
    assert order == ["build", "generation"]


def test_the_thread_local_background_block_sets_the_class() -> None:
    lock, order = ModelLock(background_turn_s=3600), []
    lock.acquire()

    def build() -> None:
        with background():
            assert lock.acquire()
        order.append("build")
        lock.release()

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    _until(lambda: lock.waiting() == (0, 1), "it queued as background work")
    lock.release()
    thread.join(60)
    assert order == ["build"]


def test_a_cancelled_waiter_leaves_the_queue_without_the_lock() -> None:
    lock, order = ModelLock(), []
    lock.acquire()
    gone = threading.Event()
    waiter = _take(lock, order, "gone", cancel=gone.is_set)
    _until(lambda: lock.waiting() == (1, 0), "the waiter queued")
    gone.set()
    waiter.join(60)
    assert order == [] and lock.waiting() == (0, 0) and lock.locked()
    lock.release()
    assert not lock.locked()
    assert lock.acquire(cancel=gone.is_set) is False  # free, but its caller has gone
    assert not lock.locked()


def test_background_work_keeps_to_its_share_of_the_model_time() -> None:
    """After a background pass of 10 s, with a 25% share, the next background turn waits
    30 s of interactive work; then it goes before the interactive waiters."""
    now = [0.0]
    lock = ModelLock(background_turn_s=0, background_share=0.25, clock=lambda: now[0])
    order: list[str] = []
    assert lock.acquire(background=True)  # a background pass, from 0 s ...
    now[0] = 10.0  # ... to 10 s
    build = _take(lock, order, "build", background=True)
    _until(lambda: lock.waiting() == (0, 1), "the build queued")
    go_on = threading.Event()

    def first() -> None:
        assert lock.acquire()
        order.append("first")
        go_on.wait(60)
        now[0] = 40.0  # 30 s of interactive work later
        lock.release()

    holder = threading.Thread(target=first, daemon=True)
    holder.start()
    _until(lambda: lock.waiting() == (1, 1), "an interactive request queued")
    lock.release()  # the build waited 0 of its 30 s: the interactive request goes first
    _until(lambda: order == ["first"], "it holds the model")
    second = _take(lock, order, "second")
    _until(lambda: lock.waiting() == (1, 1), "another one queued")
    go_on.set()
    for thread in (holder, build, second):
        thread.join(60)
    assert order == ["first", "build", "second"]
