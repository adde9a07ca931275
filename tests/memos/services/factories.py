"""Shared factories for the enrichment tests: an in-process daemon, notes, failing plug-ins."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

from memos.daemon import Daemon
from memos.services.auth import ADMIN_USER_ID
from memos.services.views import NewMemory, Principal
from memos.settings import Settings

ADMIN = Principal(ADMIN_USER_ID, True)
TURNS = [
    ("Caroline", "I went to the LGBTQ support group yesterday and it was so powerful."),
    ("Melanie", "That's great! I painted a sunrise over the lake last weekend."),
    ("Caroline", "I'm researching adoption agencies; I want to give a kid a loving home."),
    ("Melanie", "My kids love pottery, we made a bowl together at the art studio."),
]


class BrokenEnricher:
    """A plug-in that always fails, to show a failure never wedges the queue."""

    name = "broken"

    def enrich(self, notes):
        raise RuntimeError("model server unreachable")


def make_daemon(data_dir, embedder, **settings) -> Daemon:
    """An in-process daemon whose enrichment runs only when a test calls it: the worker is
    stopped (before any note exists) even with `enrichment={"enabled": True}`, and nothing is
    scheduled; jobs run when `daemon.jobs.run_now` is called."""
    enrichment = {"enabled": False, **settings.pop("enrichment", {})}
    daemon = Daemon(
        Settings(data_dir=data_dir, admin_key="k" * 20, enrichment=enrichment,
                 scheduler={"enabled": False}, **settings),
        embedder=embedder,
    )  # fmt: skip
    daemon.start()
    daemon.enrichment_worker.stop()
    return daemon


def add_turns(daemon, turns=TURNS, when=datetime(2023, 5, 8, 13, 56, tzinfo=UTC)):
    cube = daemon.cubes.create(ADMIN, secrets.token_hex(3), "")
    added = daemon.memories.add(ADMIN, cube.id, [NewMemory(t, "s", w, when, {}) for w, t in turns])
    return cube.id, [m.id for m in added]


def states(daemon, cube_id):
    page = daemon.memories.page(ADMIN, cube_id, None, 100, None)
    return [(m.enrichment, m.enrichment_attempts, m.enrichment_error) for m in page.items]
