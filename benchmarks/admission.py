"""Does the daemon stay responsive while it generates and builds? And do abandoned requests stop?

A real `memos serve` on a fresh data dir. One user's cube holds `--notes` short notes and a
ready 16-bit activation (~400 tokens). Then, all at once:

- `--generations` long generations on the activation (`--max-tokens` each, greedy, a prompt that
  keeps the model counting), each on its own client;
- one background activation build of a ~1,500-token context;
- a prober that, every `--interval` seconds until the generations end, times `GET /healthz`,
  `GET /metrics` and a search of the cube (each from a fresh connection, as a monitor would).

The table gives each probed route's latency (p50, p95, max) and how many answers took over 1 s,
next to the same probes for `--idle-s` seconds before, with nothing else running.
Then abandonment: a generation of `--max-tokens` tokens is started and its client goes after
`--abandon-after` seconds (a read timeout that drops the connection; for a stream, closing it
mid-stream); the time from then until `memos_generations_active` is back to 0 is reported, next
to the time the same generation takes when it runs to the end.

    python benchmarks/admission.py --json admission.json
    python benchmarks/admission.py --generations 2 --max-tokens 64      # quick
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.daemon import start_daemon  # noqa: E402
from benchmarks.report import print_table  # noqa: E402

CONTEXT = " ".join(
    f"On day {i} Caroline walked to the lake, and Melanie painted the sunrise over the water."
    for i in range(25)
)
BIG = " ".join(f"Entry {i}: the group met at the garden and planned the trip." for i in range(100))
COUNT = "Count from 1 to 1000, separated by commas."


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=60).text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return 0.0


def setup(url: str, admin_key: str, notes: int) -> tuple[str, str, str]:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin_key}"}) as admin:
        key = admin.post("/v1/users", json={"name": "bench"}).json()["api_key"]
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as c:
        cube = c.post("/v1/cubes", json={"name": "bench"}).json()["id"]
        items = [{"content": f"Note {i}: Caroline and Melanie talked about topic {i % 37}."}
                 for i in range(notes)]  # fmt: skip
        for start in range(0, notes, 500):
            c.post(f"/v1/cubes/{cube}/memories", json={"items": items[start : start + 500]})
        act = c.post(f"/v1/cubes/{cube}/activations", json={"text": CONTEXT}).json()
        while act["state"] == "building":
            time.sleep(0.5)
            act = c.get(f"/v1/cubes/{cube}/activations/{act['id']}").json()
        assert act["state"] == "ready", act
        c.post(f"/v1/cubes/{cube}/search", json={"query": "lake"})  # warm the index
    return key, cube, act["id"]


def probe(url: str, key: str, cube: str, stop: threading.Event, interval: float) -> dict:
    times: dict[str, list[float]] = {"GET /healthz": [], "GET /metrics": [], "POST search": []}
    auth = {"Authorization": f"Bearer {key}"}
    while not stop.is_set():
        for route, call in (
            ("GET /healthz", lambda: httpx.get(f"{url}/healthz", timeout=120)),
            ("GET /metrics", lambda: httpx.get(f"{url}/metrics", timeout=120)),
            ("POST search", lambda: httpx.post(f"{url}/v1/cubes/{cube}/search", headers=auth,
                                               json={"query": "what did Melanie paint"},
                                               timeout=120)),
        ):  # fmt: skip
            started = time.perf_counter()
            assert call().status_code == 200, route
            times[route].append(time.perf_counter() - started)
        stop.wait(interval)
    return times


def summarize(phase: str, times: dict[str, list[float]]) -> list[dict[str, Any]]:
    rows = []
    for route, samples in times.items():
        ms = sorted(1000 * s for s in samples)
        rows.append({
            "phase": phase, "route": route, "n": len(ms), "p50_ms": statistics.median(ms),
            "p95_ms": ms[min(len(ms) - 1, int(0.95 * len(ms)))], "max_ms": ms[-1],
            "over_1s": sum(1 for m in ms if m > 1000),
        })  # fmt: skip
    return rows


def idle_phase(url: str, key: str, cube: str, args: argparse.Namespace) -> list[dict]:
    """The same probes with nothing else running: the baseline."""
    stop = threading.Event()
    threading.Timer(args.idle_s, stop.set).start()
    return summarize("idle", probe(url, key, cube, stop, args.interval))


def load_phase(url: str, key: str, cube: str, act: str, args: argparse.Namespace) -> list[dict]:
    auth = {"Authorization": f"Bearer {key}"}
    body = {"prompt": COUNT, "activation_id": act, "max_tokens": args.max_tokens}
    statuses: list[int] = []

    def one() -> None:
        r = httpx.post(f"{url}/v1/cubes/{cube}/generate", headers=auth, json=body, timeout=3600)
        statuses.append(r.status_code)

    gens = [threading.Thread(target=one) for _ in range(args.generations)]
    for t in gens:
        t.start()
    deadline = time.time() + 600
    while metric(url, "memos_generations_active") < args.generations:
        assert time.time() < deadline, "the generations were not all admitted"
        time.sleep(0.1)
    build = httpx.post(
        f"{url}/v1/cubes/{cube}/activations", headers=auth, json={"text": BIG}, timeout=600
    ).json()
    stop = threading.Event()
    result: dict[str, Any] = {}
    prober = threading.Thread(
        target=lambda: result.update(probe(url, key, cube, stop, args.interval))
    )
    prober.start()
    started = time.perf_counter()
    for t in gens:
        t.join()
    elapsed = time.perf_counter() - started
    stop.set()
    prober.join()
    assert statuses == [200] * args.generations, statuses
    print(f"{args.generations} generations x {args.max_tokens} tokens in {elapsed:.1f} s; "
          f"build {build['id']} was {build['state']}")  # fmt: skip
    return summarize("loaded", result)


def abandon_phase(url: str, key: str, cube: str, act: str, args: argparse.Namespace) -> list[dict]:
    """Seconds from the client going away to the generation's slot being free again."""
    auth = {"Authorization": f"Bearer {key}"}
    body = {"prompt": COUNT, "activation_id": act, "max_tokens": args.max_tokens}
    generate = f"{url}/v1/cubes/{cube}/generate"
    started = time.perf_counter()
    whole = httpx.post(generate, headers=auth, json=body, timeout=3600).json()
    rows = [{"case": "runs to the end", "ended": whole["finish_reason"],
             "seconds": time.perf_counter() - started}]  # fmt: skip
    # Plain: the client gives up after `abandon_after` s without an answer and drops the
    # connection (a read timeout). Stream: it reads for `abandon_after` s, then closes.
    patience = httpx.Timeout(60.0, read=args.abandon_after)
    try:
        httpx.post(generate, headers=auth, json=body, timeout=patience)
        raise SystemExit("the generation ended before the client gave up; raise --max-tokens")
    except httpx.ReadTimeout:
        gone = time.perf_counter()
    rows.append(_until_idle(url, "client left (plain)", gone))
    with httpx.Client(headers=auth, timeout=3600) as client:
        with client.stream("POST", generate, json={**body, "stream": True}) as response:
            begun = time.perf_counter()
            for _ in response.iter_lines():
                if time.perf_counter() - begun >= args.abandon_after:
                    break
            gone = time.perf_counter()
        rows.append(_until_idle(url, "client left (stream)", gone))
    return rows


def _until_idle(url: str, case: str, gone: float) -> dict[str, Any]:
    while metric(url, "memos_generations_active") > 0:
        time.sleep(0.02)
    return {"case": case, "ended": "cancelled", "seconds": time.perf_counter() - gone}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--notes", type=int, default=2000)
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between probes")
    parser.add_argument("--abandon-after", type=float, default=1.0)
    parser.add_argument("--idle-s", type=float, default=10, help="baseline probing, seconds")
    parser.add_argument("--threads", type=int, default=0, help="MEMOS_RUNTIME__THREADS")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    admin_key = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="memos-admission-") as tmp:
        env = {
            "MEMOS_ENRICHMENT__ENABLED": "false",
            "MEMOS_ACTIVATIONS__MAX_GENERATIONS": str(args.generations),
            "MEMOS_ACTIVATIONS__INLINE_MAX_TOKENS": "512",
            # All of them admitted: the point is the probes while that much work runs (by
            # default a generation this far behind the work ahead is refused with 429 busy).
            "MEMOS_ACTIVATIONS__GENERATION_WAIT_S": "600",  # the most it may be
            "MEMOS_RUNTIME__THREADS": str(args.threads),
        }
        if os.environ.get("MEMOS_RUNTIME__CACHE_DIR"):
            env["MEMOS_RUNTIME__CACHE_DIR"] = os.environ["MEMOS_RUNTIME__CACHE_DIR"]
        proc, url = start_daemon(Path(tmp), admin_key, env)
        try:
            key, cube, act = setup(url, admin_key, args.notes)
            load = idle_phase(url, key, cube, args) + load_phase(url, key, cube, act, args)
            abandon = abandon_phase(url, key, cube, act, args)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print_table(
        f"Latency with {args.generations} generations of {args.max_tokens} tokens and a build",
        [
            ("phase", "phase", ">7"),
            ("route", "route", ">14"),
            ("n", "n", ">6d"),
            ("p50 ms", "p50_ms", ">9.1f"),
            ("p95 ms", "p95_ms", ">9.1f"),
            ("max ms", "max_ms", ">9.1f"),
            ("> 1 s", "over_1s", ">6d"),
        ],  # fmt: skip
        load,
    )
    print_table(
        "A generation whose client leaves",
        [("case", "case", ">22"), ("ended", "ended", ">10"), ("seconds", "seconds", ">9.2f")],
        abandon,
    )
    if args.json:
        args.json.write_text(json.dumps({"load": load, "abandon": abandon, "args": vars(args)},
                                        indent=1, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
