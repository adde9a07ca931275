"""After the soak: every write the daemon acknowledged is there exactly once, in its last
acknowledged state, and every acknowledged delete is gone.

The clients' ledgers (`soak_load.Note`, `soak_load.Built`) are compared with what the daemon
lists afterwards, cube by cube:
- an acknowledged add, never deleted: its id is listed exactly once, in its cube, with the last
  acknowledged content and metadata, at that version or later (background evolution may add a
  version with the same content), and its content appears once (no duplicate row); for edited
  notes the history holds the acknowledged version with the acknowledged content;
- an acknowledged delete: not listed, and a GET by id answers 404;
- a write that got no answer: any of the states it may have left;
- rows nobody tracked: only as many as items of adds that got no answer (committed, reply lost).
Activations likewise: acknowledged ones listed once, acknowledged deletes gone.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import httpx

from benchmarks.soak_load import Client, Note

MAX_PAGES = 10_000


def _get(http: httpx.Client, path: str, **params: Any) -> httpx.Response:
    """A read that retries back-pressure and transport errors, within a bound."""
    for attempt in range(8):
        try:
            r = http.get(path, params=params or None)
        except httpx.HTTPError:
            time.sleep(1 + attempt)
            continue
        if r.status_code == 429 or r.status_code >= 500:
            time.sleep(min(float(r.headers.get("Retry-After") or 1), 5))
            continue
        return r
    raise RuntimeError(f"GET {path} kept failing; the check is incomplete")


def _list(http: httpx.Client, path: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(MAX_PAGES):
        params: dict[str, Any] = {"limit": 500, **({"cursor": cursor} if cursor else {})}
        body = _get(http, path, **params).json()
        items += body["items"]
        cursor = body.get("next_cursor")
        if cursor is None:
            return items
    raise RuntimeError(f"{path}: more than {MAX_PAGES} pages")


State = tuple[str, dict[str, Any], int | None] | None


def _matches(row: dict[str, Any] | None, expected: State) -> bool:
    if expected is None:
        return row is None
    content, metadata, version = expected
    return (
        row is not None
        and row["content"] == content
        and row["metadata"] == metadata
        and (version is None or row["version"] >= version)
    )


def _describe(row: dict[str, Any] | None) -> str:
    if row is None:
        return "absent"
    return f"v{row['version']} {row['content'][-24:]!r} {row['metadata']}"


def verify(
    url: str, owner_keys: dict[str, str], clients: list[Client], history_checks: int = 300
) -> dict[str, Any]:
    """`owner_keys`: cube id -> its owner's API key."""
    problems: list[str] = [p for c in clients for p in c.problems]
    counts: Counter[str] = Counter()
    rows: dict[str, list[dict[str, Any]]] = {}
    contents: Counter[tuple[str, str]] = Counter()
    listed_acts: dict[str, Counter[str]] = {}
    act_states: dict[str, str] = {}
    for cube_id, key in owner_keys.items():
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120
        ) as http:
            for row in _list(http, f"/v1/cubes/{cube_id}/memories"):
                rows.setdefault(row["id"], []).append(row)
                contents[(cube_id, row["content"])] += 1
            acts = _get(http, f"/v1/cubes/{cube_id}/activations").json()["items"]
            listed_acts[cube_id] = Counter(a["id"] for a in acts)
            act_states.update({a["id"]: a["state"] for a in acts})

    notes: list[Note] = [n for c in clients for n in c.notes]
    for note in notes:
        found = rows.get(note.id, [])
        if len(found) > 1 or any(r["cube_id"] != note.cube_id for r in found):
            problems.append(f"{note.id}: listed {len(found)} times or in another cube")
        row = found[0] if found else None
        if note.maybe:
            counts["uncertain"] += 1
            ok = any(_matches(row, state) for state in note.maybe)
        elif note.deleted:
            counts["deleted"] += 1
            ok = row is None
        else:
            counts["live"] += 1
            ok = _matches(row, (note.content, note.metadata, note.version))
            copies = contents[(note.cube_id, note.content)]
            if ok and copies != 1:
                problems.append(f"{note.id}: its content is stored {copies} times")
        if not ok:
            expected = (
                "deleted"
                if note.deleted
                else f"v{note.version} {note.content[-24:]!r} {note.metadata}"
            )
            problems.append(
                f"{note.id}: expected {expected}"
                + (" (or another state)" if note.maybe else "")
                + f", found {_describe(row)}"
            )

    tracked = {n.id for n in notes}
    untracked = sum(1 for i in rows if i not in tracked)
    unanswered_items = sum(c.unacknowledged_adds for c in clients)
    if untracked > unanswered_items:
        problems.append(
            f"{untracked} stored memories nobody added ({unanswered_items} add items got no answer)"
        )

    # Read paths by id: deleted notes answer 404, edited ones keep their acknowledged version.
    deleted = [n for n in notes if n.deleted and not n.maybe][:200]
    edited = [n for n in notes if not n.deleted and not n.maybe and n.version > 1][:history_checks]
    key_of = {id(n): c.tenant.key for c in clients for n in c.notes}
    sessions: dict[str, httpx.Client] = {}
    try:
        for note in deleted + edited:
            key = key_of[id(note)]
            if key not in sessions:
                auth = {"Authorization": f"Bearer {key}"}
                sessions[key] = httpx.Client(base_url=url, headers=auth, timeout=120)
            http = sessions[key]
            base = f"/v1/cubes/{note.cube_id}/memories/{note.id}"
            if note.deleted:
                status = _get(http, base).status_code
                if status != 404:
                    problems.append(f"{note.id}: GET answers {status} after an acknowledged delete")
                continue
            history = _get(http, f"{base}/history").json()["items"]
            version = [h for h in history if h["version"] == note.version]
            if len(version) != 1 or version[0]["content"] != note.content:
                problems.append(
                    f"{note.id}: history lacks v{note.version} with its acknowledged content"
                )
    finally:
        for http in sessions.values():
            http.close()
    counts["deleted_read_by_id"], counts["histories_read"] = len(deleted), len(edited)

    act_counts: Counter[str] = Counter()
    tracked_acts = set()
    for client in clients:
        for act in client.acts:
            tracked_acts.add(act.id)
            n = listed_acts.get(act.cube_id, Counter())[act.id]
            if act.uncertain:
                act_counts["uncertain"] += 1
                ok = n in (0, 1)
            elif act.deleted:
                act_counts["deleted"] += 1
                ok = n == 0
            else:
                act_counts["live"] += 1
                act_counts[f"live_{act_states.get(act.id, 'absent')}"] += 1
                ok = n == 1
            if not ok:
                problems.append(f"activation {act.id}: listed {n} times (deleted={act.deleted})")
    untracked_acts = sum(1 for c in listed_acts.values() for i in c if i not in tracked_acts)
    unanswered_builds = sum(c.unacknowledged_builds for c in clients)
    if untracked_acts > unanswered_builds:
        problems.append(
            f"{untracked_acts} activations nobody built ({unanswered_builds} builds got no answer)"
        )

    return {
        "ok": not problems,
        "memories": {
            **counts,
            "stored": len(rows),
            "untracked_stored": untracked,
            "unanswered_add_items": unanswered_items,
            "search_misses": sum(c.search_misses for c in clients),
        },
        "activations": {
            **act_counts,
            "untracked_listed": untracked_acts,
            "unanswered_builds": unanswered_builds,
        },
        "problem_count": len(problems),
        "problems": problems[:50],
    }
