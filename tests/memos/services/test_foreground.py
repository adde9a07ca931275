"""Background work steps aside for searches in flight (memos/services/foreground.py)."""

from __future__ import annotations

import threading

from memcube.types import SearchFilters
from memos.services.foreground import Foreground
from tests.memos.services.factories import ADMIN, TURNS, add_turns, make_daemon, states

BLOCKED_S = 0.3  # long enough for a thread that could go on to have done so


def _pause_in_thread(gate: Foreground) -> tuple[threading.Thread, list[float]]:
    waited: list[float] = []
    thread = threading.Thread(target=lambda: waited.append(gate.pause()), daemon=True)
    thread.start()
    return thread, waited


def test_a_pause_with_no_search_in_flight_does_not_wait():
    gate = Foreground(max_wait_s=60)
    assert gate.pause() == 0.0
    with gate.active():
        pass
    assert gate.pause() == 0.0 and gate.stats().pauses_waited == 0


def test_a_pause_waits_until_the_searches_in_flight_end():
    gate = Foreground(max_wait_s=60)
    with gate.active():
        with gate.active():
            thread, waited = _pause_in_thread(gate)
        thread.join(BLOCKED_S)
        assert thread.is_alive()  # one search is still in flight
    thread.join(10)
    assert not thread.is_alive() and BLOCKED_S <= waited[0] < 60
    assert gate.stats().pauses_waited == 1 and gate.stats().active_total == 2


def test_a_pause_gives_up_after_max_wait_so_background_work_still_moves_on():
    gate = Foreground(max_wait_s=0.2)
    with gate.active():
        thread, waited = _pause_in_thread(gate)
        thread.join(30)
        assert not thread.is_alive() and waited[0] >= 0.2
    assert Foreground(max_wait_s=0).pause() == 0.0


def test_enrichment_waits_while_a_search_is_in_flight(tmp_path, embedder):
    """Neither the enricher's embeddings nor the commit start while a search runs; once it
    ends, the batch goes through."""
    daemon = make_daemon(tmp_path, embedder, enrichment={"yield_ms": 10_000})
    cube_id, _ = add_turns(daemon)
    forwards = embedder.stats().forwards.get("background", 0)
    with daemon.foreground.active():
        worker = threading.Thread(target=daemon.enrichment.run_once, daemon=True)
        worker.start()
        worker.join(BLOCKED_S)
        assert worker.is_alive()
        assert embedder.stats().forwards.get("background", 0) == forwards
        assert states(daemon, cube_id) == [("pending", 0, None)] * len(TURNS)
    worker.join(120)
    assert not worker.is_alive()
    assert states(daemon, cube_id) == [("done", 0, None)] * len(TURNS)
    daemon.stop()


def test_every_search_marks_itself_in_flight(tmp_path, embedder):
    daemon = make_daemon(tmp_path, embedder)
    cube_id, _ = add_turns(daemon)
    before = daemon.foreground.stats().active_total
    for query in ("pottery", "adoption agencies"):
        daemon.search.search(ADMIN, cube_id, query, 5, SearchFilters())
    assert daemon.foreground.stats().active_total == before + 2
    assert daemon.foreground.in_flight == 0
    daemon.stop()
