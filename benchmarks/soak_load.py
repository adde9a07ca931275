"""The soak's workload: closed-loop clients that add, search, edit, delete, build activations and
generate across tenants, recording every request (route template, status, latency) and every
write the daemon acknowledged, so that the end state can be checked against them.

Each client owns what it writes: only the client that added a memory (or built an activation)
edits or deletes it, so each one's last acknowledged state is known exactly. A write whose
outcome is unknown (timeout, broken connection, 5xx) is recorded with every state it may have
left, and the client does not touch that memory again.
"""

from __future__ import annotations

import json
import random
import secrets
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx

WORDS = (
    "lake sunrise pottery class kids adoption agency support group marathon Lisbon cello attic "
    "garden tomatoes violin lessons camping trip mountains painting gallery bakery sourdough "
    "library novel chess club bicycle repair guitar concert museum ticket birthday party "
    "grandmother recipe soup winter coat puppy training beach volleyball harbour ferry"
).split()
TOPICS = ("pets", "family", "hobbies", "travel", "work", "food")
QUESTIONS = ("Who painted the sunrise?", "Where is the cello?", "What did the kids make?")
OPS = {  # weights of one client's next request
    "add": 20,
    "search": 34,
    "find": 6,
    "get": 6,
    "edit": 11,
    "delete": 5,
    "list": 4,
    "stats": 2,
    "build": 4,
    "poll": 3,
    "generate": 5,
}


@dataclass
class Tenant:
    user_id: str
    key: str
    cube_id: str  # the cube this user owns


@dataclass
class Note:
    """One memory a client added, at its last acknowledged state."""

    id: str
    cube_id: str
    session_id: str
    content: str
    metadata: dict[str, Any]
    version: int
    deleted: bool = False
    # After a write with no answer: every (content, metadata, version or None) it may have
    # left; None for "deleted". Empty while the state is known.
    maybe: list[tuple[str, dict[str, Any], int | None] | None] = field(default_factory=list)


@dataclass
class Built:
    """One activation a client created (acknowledged)."""

    id: str
    cube_id: str
    state: str
    deleted: bool = False
    uncertain: bool = False  # a delete with no answer


class Recorder:
    """Latency and status of every request, by route template; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.statuses: dict[str, Counter[str]] = defaultdict(Counter)

    def record(self, route: str, status: int | str, seconds: float) -> None:
        with self._lock:
            self.latencies[route].append(seconds * 1000)
            self.statuses[route][str(status)] += 1


class Client:
    """One closed-loop client: its next request starts when the last one ended."""

    def __init__(
        self,
        index: int,
        tenant: Tenant,
        shared_cube: str,
        url: str,
        recorder: Recorder,
        stop_at: float,
        timeout: float,
        seed: int,
        max_live: int,
    ) -> None:
        self.index = index
        self.tenant = tenant
        self.shared_cube = shared_cube
        self.recorder = recorder
        self.stop_at = stop_at
        self.max_live = max_live
        self.rng = random.Random(seed)
        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {tenant.key}"}, timeout=timeout
        )
        self.notes: list[Note] = []  # every memory it added, for the final check
        self.live: list[Note] = []  # those it may still edit or delete
        self.acts: list[Built] = []
        self.unacknowledged_adds = 0  # items of add requests with no answer
        self.unacknowledged_builds = 0
        self.problems: list[str] = []  # what it read that contradicts what it wrote
        self.search_misses = 0  # own live notes not in the top 5 for their unique token
        self.soak_errors: Counter[str] = Counter()  # bugs in this program, not the daemon's
        self._n = 0
        self._session = 0

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        names, weights = list(OPS), list(OPS.values())
        try:
            while time.monotonic() < self.stop_at:
                op = self.rng.choices(names, weights)[0]
                try:
                    getattr(self, f"_{op}")()
                except Exception as exc:  # a bug here, or an answer of the wrong shape
                    self.soak_errors[f"{op}: {type(exc).__name__}: {exc}"[:200]] += 1
        finally:
            self.http.close()

    def _request(self, route: str, method: str, path: str, **kw: Any) -> httpx.Response | None:
        """None when no answer came (timeout, broken connection): the outcome is unknown."""
        started = time.perf_counter()
        try:
            response = self.http.request(method, path, **kw)
        except httpx.TimeoutException:
            self.recorder.record(route, "timeout", time.perf_counter() - started)
            return None
        except httpx.HTTPError as exc:
            self.recorder.record(route, type(exc).__name__, time.perf_counter() - started)
            return None
        self.recorder.record(route, response.status_code, time.perf_counter() - started)
        if response.status_code == 429:
            self._back_off(response.headers.get("Retry-After"))
        return response

    def _back_off(self, retry_after: str | None) -> None:
        """Honour `Retry-After` as a polite client would, within 5 s and the run's end."""
        try:
            wait = float(retry_after) if retry_after else 1.0
        except ValueError:
            wait = 1.0
        time.sleep(max(0.0, min(wait, 5.0, self.stop_at - time.monotonic())))

    # -- what it sends ----------------------------------------------------------------------

    def _cube(self) -> str:
        return self.shared_cube if self.rng.random() < 0.3 else self.tenant.cube_id

    def _sentence(self, words: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(words)).capitalize() + "."

    def _item(self) -> dict[str, Any]:
        self._n += 1
        if self._n % 20 == 0:
            self._session += 1
        size = 1200 if self.rng.random() < 0.01 else self.rng.randint(1, 3)  # ~1% ~50 KB notes
        text = " ".join(self._sentence(self.rng.randint(5, 12)) for _ in range(size))
        return {
            # The last word is unique: searching it finds this note (a read-your-writes check).
            "content": f"{text} c{self.index}n{self._n}x{secrets.token_hex(4)}",
            "session_id": f"c{self.index}-s{self._session}",
            "speaker": f"client{self.index}",
            "timestamp": f"2024-03-0{self.rng.randint(1, 9)}T12:00:00+00:00",
            "metadata": {"client": self.index, "n": self._n, "topic": self.rng.choice(TOPICS)},
        }

    def _pick(self) -> Note | None:
        return self.rng.choice(self.live) if self.live else None

    # -- memories ---------------------------------------------------------------------------

    def _add(self) -> None:
        if len(self.live) >= self.max_live:  # a steady state: as many deletes as adds
            return self._delete()
        cube = self._cube()
        items = [self._item() for _ in range(self.rng.randint(1, 8))]
        r = self._request(
            "POST /v1/cubes/{cube_id}/memories",
            "POST",
            f"/v1/cubes/{cube}/memories",
            json={"items": items},
        )
        if r is None or r.status_code >= 500:
            self.unacknowledged_adds += len(items)
            return
        if r.status_code != 201:
            return  # refused: nothing was stored
        stored = r.json()["items"]
        if len(stored) != len(items):
            self.problems.append(f"add of {len(items)} items answered {len(stored)}")
        for sent, got in zip(items, stored, strict=False):
            if got["content"] != sent["content"]:
                self.problems.append(f"add {got['id']}: content differs from what was sent")
            note = Note(
                got["id"], cube, sent["session_id"], got["content"], got["metadata"], got["version"]
            )
            self.notes.append(note)
            self.live.append(note)

    def _edit(self) -> None:
        note = self._pick()
        if note is None:
            return self._add()
        change: dict[str, Any] = {}
        if self.rng.random() < 0.7:
            change["content"] = f"{self._sentence(8)} c{self.index}e{secrets.token_hex(4)}"
        if self.rng.random() < 0.4 or not change:
            change["metadata"] = {**note.metadata, "edited": self.rng.randint(1, 10**6)}
        path = f"/v1/cubes/{note.cube_id}/memories/{note.id}"
        r = self._request(
            "PATCH /v1/cubes/{cube_id}/memories/{memory_id}", "PATCH", path, json=change
        )
        if r is None or r.status_code >= 500:
            after = (change.get("content", note.content), change.get("metadata", note.metadata))
            note.maybe = [(note.content, note.metadata, note.version), (*after, None)]
            self.live.remove(note)
        elif r.status_code == 200:
            body = r.json()
            expected = change.get("content", note.content)
            if body["content"] != expected or body["version"] <= note.version:
                self.problems.append(
                    f"edit {note.id}: answered v{body['version']} {body['content'][:40]!r}"
                )
            note.content, note.metadata, note.version = (
                body["content"],
                body["metadata"],
                body["version"],
            )
        elif r.status_code == 404:
            self.problems.append(f"edit {note.id}: 404 for a memory never deleted")
            self.live.remove(note)

    def _delete(self) -> None:
        note = self._pick()
        if note is None:
            return self._add()
        path = f"/v1/cubes/{note.cube_id}/memories/{note.id}"
        r = self._request("DELETE /v1/cubes/{cube_id}/memories/{memory_id}", "DELETE", path)
        if r is None or r.status_code >= 500:
            note.maybe = [(note.content, note.metadata, note.version), None]
            self.live.remove(note)
        elif r.status_code == 204:
            note.deleted = True
            self.live.remove(note)
        elif r.status_code == 404:
            self.problems.append(f"delete {note.id}: 404 for a memory never deleted")
            self.live.remove(note)

    def _get(self) -> None:
        known = [n for n in self.notes[-500:] if not n.maybe]
        if not known:
            return self._add()
        note = self.rng.choice(known)
        path = f"/v1/cubes/{note.cube_id}/memories/{note.id}"
        r = self._request("GET /v1/cubes/{cube_id}/memories/{memory_id}", "GET", path)
        if r is None or r.status_code in (429,) or r.status_code >= 500:
            return
        if note.deleted and r.status_code != 404:
            self.problems.append(f"get {note.id}: {r.status_code} after an acknowledged delete")
        elif not note.deleted and (r.status_code != 200 or r.json()["content"] != note.content):
            self.problems.append(
                f"get {note.id}: {r.status_code}, not its last acknowledged content"
            )

    def _search(self) -> None:
        cube = self._cube()
        body: dict[str, Any] = {
            "query": self._sentence(self.rng.randint(2, 8)),
            "top_k": self.rng.choice((5, 10, 20)),
        }
        if self.rng.random() < 0.2:
            body["filters"] = {"session_id": f"c{self.index}-s{self.rng.randint(0, self._session)}"}
        self._request(
            "POST /v1/cubes/{cube_id}/search", "POST", f"/v1/cubes/{cube}/search", json=body
        )

    def _find(self) -> None:
        """Search an own live note's unique token: it is indexed once acknowledged."""
        note = self._pick()
        if note is None:
            return self._search()
        token = note.content.split()[-1]
        r = self._request(
            "POST /v1/cubes/{cube_id}/search",
            "POST",
            f"/v1/cubes/{note.cube_id}/search",
            json={"query": token, "top_k": 5},
        )
        hits = r.json()["hits"] if r is not None and r.status_code == 200 else None
        if hits is not None and note.id not in {h["memory"]["id"] for h in hits}:
            self.search_misses += 1

    def _list(self) -> None:
        cube = self._cube()
        params = {"limit": self.rng.choice((10, 50, 200))}
        self._request(
            "GET /v1/cubes/{cube_id}/memories", "GET", f"/v1/cubes/{cube}/memories", params=params
        )

    def _stats(self) -> None:
        self._request("GET /v1/cubes/{cube_id}", "GET", f"/v1/cubes/{self._cube()}")

    # -- activations and generation ---------------------------------------------------------

    def _build(self) -> None:
        mine = [a for a in self.acts if not a.deleted and not a.uncertain]
        if len(mine) >= 2:  # at most two each: delete the oldest (a build in progress too)
            return self._delete_activation(mine[0])
        kind = self.rng.choices(("small", "session", "large"), (5, 3, 2))[0]
        body: dict[str, Any] = {"compression": {"bits": self.rng.choice((16, 8, 4, 2))}}
        cube = self.tenant.cube_id
        note = self._pick()
        if kind == "session" and note is not None:
            cube, body["session_id"] = note.cube_id, note.session_id
        elif kind == "large":  # ~1,400 tokens: over the inline limit, built in the background
            lines = (f"Day {i}: {self._sentence(9)}" for i in range(90))
            body["text"] = " ".join(lines)
        else:
            body["text"] = " ".join(self._sentence(10) for _ in range(3))
        path = f"/v1/cubes/{cube}/activations"
        r = self._request("POST /v1/cubes/{cube_id}/activations", "POST", path, json=body)
        if r is None or r.status_code >= 500:
            self.unacknowledged_builds += 1
        elif r.status_code == 201:
            act = r.json()
            self.acts.append(Built(act["id"], cube, act["state"]))

    def _delete_activation(self, act: Built) -> None:
        path = f"/v1/cubes/{act.cube_id}/activations/{act.id}"
        route = "DELETE /v1/cubes/{cube_id}/activations/{activation_id}"
        r = self._request(route, "DELETE", path)
        if r is None or r.status_code >= 500:
            act.uncertain = True
        elif r.status_code == 204:
            act.deleted = True
        elif r.status_code == 404:
            self.problems.append(f"delete activation {act.id}: 404, never deleted")
            act.deleted = True

    def _poll(self) -> None:
        building = [a for a in self.acts if a.state == "building" and not a.deleted]
        if not building:
            route, path = (
                "GET /v1/cubes/{cube_id}/activations",
                f"/v1/cubes/{self._cube()}/activations",
            )
            self._request(route, "GET", path)
            return
        act = building[0]
        path = f"/v1/cubes/{act.cube_id}/activations/{act.id}"
        r = self._request("GET /v1/cubes/{cube_id}/activations/{activation_id}", "GET", path)
        if r is not None and r.status_code == 200:
            act.state = r.json()["state"]

    def _generate(self) -> None:
        ready = [a for a in self.acts if a.state == "ready" and not a.deleted and not a.uncertain]
        act = self.rng.choice(ready) if ready and self.rng.random() < 0.8 else None
        body: dict[str, Any] = {
            "prompt": self.rng.choice(QUESTIONS),
            "max_tokens": self.rng.randint(2, 8),
        }
        if act is not None:
            body["activation_id"] = act.id
        cube = act.cube_id if act is not None else self.tenant.cube_id
        path = f"/v1/cubes/{cube}/generate"
        if self.rng.random() < 0.7:
            self._request("POST /v1/cubes/{cube_id}/generate", "POST", path, json=body)
        else:
            self._stream(path, {**body, "stream": True})

    def _stream(self, path: str, body: dict[str, Any]) -> None:
        """A streamed generation, timed until its `done` event (or its refusal)."""
        route = "POST /v1/cubes/{cube_id}/generate (stream)"
        started = time.perf_counter()
        status: int | str
        retry_after = None
        try:
            with self.http.stream("POST", path, json=body) as r:
                status, retry_after = r.status_code, r.headers.get("Retry-After")
                if status == 200:
                    event = None
                    for line in r.iter_lines():
                        if line.startswith("event: "):
                            event = line[len("event: ") :]
                        elif line.startswith("data: ") and event == "done":
                            json.loads(line[len("data: ") :])["text"]
                            break
                    else:
                        status = "stream_without_done"
                else:
                    r.read()
        except httpx.TimeoutException:
            status = "timeout"
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        self.recorder.record(route, status, time.perf_counter() - started)
        if status == 429:
            self._back_off(retry_after)
