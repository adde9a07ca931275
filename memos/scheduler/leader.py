"""The scheduler's leader: of all daemons on one database, the one whose scheduler runs jobs.

Leadership is the fleet-wide lease named "scheduler" (`Leases`): a thread tries to take or
renew it every `lease_s / 3`, so a leader that stops beating (killed, or cut off from the
database) is replaced within about one lease. Each try reports the outcome (`on_change` when
leadership came or went) and, while leading, calls `on_tick`: the leader's periodic duties,
such as taking over the work of daemons whose lease expired.

The lease is checked again in the database right before each scheduled run (`confirm`), so a
leader that lost its lease while it was not looking never runs a job beside its successor.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from memos.services.fleet import Leases

log = logging.getLogger("memos.jobs")

LEASE_NAME = "scheduler"


class Leadership:
    def __init__(
        self,
        leases: Leases,
        lease_s: float,
        on_change: Callable[[bool], None],
        on_tick: Callable[[], None] = lambda: None,
    ) -> None:
        self.leases = leases
        self.lease_s = lease_s
        self.on_change = on_change
        self.on_tick = on_tick
        self.leading = False
        self._lock = threading.Lock()  # one try at a time: the thread's, a confirm's
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def holder(self) -> str:
        return self.leases.holder

    def start(self) -> None:
        """Try once now (a lone daemon leads from its first moment), then keep trying."""
        self.step()
        self._thread = threading.Thread(target=self._loop, name="memos-leader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop trying and hand the lease back, so another daemon leads at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            if self.leading:
                self.leading = False
                try:
                    self.leases.release(LEASE_NAME)
                except Exception:
                    log.warning("could not release the scheduler lease", exc_info=True)

    def _try(self) -> bool:
        with self._lock:
            try:
                held = self.leases.try_acquire(LEASE_NAME, self.lease_s)
            except Exception:  # the database is away: not leading until it answers again
                log.warning("scheduler lease check failed", exc_info=True)
                held = False
            if held != self.leading:
                self.leading = held
                log.info("scheduler leadership", extra={"fields": {"leading": held}})
                try:  # under the lock: changes are applied in their order
                    self.on_change(held)
                except Exception:  # tried again at the next step
                    log.exception("scheduler leadership change failed")
                    self.leading = held = False
        return held

    def step(self) -> None:
        """One try; while leading, the leader's duties."""
        if self._try():
            try:
                self.on_tick()
            except Exception:
                log.exception("scheduler leader's duties failed")

    def confirm(self) -> bool:
        """Whether this daemon leads now, by the database (renewing the lease if it does)."""
        return not self._stop.is_set() and self._try()

    def _loop(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            self.step()
