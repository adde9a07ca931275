"""Lifecycle, a small run: searches make some sessions hot, `migrate` moves them, and what it
changes is measured (not a timed test).

An in-process daemon (real SQLite, the real embedder, the real small model; jobs run when this
script calls them) gets one cube of `--sessions` sessions of `--turns` LoCoMo-like turns each.
Searches follow a Zipf law over the sessions (`--searches`, exponent `--zipf`): a query names a
session's topic, so its notes are the hits, and the first sessions' notes get recalled most.
Then `usage_flush` and `migrate` run: the sessions whose recalls pass `hot_recalls` are
promoted to activations (built in the background; waited for).

Reported:
- what each migrate run moved (its result's items: action, session or activation, why);
- generation TTFT for a question about a hot session, before promotion (its turns prefilled
  with the question: no activation) and after (continuing its promoted activation), median of
  `--repeats`;
- the demotion ladder: the clock moved `demote_after_days` ahead per run, each run's bits and
  bytes of the promoted activations, and TTFT continuing them at each step, until dropped.

    nice -n 19 python benchmarks/lifecycle.py --json lifecycle.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import print_table  # noqa: E402
from memcube.types import SearchFilters  # noqa: E402
from memos.daemon import Daemon  # noqa: E402
from memos.db.types import utcnow  # noqa: E402
from memos.services.activations import render_memories  # noqa: E402
from memos.services.activations.prompts import ActivationSource  # noqa: E402
from memos.services.auth import ADMIN_USER_ID  # noqa: E402
from memos.services.views import NewMemory, Principal  # noqa: E402
from memos.settings import Settings  # noqa: E402

ADMIN = Principal(ADMIN_USER_ID, True)
TOPICS = [
    ("pottery", "a clay bowl glazed in blue at the studio"),
    ("hiking", "the ridge trail above the lake at dawn"),
    ("adoption", "the agencies and the paperwork for a kid"),
    ("painting", "a sunrise over the harbour in oils"),
    ("choir", "the spring concert and the alto section"),
    ("gardening", "tomatoes, basil and a fence against rabbits"),
    ("cycling", "a century ride along the coast road"),
    ("cooking", "a lemon risotto for the neighbours"),
]
SPEAKERS = ("Caroline", "Melanie")


def session_turns(index: int, turns: int) -> list[NewMemory]:
    topic, detail = TOPICS[index % len(TOPICS)]
    when = datetime(2023, 5, 1 + index, 13, 0, tzinfo=UTC)
    return [
        NewMemory(
            f"{'Yesterday' if t % 2 else 'Today'} I thought about {topic}: {detail} "
            f"(part {t + 1}).",
            f"s{index}",
            SPEAKERS[t % 2],
            when + timedelta(minutes=t),
            {},
        )
        for t in range(turns)
    ]


def ttft(daemon: Daemon, cube_id: str, prompt: str, activation_id: str | None, n: int) -> float:
    times = [
        daemon.activations.generate(ADMIN, cube_id, prompt, activation_id, 1).ttft_ms
        for _ in range(n)
    ]
    return statistics.median(times)


def held(daemon: Daemon, cube_id: str) -> list[dict[str, Any]]:
    return [
        {"id": a.id, "bits": a.bits, "bytes": a.bytes, "tokens": a.tokens}
        for a in daemon.activations.catalogue.views(cube_id)
        if a.state == "ready"
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=6)
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--searches", type=int, default=120)
    parser.add_argument("--zipf", type=float, default=1.2)
    parser.add_argument("--hot-recalls", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="memos-lifecycle-"))
    settings = Settings(
        data_dir=data_dir,
        admin_key="k" * 20,
        enrichment={"enabled": False},
        scheduler={"enabled": False},
        lifecycle={"hot_recalls": args.hot_recalls, "unload_idle_s": 0},
    )
    daemon = Daemon(settings)
    daemon.start()
    try:
        cube_id = daemon.cubes.create(ADMIN, "lifecycle", "").id
        for i in range(args.sessions):
            daemon.memories.add(ADMIN, cube_id, session_turns(i, args.turns))
        rng = np.random.default_rng(0)
        weights = 1 / np.arange(1, args.sessions + 1) ** args.zipf
        picks = rng.choice(args.sessions, size=args.searches, p=weights / weights.sum())
        started = time.perf_counter()
        for i in picks:
            topic, _ = TOPICS[i % len(TOPICS)]
            daemon.search.search(ADMIN, cube_id, f"what about {topic}?", 5, SearchFilters())
        search_s = time.perf_counter() - started
        daemon.system.flush_usage()

        hot = 0  # the most searched session
        rows = daemon.memories.page(ADMIN, cube_id, None, 1000, None).items
        context = render_memories(
            [
                r
                for r in daemon.activations.prompts.source_rows(
                    cube_id, ActivationSource(session_id=f"s{hot}")
                )[0]
            ]  # fmt: skip
        )
        question = f"What did Caroline say about {TOPICS[hot][0]}?"
        before = ttft(daemon, cube_id, f"{context}\n\n{question}", None, args.repeats)

        runs: list[dict[str, Any]] = []
        first = daemon.system.migrate()
        runs.append({"run": "promote", **first.as_dict()})
        daemon.activations.builds.join(timeout=1800)
        promoted = {m["session_id"]: m["activation_id"] for m in first.moved
                    if m["action"] == "promoted"}  # fmt: skip
        after = None
        ladder: list[dict[str, Any]] = []
        if f"s{hot}" in promoted:
            act = promoted[f"s{hot}"]
            after = ttft(daemon, cube_id, question, act, args.repeats)
            ladder.append({"step": 0, "activations": held(daemon, cube_id), "ttft_ms": after})
            days = daemon.settings.lifecycle.demote_after_days
            clock = utcnow()
            for step in range(1, 6):
                clock += timedelta(days=days + 1)  # past its last step and its last use
                report = daemon.migrator.run(now=clock)
                runs.append({"run": f"demote {step}", **report.as_dict()})
                left = held(daemon, cube_id)
                alive = any(a["id"] == act for a in left)
                ladder.append({
                    "step": step, "activations": left,
                    "ttft_ms": ttft(daemon, cube_id, question, act, args.repeats) if alive
                    else None,
                })  # fmt: skip
                if not left:
                    break
    finally:
        daemon.stop()

    moved = [
        {"run": r["run"], "action": m["action"],
         "what": m.get("session_id") or m.get("activation_id"),
         "bits": m.get("to_bits", m.get("bits")), "why": m["why"][:90]}
        for r in runs for m in r["moved"]
    ]  # fmt: skip
    print(f"\nlifecycle on {platform.node()} ({os.cpu_count()} cores): {args.sessions} sessions "
          f"x {args.turns} turns, {len(rows)} notes, {args.searches} searches "
          f"({search_s:.1f} s), hot_recalls={args.hot_recalls}")  # fmt: skip
    print_table("what migrate moved", [
        ("run", "run", "<10"), ("action", "action", "<10"), ("what", "what", "<28"),
        ("bits", "bits", ">4"), ("why", "why", "<90"),
    ], moved)  # fmt: skip
    steps = [
        {"step": s["step"], "count": len(s["activations"]),
         "bits": ",".join(str(a["bits"]) for a in s["activations"]) or "-",
         "bytes": sum(a["bytes"] for a in s["activations"]), "ttft_ms": s["ttft_ms"]}
        for s in ladder
    ]  # fmt: skip
    print_table("demotion ladder (the clock moved demote_after_days + 1 per run)", [
        ("step", "step", ">4"), ("activations", "count", ">11"), ("bits", "bits", "<12"),
        ("bytes held", "bytes", ">12,"), ("TTFT ms", "ttft_ms", ">8.1f"),
    ], steps)  # fmt: skip
    after_text = "-" if after is None else f"{after:.1f}"
    print(f"\nTTFT of a question on session s{hot}: {before:.1f} ms re-prefilling its turns, "
          f"{after_text} ms continuing its promoted activation")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({
            "args": vars(args) | {"json": str(args.json)},
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "python": platform.python_version(),
            "notes": len(rows), "search_s": search_s,
            "ttft_ms": {"before_promotion": before, "after_promotion": after},
            "runs": runs, "ladder": ladder,
        }, indent=1, default=str))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
