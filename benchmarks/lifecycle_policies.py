"""Eviction policies side by side: a simulated month of chats and searches replayed on a real
daemon under one activation byte budget, once per policy (not a timed test).

An in-process daemon (real SQLite, the real embedder, the real small model; the scheduler off,
jobs run through the daemon's job runner when this script calls them) gets `--cubes` cubes of
`--sessions` LoCoMo-like sessions each, of varied length (`--min-tokens` to `--max-tokens`
context tokens, log-uniform). The workload is drawn once, seeded, and replayed identically
for every policy:

- each simulated day, `--requests-per-day` chat turns over all (cube, session) pairs by a Zipf
  law (`--zipf`) over a popularity ranking that drifts (`--drift`: that share of the ranking
  reshuffled every day), with `--searches-per-day` searches interleaved;
- a turn for a session whose activation is still stored is a hit: `generate` continues it
  (`activation_id`, `--gen-tokens` tokens; the generation records its use); otherwise a miss:
  the session's activation is built again (its context tokens are the prefill cost) and then
  used. Each session's activation has one compression, drawn per session from `--bits`
  (clients choose it per activation), so its bytes and its rebuild cost differ;
- at the end of each day: `usage_flush`, `migrate` and `evict` run (the daemon's job runner,
  `run_now(wait=True)`), while a thread searches; before them, the same thread searches with
  no job running (idle). Bytes held are read after each evict run and checked against the
  budget.

The budget is the daemon-wide `lifecycle.activation_disk_bytes`, set to `--budget-fraction`
of the bytes every session's activation would take at once (estimated from each session's
context tokens and the bytes per token measured at each bit width). The policy is
`lifecycle.eviction`, the one the daemon-wide budget evicts by.

Compressed clock: a simulated day lasts as long as its requests take. The daemon stamps uses
with the wall clock, which orders them exactly as simulated time does, and that order is all
`lru`, `lfu` and `gdsf` read (GDSF's clock too is kept in wall time). What does not compress
is a threshold in days: `migrate` demotes an activation unused for `demote_after_days` by
comparing wall timestamps with days, so in a compressed month nothing is demoted; and its
promotion of hot sessions is disabled here (`hot_recalls` out of reach), because activations
nobody asked for would blur the comparison of policies. `migrate` still runs (and unloads idle
caches from RAM: `unload_idle_s=1`, so a day's hits load from disk), so its run time and the
searches beside it are measured.

    nice -n 19 python benchmarks/lifecycle_policies.py --json docs/lifecycle_policies.json
    nice -n 19 python benchmarks/lifecycle_policies.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import lifecycle  # noqa: E402
from benchmarks.lifecycle import ADMIN  # noqa: E402
from benchmarks.report import print_table  # noqa: E402
from memcube.errors import NotFound  # noqa: E402
from memcube.types import SearchFilters  # noqa: E402
from memos.daemon import Daemon  # noqa: E402
from memos.db.models import Activation  # noqa: E402
from memos.services.activations.prompts import ActivationSource  # noqa: E402
from memos.services.views import NewMemory  # noqa: E402
from memos.settings import Settings  # noqa: E402

# The small lifecycle run's topics, and four more so that 50 cubes repeat them less.
TOPICS = [
    *lifecycle.TOPICS,
    ("camping", "a tent by the river and a fire that would not start"),
    ("reading", "a novel about a lighthouse keeper"),
    ("running", "a half marathon in the rain"),
    ("music", "learning the violin from online lessons"),
]
SPEAKERS = (("Caroline", "Melanie"), ("Jon", "Gina"), ("Audrey", "Andrew"), ("Joanna", "Nate"))
TOKENS_PER_TURN = 24  # about, for a turn of this generator
ADMIN_KEY = "k" * 20
JOBS = ("usage_flush", "migrate", "evict")


@dataclass(frozen=True)
class Session:
    cube: int
    index: int
    turns: int
    bits: int

    @property
    def session_id(self) -> str:
        return f"s{self.index}"

    @property
    def topic(self) -> tuple[str, str]:
        return TOPICS[(self.cube * 5 + self.index) % len(TOPICS)]


def turns_of(session: Session) -> list[NewMemory]:
    topic, detail = session.topic
    a, b = SPEAKERS[session.cube % len(SPEAKERS)]
    when = datetime(2023, 5, 1, 13, 0, tzinfo=UTC) + timedelta(days=session.index)
    return [
        NewMemory(
            f"{'Yesterday' if t % 3 else 'Today'} I kept thinking about {topic}, {detail}; "
            f"it was the {t + 1}th time this month and it felt good.",
            session.session_id,
            (a, b)[t % 2],
            when + timedelta(minutes=t),
            {},
        )
        for t in range(session.turns)
    ]


def draw_sessions(args: argparse.Namespace, rng: np.random.Generator) -> list[Session]:
    bits = [int(b) for b in args.bits.split(",")]
    sessions = []
    for cube in range(args.cubes):
        for index in range(args.sessions):
            tokens = math.exp(rng.uniform(math.log(args.min_tokens), math.log(args.max_tokens)))
            turns = max(2, round(tokens / TOKENS_PER_TURN))
            sessions.append(Session(cube, index, turns, int(rng.choice(bits))))
    return sessions


def draw_days(
    args: argparse.Namespace, n: int, rng: np.random.Generator
) -> list[list[tuple[str, int]]]:
    """Per day, the events in order: ("chat", session number) or ("search", session number)."""
    ranking = rng.permutation(n)  # ranking[r]: the session at popularity rank r
    weights = 1 / np.arange(1, n + 1) ** args.zipf
    weights /= weights.sum()
    days = []
    for day in range(args.days):
        if day:  # drift: a share of the ranks change hands
            moved = rng.choice(n, size=max(2, round(args.drift * n)), replace=False)
            ranking[moved] = ranking[rng.permutation(moved)]
        chats = ranking[rng.choice(n, size=args.requests_per_day, p=weights)]
        searches = ranking[rng.choice(n, size=args.searches_per_day, p=weights)]
        events = [("chat", int(s)) for s in chats] + [("search", int(s)) for s in searches]
        order = rng.permutation(len(events))
        days.append([events[i] for i in order])
    return days


def settings_for(data_dir: Path, cache_dir: Path, lifecycle: dict[str, Any]) -> Settings:
    return Settings(
        data_dir=data_dir,
        admin_key=ADMIN_KEY,
        enrichment={"enabled": False},
        scheduler={"enabled": False},
        embedder={"cache_dir": cache_dir},
        runtime={"cache_dir": cache_dir},
        lifecycle={"hot_recalls": 1_000_000, "unload_idle_s": 1.0, **lifecycle},
    )


def wait_ready(daemon: Daemon, cube_id: str, activation_id: str) -> Any:
    while True:
        view = daemon.activations.catalogue.view(cube_id, activation_id)
        if view.state != "building":
            return view
        time.sleep(0.01)


def build(daemon: Daemon, cube_id: str, session: Session) -> Any:
    view = daemon.activations.create(
        ADMIN, cube_id, ActivationSource(session_id=session.session_id), session.bits, None
    )
    view = wait_ready(daemon, cube_id, view.id)
    assert view.state == "ready", f"build of {session} ended {view.state}: {view.error}"
    return view


def setup(args: argparse.Namespace, template: Path, cache_dir: Path,
          sessions: list[Session]) -> dict[str, Any]:  # fmt: skip
    """The cubes and their notes, once; each session's context tokens, and bytes per token at
    each bit width (one build each, then deleted)."""
    daemon = Daemon(settings_for(template, cache_dir, {}))
    daemon.start()
    try:
        cube_ids = [daemon.cubes.create(ADMIN, f"user{c}", "").id for c in range(args.cubes)]
        started = time.perf_counter()
        for c, cube_id in enumerate(cube_ids):
            notes = [t for s in sessions if s.cube == c for t in turns_of(s)]
            daemon.memories.add(ADMIN, cube_id, notes)
        add_s = time.perf_counter() - started
        runtime = daemon.runtime.get()
        prompts = daemon.activations.prompts
        tokens = []
        for s in sessions:
            text, described = prompts.source_text(
                cube_ids[s.cube], ActivationSource(session_id=s.session_id)
            )
            tokens.append(len(prompts.context(runtime, text, described, None).token_ids))
        per_token = {}
        longest = max(range(len(sessions)), key=tokens.__getitem__)
        for bits in sorted({s.bits for s in sessions}):
            ref = sessions[longest]
            view = build(daemon, cube_ids[ref.cube], Session(ref.cube, ref.index, ref.turns, bits))
            per_token[bits] = view.bytes / view.tokens
            daemon.activations.delete(ADMIN, cube_ids[ref.cube], view.id)
    finally:
        daemon.stop()
    total = sum(t * per_token[s.bits] for t, s in zip(tokens, sessions, strict=True))
    note_count = sum(s.turns for s in sessions)
    return {"cube_ids": cube_ids, "tokens": tokens, "bytes_per_token": per_token,
            "all_bytes": int(total), "notes": note_count, "add_s": add_s}  # fmt: skip


class Searcher:
    """A thread that searches until stopped; each search's (start, end) in perf_counter s."""

    def __init__(self, daemon: Daemon, queries: list[tuple[str, str]]) -> None:
        self.daemon, self.queries = daemon, queries
        self.times: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._first = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-search", daemon=True)

    def _loop(self) -> None:
        i = 0
        while not self._stop.is_set():
            cube_id, query = self.queries[i % len(self.queries)]
            started = time.perf_counter()
            self.daemon.search.search(ADMIN, cube_id, query, 5, SearchFilters())
            self.times.append((started, time.perf_counter()))
            self._first.set()
            i += 1

    def __enter__(self) -> Searcher:
        self._thread.start()
        self._first.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def idle_window(daemon: Daemon, queries: list[tuple[str, str]], count: int) -> list[float]:
    """Latencies (ms) of `count` searches from the thread with nothing else running."""
    with Searcher(daemon, queries) as searcher:
        while len(searcher.times) < count + 1:
            time.sleep(0.005)
    return [(e - s) * 1000 for s, e in searcher.times[1 : count + 1]]


@dataclass
class PolicyRun:
    policy: str
    requests: int = 0
    hits: int = 0
    prefill_tokens: int = 0  # built (misses)
    saved_tokens: int = 0  # not prefilled again (hits)
    chat_ms: list[float] = field(default_factory=list)
    build_ms: list[float] = field(default_factory=list)
    days: list[dict[str, Any]] = field(default_factory=list)
    search_idle_ms: list[float] = field(default_factory=list)
    search_jobs_ms: list[float] = field(default_factory=list)
    job_ms: dict[str, list[float]] = field(default_factory=lambda: {j: [] for j in JOBS})
    over_budget_runs: int = 0
    evicted: int = 0
    wall_s: float = 0.0


def held_bytes(daemon: Daemon) -> tuple[int, int]:
    """(activation bytes the rows say, bytes of the files under the activations directory)."""
    with daemon.db.read() as s:
        rows = s.scalar(
            select(func.coalesce(func.sum(Activation.bytes), 0)).where(
                Activation.state.in_(("ready", "corrupt"))
            )
        )
    files = sum(
        p.stat().st_size for p in daemon.activations.catalogue.directory.rglob("*") if p.is_file()
    )
    return int(rows or 0), files


def live(daemon: Daemon) -> set[str]:
    with daemon.db.read() as s:
        return set(s.scalars(select(Activation.id).where(Activation.state == "ready")))


def run_policy(
    args: argparse.Namespace, name: str, template: Path, cache_dir: Path, budget: int,
    sessions: list[Session], made: dict[str, Any], days: list[list[tuple[str, int]]],
) -> PolicyRun:  # fmt: skip
    data_dir = Path(tempfile.mkdtemp(prefix=f"memos-policy-{name}-"))
    shutil.copytree(template, data_dir, dirs_exist_ok=True)
    lifecycle = {"eviction": name, "activation_disk_bytes": budget}
    daemon = Daemon(settings_for(data_dir, cache_dir, lifecycle))
    daemon.start()
    run = PolicyRun(name)
    cube_ids, tokens = made["cube_ids"], made["tokens"]
    queries = [(cube_ids[s.cube], f"what about {s.topic[0]}?") for s in sessions]
    acts: dict[int, str] = {}  # session number -> its stored activation
    try:
        # Warm-up, outside the measurements: the model, the embedder, one search.
        daemon.runtime.get()
        daemon.search.search(ADMIN, cube_ids[0], "warm up", 5, SearchFilters())
        started = time.perf_counter()
        for day, events in enumerate(days):
            for kind, n in events:
                s, cube_id = sessions[n], cube_ids[sessions[n].cube]
                if kind == "search":
                    daemon.search.search(ADMIN, cube_id, queries[n][1], 5, SearchFilters())
                    continue
                run.requests += 1
                question = f"What did they say about {s.topic[0]}?"
                hit = n in acts
                if not hit:
                    t0 = time.perf_counter()
                    acts[n] = build(daemon, cube_id, s).id
                    run.build_ms.append((time.perf_counter() - t0) * 1000)
                    run.prefill_tokens += tokens[n]
                t0 = time.perf_counter()
                try:
                    daemon.activations.generate(ADMIN, cube_id, question, acts[n], args.gen_tokens)
                except NotFound:  # cannot happen between evict runs; counted as a bug if so
                    raise AssertionError(f"{acts[n]} vanished between evict runs") from None
                run.chat_ms.append((time.perf_counter() - t0) * 1000)
                if hit:
                    run.hits += 1
                    run.saved_tokens += tokens[n]
            before, _ = held_bytes(daemon)
            run.search_idle_ms += idle_window(daemon, queries, args.idle_searches)
            windows = []
            results: dict[str, Any] = {}
            with Searcher(daemon, queries) as searcher:
                for job in JOBS:
                    t0 = time.perf_counter()
                    run_id = daemon.jobs.run_now(job, trigger="bench", wait=True)
                    t1 = time.perf_counter()
                    windows.append((t0, t1))
                    run.job_ms[job].append((t1 - t0) * 1000)
                    view = daemon.jobs.get_run(run_id)
                    assert view.status == "ok", f"{job} failed: {view.error}"
                    results[job] = view.result
                # at least one search after the jobs began, so each window has a neighbour
                count = len(searcher.times)
                while len(searcher.times) <= count:
                    time.sleep(0.002)
            first, last = windows[0][0], windows[-1][1]
            run.search_jobs_ms += [
                (e - s) * 1000 for s, e in searcher.times if s < last and e > first
            ]
            after, files = held_bytes(daemon)
            evict = results["evict"]
            run.evicted += evict["evicted_count"]
            over = after > budget
            run.over_budget_runs += over
            acts = {n: a for n, a in acts.items() if a in live(daemon)}
            run.days.append({
                "day": day + 1, "held_before_evict": before, "held_after_evict": after,
                "file_bytes_after_evict": files, "over_budget": over,
                "evicted": evict["evicted_count"], "evicted_bytes": evict["evicted_bytes"],
                "stored": len(acts), "hits": run.hits, "requests": run.requests,
                "job_ms": {j: round(run.job_ms[j][-1], 2) for j in JOBS},
                "gdsf_clock": evict["gdsf_clock"],
            })  # fmt: skip
            print(f"  {name} day {day + 1:>2}: hit rate {run.hits / max(run.requests, 1):.3f}, "
                  f"held {before:,} -> {after:,} of {budget:,} B, {len(acts)} stored, "
                  f"evict {run.job_ms['evict'][-1]:.0f} ms", flush=True)  # fmt: skip
        run.wall_s = time.perf_counter() - started
    finally:
        daemon.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    return run


def p(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summary(run: PolicyRun, budget: int, baseline_tokens: int) -> dict[str, Any]:
    idle95, jobs95 = p(run.search_idle_ms, 95), p(run.search_jobs_ms, 95)
    return {
        "policy": run.policy,
        "requests": run.requests,
        "hits": run.hits,
        "hit_rate": run.hits / max(run.requests, 1),
        "prefill_tokens": run.prefill_tokens,
        "saved_tokens": run.saved_tokens,
        "saved_share": run.saved_tokens / max(baseline_tokens, 1),
        "max_held_after_evict": max(d["held_after_evict"] for d in run.days),
        "max_held_before_evict": max(d["held_before_evict"] for d in run.days),
        "budget": budget,
        "over_budget_runs": run.over_budget_runs,
        "evicted": run.evicted,
        "job_ms": {
            j: {"median": p(v, 50), "p95": p(v, 95), "max": max(v)} for j, v in run.job_ms.items()
        },
        "search_idle": {"n": len(run.search_idle_ms), "p50": p(run.search_idle_ms, 50),
                        "p95": idle95},
        "search_jobs": {"n": len(run.search_jobs_ms), "p50": p(run.search_jobs_ms, 50),
                        "p95": jobs95},
        "search_p95_ratio": jobs95 / idle95 if idle95 and jobs95 else None,
        "chat_ms_median": p(run.chat_ms, 50),
        "build_ms_median": p(run.build_ms, 50),
        "wall_s": run.wall_s,
        "days": run.days,
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cubes", type=int, default=50)
    parser.add_argument("--sessions", type=int, default=4, help="per cube")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--requests-per-day", type=int, default=16)
    parser.add_argument("--searches-per-day", type=int, default=8)
    parser.add_argument("--idle-searches", type=int, default=6, help="per day, before the jobs")
    parser.add_argument("--zipf", type=float, default=0.9)
    parser.add_argument("--drift", type=float, default=0.05, help="share reshuffled a day")
    parser.add_argument("--min-tokens", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=600)
    parser.add_argument("--bits", default="16,8,4", help="per session, drawn from these")
    parser.add_argument("--gen-tokens", type=int, default=1)
    parser.add_argument("--budget-fraction", type=float, default=0.2)
    parser.add_argument("--policies", default="lru,lfu,gdsf")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a 1-2 minute smoke run")
    parser.add_argument("--json", type=Path, help="written after each policy, then at the end")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "memos-bench-models",
        help="the model's conversion, kept between runs",
    )
    args = parser.parse_args()
    if args.quick:
        args.cubes, args.sessions, args.days = 6, 3, 4
        args.requests_per_day, args.searches_per_day, args.idle_searches = 10, 4, 3

    rng = np.random.default_rng(args.seed)
    sessions = draw_sessions(args, rng)
    days = draw_days(args, len(sessions), rng)
    root = Path(tempfile.mkdtemp(prefix="memos-policies-"))
    template, cache_dir = root / "template", args.cache_dir
    template.mkdir()
    load = os.getloadavg()
    started = time.perf_counter()
    made = setup(args, template, cache_dir, sessions)
    setup_s = time.perf_counter() - started
    budget = int(args.budget_fraction * made["all_bytes"])
    tokens = made["tokens"]
    chats = [n for events in days for kind, n in events if kind == "chat"]
    baseline = sum(tokens[n] for n in chats)  # no cache: every turn prefills its session
    compulsory = len(set(chats))  # misses even an unbounded cache has
    print(f"setup: {len(sessions)} sessions, {made['notes']} notes ({made['add_s']:.0f} s to "
          f"add), {setup_s:.0f} s; all activations ~{made['all_bytes']:,} B, budget {budget:,} B "
          f"({args.budget_fraction:g}); bytes/token {made['bytes_per_token']}",
          flush=True)  # fmt: skip

    def verdict_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
        by = {r["policy"]: r for r in runs}
        verdict: dict[str, Any] = {"unbounded_hit_rate": 1 - compulsory / max(len(chats), 1)}
        if "lru" in by and "gdsf" in by and by["lru"]["hit_rate"]:
            gain = by["gdsf"]["hit_rate"] / by["lru"]["hit_rate"] - 1
            verdict |= {"gdsf_over_lru": gain, "hit_rate_target_met": gain >= 0.10}
        ratios = [r["search_p95_ratio"] for r in runs if r["search_p95_ratio"] is not None]
        if ratios:
            verdict |= {"worst_search_p95_ratio": max(ratios),
                        "search_target_met": max(ratios) <= 1.5}  # fmt: skip
        verdict["budget_kept"] = all(r["over_budget_runs"] == 0 for r in runs)
        return verdict

    def write(runs: list[dict[str, Any]], done: bool) -> None:
        if args.json:
            args.json.write_text(json.dumps({
                "command": "python benchmarks/lifecycle_policies.py " + " ".join(sys.argv[1:]),
                "complete": done,
                "args": vars(args) | {"json": str(args.json), "cache_dir": str(args.cache_dir)},
                "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
                "load_avg_before": load, "load_avg_now": os.getloadavg(),
                "python": platform.python_version(), "setup_s": setup_s,
                "sessions": len(sessions), "notes": made["notes"],
                "bytes_per_token": made["bytes_per_token"], "all_bytes": made["all_bytes"],
                "budget": budget, "baseline_prefill_tokens": baseline, "chats": len(chats),
                "verdict": verdict_of(runs), "policies": runs,
            }, indent=1, default=str))  # fmt: skip

    runs: list[dict[str, Any]] = []
    try:
        for name in args.policies.split(","):
            run = run_policy(args, name, template, cache_dir, budget, sessions, made, days)
            runs.append(summary(run, budget, baseline))
            write(runs, False)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    load_after = os.getloadavg()

    rows = [
        {**r, "hit_rate": r["hit_rate"], "saved_pct": 100 * r["saved_share"],
         "idle95": r["search_idle"]["p95"], "jobs95": r["search_jobs"]["p95"],
         "ratio": r["search_p95_ratio"], "evict_ms": r["job_ms"]["evict"]["median"],
         "evict95": r["job_ms"]["evict"]["p95"], "migrate_ms": r["job_ms"]["migrate"]["median"],
         "flush_ms": r["job_ms"]["usage_flush"]["median"]}
        for r in runs
    ]  # fmt: skip
    title = (f"eviction policies on {platform.node()} ({os.cpu_count()} cores, load "
             f"{load[0]:.1f} before, {load_after[0]:.1f} after): {args.cubes} cubes x "
             f"{args.sessions} sessions, {args.days} days x {args.requests_per_day} chats + "
             f"{args.searches_per_day} searches, budget {budget:,} B")  # fmt: skip
    print_table(title, [
        ("policy", "policy", "<6"), ("hit rate", "hit_rate", ">8.3f"),
        ("prefill saved %", "saved_pct", ">6.1f"), ("max held after evict", "max_held_after_evict",
        ">12,"), ("over budget", "over_budget_runs", ">3"), ("evicted", "evicted", ">6"),
        ("evict ms p50", "evict_ms", ">8.1f"), ("evict ms p95", "evict95", ">8.1f"),
        ("migrate ms p50", "migrate_ms", ">8.1f"), ("flush ms p50", "flush_ms", ">8.1f"),
        ("search p95 idle", "idle95", ">8.1f"), ("search p95 jobs", "jobs95", ">8.1f"),
        ("ratio", "ratio", ">5.2f"),
    ], rows)  # fmt: skip
    verdict = verdict_of(runs)
    print(f"\nunbounded cache hit rate (compulsory misses only): "
          f"{verdict['unbounded_hit_rate']:.3f}; verdict: {json.dumps(verdict)}")  # fmt: skip
    write(runs, True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
