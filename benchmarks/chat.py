"""Chat turns through a real daemon: TTFT with the kept KV prefix against re-prefilling the
same prompt, prefill tokens saved, daemon memory across turns, and evidence recall of the
notes a turn recalls against search at the same k.

Setup (one LoCoMo conversation, one cube):
- notes: the conversation's first `--sessions` sessions, one memory a turn (as
  `benchmarks/locomo_recall.py` imports them), metadata `{"dia_id", "part": "notes"}`;
- history: the turns of the following sessions, until `--history-tokens`, stored in the chat's
  session (metadata `"part": "history"`), so the chat starts with a long conversation behind it
  and its window grows past 2K tokens during the run;
- the chat recalls with the filter `{"metadata": {"part": "notes"}}`, and search is asked with
  the same filter, so both rank the same notes (the history and the chat's own turns are in the
  window, never among the notes).

Each turn sends one of the conversation's questions whose evidence lies in the note sessions
(streaming, `--max-tokens` small so decoding does not dominate), and measures:
- `ttft_reuse_ms`: the chat's `ttft_ms` (from the request entering the service: recall, prompt,
  prefix sync, first token), and `client_ttft_ms`, request sent to first SSE piece;
- `ttft_prefill_ms`: an in-process `kv_runtime.Runtime` loaded from the daemon's model cache,
  given the same prompt tokens (rebuilt from the chat's messages and the reply's `recalled`
  notes with the daemon's own template code; the token count is checked against the reply's
  `prompt_tokens`) and timed to its first token with nothing reused;
- `ttft_naive_ms`: the naive baseline, a plain transformers `DynamicCache` of the same history
  kept in this process (same model object, same dtype), continued with the turn's tokens;
- `reused_tokens`, the daemon's VmRSS after the turn, and the evidence recall of the recalled
  notes and of search's top k (recall as in `benchmarks/locomo_recall.py`).

Turn 1 prefills the whole history (nothing is loaded yet); ratios are over the later turns.
The benchmark process and the daemon take turns on the CPU (never both at once).

    python benchmarks/chat.py --json docs/chat.json
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)

from benchmarks.daemon import start_daemon  # noqa: E402
from benchmarks.locomo import Conversation, Question, load_locomo  # noqa: E402
from benchmarks.locomo_jsonl import memory_record  # noqa: E402
from benchmarks.locomo_recall import recall  # noqa: E402
from benchmarks.report import print_table  # noqa: E402
from kv_runtime import Runtime, RuntimeConfig  # noqa: E402
from kv_runtime.prefix import common_prefix  # noqa: E402
from memos.services.chats.history import ASSISTANT, USER  # noqa: E402
from memos.services.chats.prompt import Note, with_notes  # noqa: E402

NOTES = {"part": "notes"}
Message = dict[str, str]


# -- the daemon side --------------------------------------------------------------------------


class Daemon:
    def __init__(self, url: str, key: str, pid: int) -> None:
        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600
        )
        self.pid = pid

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise SystemExit(f"{method} {path}: {response.status_code} {response.text}")
        return response.json() if response.content else None

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def wait_enriched(self, cube_id: str) -> None:
        while self.call("GET", f"/v1/cubes/{cube_id}")["stats"].get("enrichment_pending", 0):
            time.sleep(0.5)

    def add(self, cube_id: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for start in range(0, len(items), 256):
            body = {"items": items[start : start + 256]}
            out += self.call("POST", f"/v1/cubes/{cube_id}/memories", json=body)["items"]
        return out

    def send(self, cube_id: str, chat_id: str, content: str, max_tokens: int) -> dict[str, Any]:
        """One streamed turn: the `done` body, plus `client_ttft_ms` (to the first piece)."""
        body = {"content": content, "max_tokens": max_tokens, "stream": True}
        path = f"/v1/cubes/{cube_id}/chats/{chat_id}/messages"
        sent = time.perf_counter()
        first: float | None = None
        event, done = None, None
        with self.http.stream("POST", path, json=body) as response:
            if response.status_code >= 400:
                response.read()
                raise SystemExit(f"turn: {response.status_code} {response.text}")
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    if event == "piece" and first is None:
                        first = time.perf_counter()
                    elif event == "done":
                        done = json.loads(line[6:])
                    elif event == "error":
                        raise SystemExit(f"turn failed: {line[6:]}")
        if done is None:
            raise SystemExit("the stream ended without a done event")
        ended = time.perf_counter()
        done["client_ttft_ms"] = ((first or ended) - sent) * 1000
        return done


# -- the prompt, rebuilt in this process ------------------------------------------------------


def as_message(speaker: str | None, content: str) -> Message:
    """A stored turn as the chat shows it to the model (`memos.services.chats.history.Turn`)."""
    if speaker == ASSISTANT:
        return {"role": ASSISTANT, "content": content}
    if speaker and speaker != USER:
        return {"role": USER, "content": f"{speaker}: {content}"}
    return {"role": USER, "content": content}


def note_of(memory: dict[str, Any], score: float) -> Note:
    return Note(
        memory["id"],
        score,
        memory.get("speaker"),
        datetime.fromisoformat(memory["timestamp"]),
        memory["content"],
    )


def prompt_tokens(
    runtime: Runtime, history: list[Message], question: str, notes: list[Note]
) -> tuple[list[int], list[int]]:
    """(system + window, the new turn) as the chat renders them (`prompt.assemble`)."""
    asked = {"role": USER, "content": with_notes(question, notes)}
    template = runtime.template
    history_ids = template.render(history, add_generation_prompt=False) if history else []
    return history_ids, template.render_delta(history, [asked])


class NaiveCache:
    """The naive baseline: a plain transformers `DynamicCache` kept in process, grown to each
    turn's history and continued with the turn's tokens (cropped back after)."""

    def __init__(self, model: Any, chunk: int) -> None:
        from transformers import DynamicCache

        self.model, self.chunk = model, chunk
        self.cache = DynamicCache(config=model.config)
        self.ids: list[int] = []

    def _forward(self, ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor([ids]),
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=1,  # as transformers' own generate() asks
            )
        self.ids.extend(ids)
        return out.logits[0, -1]

    def _crop(self, length: int) -> None:
        if length < len(self.ids):
            self.cache.crop(length - len(self.ids))  # transformers 5: negative, tokens to drop
            del self.ids[length:]

    def sync(self, history: list[int]) -> None:
        kept = common_prefix(self.ids, history)
        if kept < len(self.ids):
            self._crop(kept)
        for start in range(kept, len(history), self.chunk):
            self._forward(history[start : start + self.chunk])

    def first_token_ms(self, turn: list[int]) -> tuple[float, int]:
        base = len(self.ids)
        started = time.perf_counter()
        token = int(self._forward(turn).argmax())
        elapsed = (time.perf_counter() - started) * 1000
        self._crop(base)
        return elapsed, token


# -- the run ----------------------------------------------------------------------------------


def questions_for(conv: Conversation, sessions: int) -> list[Question]:
    """Questions whose evidence all lies in the first `sessions` sessions, in file order."""
    return [
        q
        for q in conv.questions
        if q.evidence and all(int(e[1:].split(":")[0]) <= sessions for e in q.evidence)
    ]


def tagged(record: dict[str, Any], part: str) -> dict[str, Any]:
    return {**record, "metadata": {**record["metadata"], "part": part}}


def setup(
    daemon: Daemon, runtime_tokens: Any, conv: Conversation, args: argparse.Namespace
) -> tuple[str, str, str, dict[str, str]]:
    """The cube with its notes and the chat's history; (cube, session, chat, memory -> dia_id)."""
    cube = daemon.call("POST", "/v1/cubes", json={"name": f"chat-{secrets.token_hex(3)}"})["id"]
    notes = [tagged(memory_record(t), "notes") for t in conv.turns if t.session <= args.sessions]
    added = daemon.add(cube, notes)
    dia = {m["id"]: m["metadata"]["dia_id"] for m in added}
    if args.note_chunks:  # each note's own KV chunk, blended into the turns that recall it
        ids = [m["id"] for m in added]
        for start in range(0, len(ids), 64):
            body = {"memory_ids": ids[start : start + 64], "per_memory": True}
            daemon.call("POST", f"/v1/cubes/{cube}/activations", json=body)
    session = f"chat-history-{secrets.token_hex(3)}"
    history, spent = [], 0
    for turn in conv.turns:
        if turn.session <= args.sessions or spent >= args.history_tokens:
            continue
        record = {**tagged(memory_record(turn), "history"), "session_id": session}
        history.append(record)
        spent += len(runtime_tokens(f"{turn.speaker}: {record['content']}")) + 5
    daemon.add(cube, history)
    daemon.wait_enriched(cube)
    chat = daemon.call(
        "POST",
        f"/v1/cubes/{cube}/chats",
        json={
            "session_id": session,
            "recall": {"top_k": args.top_k, "filters": {"metadata": NOTES}},
            "max_context_tokens": args.max_context_tokens,
        },
    )
    return cube, session, chat["id"], dia


def history_messages(daemon: Daemon, cube: str, chat: str) -> list[Message]:
    messages: list[Message] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 200, **({"cursor": cursor} if cursor else {})}
        page = daemon.call("GET", f"/v1/cubes/{cube}/chats/{chat}/messages", params=params)
        messages += [as_message(m["speaker"], m["content"]) for m in page["items"]]
        cursor = page.get("next_cursor")
        if not cursor:
            return messages


def run_turns(
    daemon: Daemon,
    runtime: Runtime,
    conv: Conversation,
    args: argparse.Namespace,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    cube, _session, chat, dia = setup(daemon, runtime.tokenize, conv, args)
    asked = questions_for(conv, args.sessions)[: args.turns]
    if len(asked) < args.turns:
        print(f"note: only {len(asked)} questions have evidence in the note sessions")
    naive = NaiveCache(runtime.runner.model, runtime.config.prefill_chunk)
    memories: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    rss_start = daemon.rss_mib()
    for number, question in enumerate(asked, start=1):
        history = history_messages(daemon, cube, chat)
        reply = daemon.send(cube, chat, question.text, args.max_tokens)
        rss = daemon.rss_mib()

        # The same prompt, rebuilt here: the window (nothing has left it while the history
        # fits max_context_tokens; the token count below checks it) and the recalled notes.
        notes = []
        for item in reply["recalled"]:
            if item["memory_id"] not in memories:
                memories[item["memory_id"]] = daemon.call(
                    "GET", f"/v1/cubes/{cube}/memories/{item['memory_id']}"
                )
            notes.append(note_of(memories[item["memory_id"]], item["score"]))
        history_ids, turn_ids = prompt_tokens(runtime, history, question.text, notes)
        same_prompt = len(history_ids) + len(turn_ids) == reply["prompt_tokens"]
        full = runtime.generate([*history_ids, *turn_ids], max_tokens=1).collect()
        naive.sync(history_ids)
        naive_ms, _ = naive.first_token_ms(turn_ids)

        searched: list[str] = []
        if args.top_k:  # (top_k 0: no recall, so nothing to compare)
            body = {"query": question.text, "top_k": args.top_k, "filters": {"metadata": NOTES}}
            search = daemon.call("POST", f"/v1/cubes/{cube}/search", json=body)
            searched = [dia.get(h["memory"]["id"], "") for h in search["hits"]]
        recalled = [dia.get(item["memory_id"], "") for item in reply["recalled"]]
        rows.append(
            {
                "turn": number,
                "history_tokens": len(history_ids),
                "prompt_tokens": reply["prompt_tokens"],
                "turn_tokens": len(turn_ids),  # notes + question + template: prefilled anyway
                "same_prompt": same_prompt,
                "ttft_reuse_ms": round(reply["ttft_ms"], 2),
                "client_ttft_ms": round(reply["client_ttft_ms"], 2),
                "ttft_prefill_ms": round(full.ttft_ms, 2),
                "ttft_naive_ms": round(naive_ms, 2),
                "reused_tokens": reply["reused_tokens"],
                "recomputed_tokens": reply.get("recomputed_tokens"),
                "prefill_ratio": round(full.ttft_ms / reply["ttft_ms"], 2),
                "naive_ratio": round(full.ttft_ms / naive_ms, 2),
                "evidence_recalled": round(recall(recalled, question.evidence, args.top_k), 4),
                "evidence_search": round(recall(searched, question.evidence, args.top_k), 4),
                "same_notes": set(recalled) == set(searched),
                "rss_mib": round(rss, 1),
                "finish_reason": reply["finish_reason"],
                "stored": reply["user_memory_id"] is not None,
            }
        )
        print(
            f"turn {number:3d}: history {len(history_ids):5d} tok, reuse "
            f"{reply['ttft_ms']:8.1f} ms, prefill {full.ttft_ms:8.1f} ms, naive "
            f"{naive_ms:7.1f} ms, reused {reply['reused_tokens']:5d}, rss {rss:7.1f} MiB",
            flush=True,
        )
    return rows, {"rss_start_mib": round(rss_start, 1)}


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def summarise(rows: list[dict[str, Any]], extra: dict[str, Any], args: argparse.Namespace) -> dict:
    warm = rows[1:]  # turn 1 prefilled the whole history
    near = [r for r in warm if abs(r["history_tokens"] - 2048) <= args.near]
    rss = [r["rss_mib"] for r in rows]
    ratio_2k = median([r["prefill_ratio"] for r in near])
    recall_chat = statistics.fmean(r["evidence_recalled"] for r in rows)
    recall_search = statistics.fmean(r["evidence_search"] for r in rows)
    # Memory: after the second turn (the model, the prefix and the first turns' buffers are
    # in by then) to the end, and the growth a turn by least squares over those turns.
    tail = rows[1:]
    slope = None
    if len(tail) >= 3:
        xs = [r["turn"] for r in tail]
        ys = [r["rss_mib"] for r in tail]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
            (x - mx) ** 2 for x in xs
        )
    return {
        "turns": len(rows),
        "history_tokens_first": rows[0]["history_tokens"],
        "history_tokens_last": rows[-1]["history_tokens"],
        "turns_near_2k": len(near),
        "near_2k_window": [2048 - args.near, 2048 + args.near],
        "ttft_reuse_ms_median_2k": median([r["ttft_reuse_ms"] for r in near]),
        "client_ttft_ms_median_2k": median([r["client_ttft_ms"] for r in near]),
        "ttft_prefill_ms_median_2k": median([r["ttft_prefill_ms"] for r in near]),
        "ttft_naive_ms_median_2k": median([r["ttft_naive_ms"] for r in near]),
        "prefill_over_reuse_2k": ratio_2k,
        "prefill_over_naive_2k": median([r["naive_ratio"] for r in near]),
        "prefill_over_reuse_all_warm": median([r["prefill_ratio"] for r in warm]),
        "ttft_first_turn_ms": rows[0]["ttft_reuse_ms"],
        "prefill_tokens_saved": sum(r["reused_tokens"] for r in rows),
        "prompt_tokens_total": sum(r["prompt_tokens"] for r in rows),
        "turn_tokens_median": median([r["turn_tokens"] for r in rows]),
        "all_prompts_rebuilt_exactly": all(r["same_prompt"] for r in rows),
        "evidence_recall_chat": round(recall_chat, 4),
        "evidence_recall_search": round(recall_search, 4),
        "turns_with_same_notes_as_search": sum(r["same_notes"] for r in rows),
        "rss_mib_before": extra["rss_start_mib"],
        "rss_mib_after_turn_2": rows[1]["rss_mib"] if len(rows) > 1 else None,
        "rss_mib_last": rss[-1],
        "rss_mib_max": max(rss),
        "rss_mib_per_turn_after_2": None if slope is None else round(slope, 3),
        "turns_stored": sum(r["stored"] for r in rows),
        "targets": {
            "ttft_8x_at_2k": ratio_2k is not None and ratio_2k >= 8,
            "ttft_30x_at_2k": ratio_2k is not None and ratio_2k >= 30,
            "reuse_beats_naive_at_2k": (
                bool(near)
                and statistics.median(r["ttft_reuse_ms"] for r in near)
                < statistics.median(r["ttft_naive_ms"] for r in near)
            ),
            # The target: the recalled notes carry the evidence search finds at that k.
            "recall_equals_search": round(recall_chat, 4) >= round(recall_search, 4),
            "same_notes_every_turn": all(r["same_notes"] for r in rows),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data/locomo/locomo_dev.json"))
    parser.add_argument("--conversation", default="conv-26", help="a sample_id of the file")
    parser.add_argument("--sessions", type=int, default=4, help="sessions imported as notes")
    parser.add_argument(
        "--history-tokens",
        type=int,
        default=1700,
        help="the chat's history before its first turn (later sessions' turns)",
    )
    parser.add_argument("--turns", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--max-context-tokens", type=int, default=4096)
    parser.add_argument("--near", type=int, default=256, help="'~2K' is 2048 +- this many tokens")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads, in the daemon and here (1: steadier on a busy CPU)",
    )
    parser.add_argument(
        "--note-chunks",
        action="store_true",
        help="build each note's KV chunk first (per_memory), so turns blend the recalled notes",
    )
    parser.add_argument("--json", type=Path, help="write the turns and the summary here")
    parser.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for the daemon")
    args = parser.parse_args()
    if not args.data.exists():
        print(f"skipped: {args.data} not found", file=sys.stderr)
        return
    conv = next((c for c in load_locomo(args.data) if c.sample_id == args.conversation), None)
    if conv is None:
        raise SystemExit(f"no conversation {args.conversation!r} in {args.data}")

    data_dir = Path(tempfile.mkdtemp(prefix="memos-chat-"))
    key = secrets.token_hex(16)
    extra_env = {
        "MEMOS_CHATS__RECALL_TOKENS": "4096",
        "MEMOS_RUNTIME__THREADS": str(args.threads),
        **dict(kv.split("=", 1) for kv in args.env),
    }
    proc, url = start_daemon(data_dir, key, extra_env)
    daemon = Daemon(url, key, proc.pid)
    try:
        # The daemon loads (and converts, once) the model on first use: a generation does it,
        # then this process loads the same converted files.
        cube = daemon.call("POST", "/v1/cubes", json={"name": "warm-up"})["id"]
        daemon.call("POST", f"/v1/cubes/{cube}/generate", json={"prompt": "Hi", "max_tokens": 1})
        runtime = Runtime.load(RuntimeConfig(cache_dir=data_dir / "models", threads=args.threads))
        rows, extra = run_turns(daemon, runtime, conv, args)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    summary = summarise(rows, extra, args)
    summary.update(
        conversation=conv.sample_id,
        note_sessions=args.sessions,
        note_chunks=args.note_chunks,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        max_context_tokens=args.max_context_tokens,
        model=runtime.info.name,
        dtype=runtime.info.dtype,
        torch_threads=torch.get_num_threads(),
        env=extra_env,
    )
    print_table(
        f"Chat turns, {conv.sample_id} ({args.sessions} note sessions, top_k {args.top_k}, "
        f"max_tokens {args.max_tokens}); TTFT in ms",
        [
            ("turn", "turn", ">4d"),
            ("history", "history_tokens", ">7d"),
            ("reused", "reused_tokens", ">6d"),
            ("recomputed", "recomputed_tokens", ">6d"),
            ("new", "turn_tokens", ">5d"),
            ("reuse", "ttft_reuse_ms", ">8.1f"),
            ("client", "client_ttft_ms", ">8.1f"),
            ("prefill", "ttft_prefill_ms", ">8.1f"),
            ("naive", "ttft_naive_ms", ">8.1f"),
            ("prefill/reuse", "prefill_ratio", ">6.1f"),
            ("ev.chat", "evidence_recalled", ">6.2f"),
            ("ev.search", "evidence_search", ">6.2f"),
            ("rss MiB", "rss_mib", ">7.1f"),
        ],
        rows,
    )
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"turns": rows, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
