"""Generation admission: bounded at once (by number and by cache bytes), a bounded FIFO wait."""

from __future__ import annotations

import threading

from memos.services.activations.admission import (
    AdmissionLimits,
    GenerationGate,
    Refusal,
    Slot,
)


def _gate(active: int = 2, waiting: int = 1, wait_s: float = 60, kv: int = 1000) -> GenerationGate:
    return GenerationGate(AdmissionLimits(active, waiting, wait_s, kv))


def _wait_for(gate: GenerationGate, waiting: int) -> None:
    with gate._lock:  # wakes on every change of the gate's state
        while len(gate._waiting) != waiting:
            gate._lock.wait(1)


def test_slots_are_bounded_by_number_and_by_bytes_and_given_back_once() -> None:
    gate = _gate(active=2, waiting=0, kv=1000)
    first, second = gate.acquire(400), gate.acquire(500)
    assert isinstance(first, Slot) and isinstance(second, Slot)
    assert gate.acquire(1) == Refusal("queue_full")  # two run: no third, no queue
    second.release()
    assert gate.acquire(700) == Refusal("queue_full")  # 400 + 700 > 1000 bytes
    third = gate.acquire(600)
    assert isinstance(third, Slot)
    first.release()
    first.release()  # twice: counted once
    stats = gate.stats()
    assert (stats.active, stats.waiting, stats.kv_bytes) == (1, 0, 600)
    assert stats.refused == {"queue_full": 2}


def test_a_waiting_generation_gets_the_next_slot_and_the_queue_is_bounded() -> None:
    gate = _gate(active=1, waiting=1)
    running = gate.acquire(100)
    assert isinstance(running, Slot)
    got: list[Slot | Refusal] = []
    waiter = threading.Thread(target=lambda: got.append(gate.acquire(100)))
    waiter.start()
    _wait_for(gate, 1)
    assert gate.acquire(100) == Refusal("queue_full")  # one waits already: no second
    running.release()
    waiter.join(30)
    assert len(got) == 1 and isinstance(got[0], Slot)
    assert (gate.stats().active, gate.stats().waiting) == (1, 0)


def test_a_wait_ends_when_the_client_leaves_or_the_time_is_up() -> None:
    gate = _gate(active=1, waiting=2, wait_s=60)
    assert isinstance(gate.acquire(100), Slot)
    gone = threading.Event()
    got: list[Slot | Refusal] = []
    waiter = threading.Thread(target=lambda: got.append(gate.acquire(100, gone.is_set)))
    waiter.start()
    _wait_for(gate, 1)
    gone.set()
    waiter.join(30)
    assert got == [Refusal("cancelled")]
    brief = _gate(active=1, waiting=1, wait_s=0)
    brief.acquire(100)
    assert brief.acquire(100) == Refusal("timed_out")
    assert gate.stats().refused == {"cancelled": 1}
