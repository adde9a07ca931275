"""Generation admission: refused at once when the work ahead is too long; bounded at once (by
number and by cache bytes); a bounded FIFO wait."""

from __future__ import annotations

import threading

import pytest

from memos.services.activations.admission import (
    AdmissionLimits,
    GenerationGate,
    Refusal,
    Slot,
)
from memos.services.activations.backlog import Backlog


def _gate(active: int = 2, waiting: int = 1, wait_s: float = 60, kv: int = 1000) -> GenerationGate:
    return GenerationGate(AdmissionLimits(active, waiting, wait_s, kv), Backlog(chunk_tokens=64))


def step(prefill: int, decode: int) -> float:
    """A fixed speed: 10 ms a prompt token, 1 s a decoding step."""
    return prefill * 0.01 + decode * 1.0


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


def test_a_generation_is_refused_at_once_when_the_work_ahead_exceeds_the_wait() -> None:
    gate = _gate(active=2, waiting=4, wait_s=10)
    first = gate.acquire(1, prefill=100, decode=6, estimate=step)  # nothing ahead
    second = gate.acquire(
        1, prefill=100, decode=3, estimate=step
    )  # 7 s ahead: within the 10 s it may wait
    assert isinstance(first, Slot) and isinstance(second, Slot)
    assert gate.ahead_s(step) == pytest.approx(11.0)
    refused = gate.acquire(
        1, prefill=100, decode=1, estimate=step
    )  # a slot would free in time, the model would not
    assert refused == Refusal("busy") and refused.retry_after_s == pytest.approx(1.0)
    assert gate.stats().waiting == 0  # refused up front: it never queued
    first.work.advance(100, 2)  # decoding progress shrinks the work ahead
    assert gate.ahead_s(step) == pytest.approx(8.0)
    first.release()
    assert gate.ahead_s(step) == pytest.approx(4.0)
    assert gate.stats().refused == {"busy": 1}


def test_waiting_generations_count_in_the_work_ahead_of_later_ones() -> None:
    gate = _gate(active=1, waiting=4, wait_s=10)
    running = gate.acquire(1, prefill=0, decode=4, estimate=step)
    assert isinstance(running, Slot)
    got: list[Slot | Refusal] = []
    waiter = threading.Thread(
        target=lambda: got.append(gate.acquire(1, prefill=0, decode=7, estimate=step))
    )
    waiter.start()
    _wait_for(gate, 1)
    assert gate.ahead_s(step) == pytest.approx(11.0)  # 4 running + 7 waiting
    refused = gate.acquire(1, prefill=0, decode=1, estimate=step)
    assert refused == Refusal("busy")
    running.release()  # the waiter's turn: its work is admitted, the running one's gone
    waiter.join(30)
    assert len(got) == 1 and isinstance(got[0], Slot)
    assert gate.ahead_s(step) == pytest.approx(7.0)
    got[0].release()
    assert gate.ahead_s(step) == 0.0


def test_running_builds_are_part_of_the_work_ahead() -> None:
    gate = _gate(active=2, waiting=1, wait_s=10)
    inline = gate.backlog.add(900)  # a build inside its request: 9 s
    behind = gate.backlog.add(10_000, background=True)  # one 64-token chunk: 0.64 s
    assert gate.ahead_s(step) == pytest.approx(9.64)
    assert isinstance(gate.acquire(1, prefill=0, decode=2, estimate=step), Slot)
    assert gate.acquire(1, prefill=0, decode=1, estimate=step) == Refusal("busy")  # 11.64 s ahead
    inline.done()
    behind.done()
    assert isinstance(gate.acquire(1, prefill=0, decode=1, estimate=step), Slot)
