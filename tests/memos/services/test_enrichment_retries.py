"""Failed enrichments are retried with exponential backoff, then parked as failed."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from memcube.enrichment import make_enricher
from memos.db.models import Memory
from memos.services.enrichment import RetryReport
from memos.services.enrichment_retries import RetryPolicy
from tests.memos.services.factories import (
    ADMIN,
    TURNS,
    BrokenEnricher,
    add_turns,
    make_daemon,
    states,
)

ERROR = "RuntimeError: model server unreachable"


def next_attempts(daemon, cube_id):
    with daemon.db.read() as s:
        return list(
            s.scalars(
                select(Memory.enrichment_next_at)
                .where(Memory.cube_id == cube_id)
                .order_by(Memory.seq)
            )
        )


def test_the_delay_doubles_from_the_base_up_to_the_cap():
    policy = RetryPolicy(max_attempts=9, base_s=60, max_s=600)
    assert [policy.delay(n).total_seconds() for n in range(1, 7)] == [60, 120, 240, 480, 600, 600]


def test_failed_notes_are_retried_with_backoff_then_parked_as_failed(tmp_path, embedder):
    daemon = make_daemon(
        tmp_path,
        embedder,
        enrichment={"max_attempts": 3, "retry_base_s": 60, "retry_max_s": 100},
    )
    cube_id, ids = add_turns(daemon, TURNS[:2])
    daemon.enrichment.enricher = BrokenEnricher()
    assert daemon.enrichment.run_once() == 2
    assert states(daemon, cube_id) == [("retrying", 1, ERROR)] * 2
    first, _ = next_attempts(daemon, cube_id)
    # Not due a microsecond early; due at the time the row names.
    early = daemon.enrichment.retry_due(first - timedelta(microseconds=1))
    assert early == RetryReport(due=0, done=0, retrying=0, failed=0, stale=0)
    now = max(next_attempts(daemon, cube_id))
    assert daemon.enrichment.retry_due(now) == RetryReport(2, 0, 2, 0, 0)
    assert states(daemon, cube_id) == [("retrying", 2, ERROR)] * 2
    assert next_attempts(daemon, cube_id) == [now + timedelta(seconds=100)] * 2  # 120, capped
    now += timedelta(seconds=100)
    assert daemon.enrichment.retry_due(now) == RetryReport(2, 0, 0, 2, 0)
    assert states(daemon, cube_id) == [("failed", 3, ERROR)] * 2
    assert next_attempts(daemon, cube_id) == [None, None]
    daemon.enrichment.enricher = make_enricher("local", embedder.embed)
    assert daemon.enrichment.retry_due(now + timedelta(days=30)) == RetryReport(0, 0, 0, 0, 0)
    assert daemon.enrichment.run_once() == 0  # parked: neither the worker nor the job takes it
    # New content is a new start: pending, no attempts, no error.
    edited = daemon.memories.update(ADMIN, cube_id, ids[0], "We adopted a kitten.", None)
    assert (edited.enrichment, edited.enrichment_attempts, edited.enrichment_error) == (
        "pending", 0, None
    )  # fmt: skip
    assert daemon.enrichment.run_once() == 1
    assert states(daemon, cube_id) == [("done", 0, None), ("failed", 3, ERROR)]
    daemon.stop()


def test_a_retry_that_succeeds_enriches_and_clears_the_error(tmp_path, embedder):
    daemon = make_daemon(tmp_path, embedder)
    cube_id, ids = add_turns(daemon, TURNS[:2])
    daemon.enrichment.enricher = BrokenEnricher()
    daemon.enrichment.run_once()
    daemon.enrichment.enricher = make_enricher("local", embedder.embed)
    # An edit while retrying: a new version, pending, taken by the worker, not by the job.
    daemon.memories.update(ADMIN, cube_id, ids[1], "We adopted a kitten.", None)
    now = max(at for at in next_attempts(daemon, cube_id) if at is not None)
    assert daemon.enrichment.retry_due(now) == RetryReport(due=1, done=1, retrying=0, failed=0,
                                                           stale=0)  # fmt: skip
    assert daemon.enrichment.run_once() == 1
    notes = daemon.memories.page(ADMIN, cube_id, None, 10, None).items
    # The attempt stays on record; the error and the next attempt time go.
    assert [(m.enrichment, m.enrichment_attempts, m.enrichment_error) for m in notes] == [
        ("done", 1, None), ("done", 0, None)
    ]  # fmt: skip
    assert next_attempts(daemon, cube_id) == [None, None]
    assert notes[0].dates and notes[0].keywords and notes[1].keywords == ["kitten", "adopted"]
    daemon.stop()
