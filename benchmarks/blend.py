"""Blending note caches (CacheBlend) against a full prefill: time to first token and quality.

A chat turn's prompt, as memosd renders it (`memos.services.chats.prompt`): the system turn and
the start of the user turn with the notes header (a cached prefix: the same every turn), then one
line per recalled note, then the question and the generation prompt. The notes are what changes
from turn to turn, so each note line has its own chunk cache (`Runtime.build_chunk`, built once,
not timed) and each row builds the notes block + question on the cached prefix:

- full: a forward of the notes and the question on the prefix (what memosd does today);
- blend r: `Runtime.blend` with recompute ratio r (r = 0: chunks re-rotated, nothing recomputed);
- blend r +pre: the chunks were built after the prefix as a preamble instead of from position 0
  (no chunk token was ever a sequence's first, see `kv_runtime.blend`);
- naive: the chunks concatenated as computed, no re-rotation, nothing recomputed (MemOS).

Notes per question (`--recall`): `daemon` (default) recalls them as a chat turn does: the
conversation's turns are stored in an in-process daemon (real SQLite, the real embedder, the
default enricher) and the question is searched with top_k `--notes`; the notes come in the
search's order. `evidence`: the question's evidence turns plus other turns of the conversation up
to `--notes`, in a seeded shuffle (every prompt then holds its evidence).
Quality, against the full prefill: KL(full || row) of the next-token distribution, top-1
agreement over the full prefill's greedy continuation (`--continuation` tokens, teacher-forced),
and the gold answer's log-likelihood (summed over its tokens; `ll delta` is relative to full,
its mean over the questions; `ll |delta|` the mean of its absolute value: the deltas of single
questions go both ways and cancel in the mean).
TTFT is the wall time of building the notes block and the question's logits (median over the
questions); `speedup` is full's over the row's. `cpu ms` is this process's CPU time for the same
(least of `--repeats`): with `--threads 1` it is the work itself, which a busy machine inflates
far less than wall time. `blend 1.0` recomputes everything: its quality must equal full's (a
check of the harness) and its time is the cost of the layer-by-layer pass.

    python benchmarks/blend.py --threads 1 --questions 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.locomo import Conversation, Question, Turn, load_locomo  # noqa: E402
from benchmarks.report import print_table  # noqa: E402
from kv_runtime import ChunkKV, KVCache, Runtime, RuntimeConfig  # noqa: E402

SYSTEM = "You are a helpful assistant. Answer the user's message in one short sentence."
NOTES_HEADER = "Notes recalled from memory (they may help):"  # as memos.services.chats.prompt
RATIOS = (0.0, 0.05, 0.15, 0.3, 1.0)

Row = tuple[str, float, bool, bool]  # (name, ratio, rerotate, preamble); ratio < 0: full prefill
ROWS: tuple[Row, ...] = (
    ("full", -1.0, True, False),
    *((f"blend {r}", r, True, False) for r in RATIOS),
    *((f"blend {r} +pre", r, True, True) for r in (0.0, 0.15)),
    ("naive", 0.0, False, False),
)


def note_line(turn: Turn) -> str:
    """A note as the chat prompt shows it (`Note.line`), with its line break."""
    return f"- [{turn.timestamp.date().isoformat()}] {turn.speaker}: {turn.render()}\n"


def pick_notes(conv: Conversation, question: Question, count: int, seed: int) -> list[Turn]:
    """The question's evidence turns plus other turns of the conversation, shuffled."""
    by_id = {t.dia_id: t for t in conv.turns}
    evidence = [by_id[d] for d in question.evidence if d in by_id][:count]
    rng = random.Random(seed)
    others = [t for t in conv.turns if t.dia_id not in question.evidence]
    notes = evidence + rng.sample(others, min(len(others), count - len(evidence)))
    rng.shuffle(notes)
    return notes


def daemon_recall(conv: Conversation, questions: list[Question], top_k: int) -> list[list[Turn]]:
    """Each question's notes as a chat turn recalls them: the conversation stored in an
    in-process daemon (enriched as it would be), then one search per question."""
    from memcube.types import SearchFilters
    from memos.daemon import Daemon
    from memos.services.auth import ADMIN_USER_ID
    from memos.services.views import NewMemory, Principal
    from memos.settings import Settings

    admin = Principal(ADMIN_USER_ID, True)
    data_dir = Path(tempfile.mkdtemp(prefix="memos-blend-"))
    settings = Settings(
        data_dir=data_dir,
        admin_key="k" * 20,
        scheduler={"enabled": False},
        activations={"enabled": False},
    )
    daemon = Daemon(settings)
    daemon.start()
    try:
        cube_id = daemon.cubes.create(admin, "blend", "").id
        items = [
            NewMemory(t.render(), f"session_{t.session}", t.speaker, t.timestamp,
                      {"dia_id": t.dia_id})
            for t in conv.turns
        ]  # fmt: skip
        for start in range(0, len(items), 100):
            daemon.memories.add(admin, cube_id, items[start : start + 100])
        while daemon.cubes.get(admin, cube_id).stats.enrichment_pending:
            time.sleep(0.5)
        by_id = {t.dia_id: t for t in conv.turns}
        recalled = []
        for question in questions:
            result = daemon.search.search(
                admin, cube_id, question.text, top_k, SearchFilters(), count=False
            )
            recalled.append([by_id[hit.memory.metadata["dia_id"]] for hit in result.hits])
        return recalled
    finally:
        daemon.stop()


def log_softmax_rows(first: torch.Tensor, rest: torch.Tensor | None) -> torch.Tensor:
    """(n, vocab) log-probabilities: the prompt's last logits, then the teacher-forced rows."""
    rows = first[None] if rest is None else torch.cat([first[None], rest])
    return torch.log_softmax(rows.float(), dim=-1)


def quality(
    runtime: Runtime,
    kv: KVCache,
    logits: torch.Tensor,
    continuation: list[int],
    answer: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs predicting each continuation token, log-probs predicting each answer token),
    teacher-forced on a copy of `kv` (the prompt's cache) after its last logits."""
    cont = runtime.logits(continuation[:-1], kv) if len(continuation) > 1 else None
    ans = runtime.logits(answer[:-1], kv) if len(answer) > 1 else None
    return log_softmax_rows(logits, cont), log_softmax_rows(logits, ans)


def measure_question(
    runtime: Runtime,
    prefix: KVCache,
    notes: list[list[int]],
    question: list[int],
    answer: list[int],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    plain = [runtime.build_chunk(n) for n in notes]
    after = [runtime.build_chunk(n, preamble=prefix.token_ids) for n in notes]
    block = [t for n in notes for t in n] + question
    runner = runtime.runner

    def full() -> tuple[KVCache, torch.Tensor]:
        cache = prefix.to_transformers()
        logits = runner.forward(block, cache, prefix.length)
        return KVCache.from_transformers(cache, [*prefix.token_ids, *block]), logits

    results: dict[str, tuple[KVCache, torch.Tensor, float, float, int]] = {}
    for name, ratio, rotate, preamble in ROWS:
        times, cpu = [], []
        for _ in range(args.repeats):
            started, started_cpu = time.perf_counter(), time.process_time()
            if ratio < 0:
                kv, logits = full()
                recomputed = len(block)
            else:
                chunks: list[ChunkKV | list[int]] = [*(after if preamble else plain), question]
                result = runtime.blend(chunks, prefix, recompute_ratio=ratio, rerotate=rotate)
                assert result.logits is not None
                kv, logits, recomputed = result.kv, result.logits, result.recomputed_tokens
            times.append((time.perf_counter() - started) * 1000)
            cpu.append((time.process_time() - started_cpu) * 1000)
        results[name] = (kv, logits, statistics.median(times), min(cpu), recomputed)
    reference_kv, reference_logits, full_ms, full_cpu, _ = results["full"]
    greedy = runtime.generate(
        [], kv=reference_kv, max_tokens=args.continuation, stop_token_ids=[]
    ).collect()
    continuation = list(greedy.token_ids) or [int(reference_logits.argmax())]
    ref_cont, ref_ans = quality(runtime, reference_kv, reference_logits, continuation, answer)
    ref_ll = float(ref_ans.gather(1, torch.tensor(answer)[:, None]).sum())
    rows = []
    for name, (kv, logits, ms, cpu_ms, recomputed) in results.items():
        cont, ans = quality(runtime, kv, logits, continuation, answer)
        p = ref_cont[0].exp()
        kl = float((p * (ref_cont[0] - cont[0])).sum())
        agree = float((cont.argmax(-1) == torch.tensor(continuation)).float().mean())
        ll = float(ans.gather(1, torch.tensor(answer)[:, None]).sum())
        rows.append(
            {
                "row": name,
                "block_tokens": len(block),
                "recomputed_tokens": recomputed,
                "ttft_ms": ms,
                "speedup": full_ms / ms,
                "cpu_ms": cpu_ms,
                "cpu_speedup": full_cpu / cpu_ms,
                "kl": kl,
                "top1": agree,
                "answer_ll": ll,
                "ll_delta": (ll - ref_ll) / abs(ref_ll) if ref_ll else 0.0,
            }
        )
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per row name: medians of times and speedups, means of the quality figures."""
    table = []
    for name, *_ in ROWS:
        mine = [r for r in rows if r["row"] == name]
        table.append(
            {
                "row": name,
                "questions": len(mine),
                "block_tokens": statistics.mean(r["block_tokens"] for r in mine),
                "recomputed_tokens": statistics.mean(r["recomputed_tokens"] for r in mine),
                "ttft_ms": statistics.median(r["ttft_ms"] for r in mine),
                "speedup": statistics.median(r["speedup"] for r in mine),
                "cpu_ms": statistics.median(r["cpu_ms"] for r in mine),
                "cpu_speedup": statistics.median(r["cpu_speedup"] for r in mine),
                "kl": statistics.mean(r["kl"] for r in mine),
                "top1": statistics.mean(r["top1"] for r in mine),
                "ll_delta": statistics.mean(r["ll_delta"] for r in mine),
                "ll_abs_delta": statistics.mean(abs(r["ll_delta"]) for r in mine),
            }
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data/locomo/locomo_dev.json"))
    parser.add_argument("--conversation", type=int, default=0, help="which LoCoMo conversation")
    parser.add_argument("--questions", type=int, default=8, help="questions with evidence")
    parser.add_argument("--notes", type=int, default=10, help="notes per prompt")
    parser.add_argument(
        "--recall", choices=("daemon", "evidence"), default="daemon",
        help="notes as the daemon recalls them, or the evidence plus random turns",
    )  # fmt: skip
    parser.add_argument("--continuation", type=int, default=32, help="greedy tokens compared")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per row (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-cache", type=Path, help="where the converted model is kept")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    if not args.data.exists():
        print(f"skipped: {args.data} not found", file=sys.stderr)
        return
    cache_dir = args.model_cache or Path(tempfile.gettempdir()) / "memos-bench-models"
    runtime = Runtime.load(RuntimeConfig(cache_dir=cache_dir, threads=args.threads))
    conv = load_locomo(args.data)[args.conversation]
    system = runtime.render_chat([{"role": "system", "content": SYSTEM}], False)
    prefix = runtime.prefill(runtime.tokenize(f"{system}<|im_start|>user\n{NOTES_HEADER}\n"))
    asked = [q for q in conv.questions if q.evidence and q.answer][: args.questions]
    if args.recall == "daemon":
        recalled = daemon_recall(conv, asked, args.notes)
    else:
        recalled = [pick_notes(conv, q, args.notes, i) for i, q in enumerate(asked)]
    rows: list[dict[str, Any]] = []
    for i, question in enumerate(asked):
        notes = [runtime.tokenize(note_line(t)) for t in recalled[i]]
        found = {t.dia_id for t in recalled[i]} & set(question.evidence)
        evidence_recall = len(found) / len(set(question.evidence))
        tail = f"\nMessage:\n{question.text}<|im_end|>\n<|im_start|>assistant\n"
        answer = runtime.tokenize(str(question.answer))
        for row in measure_question(runtime, prefix, notes, runtime.tokenize(tail), answer, args):
            rows.append({"question": i, "evidence_recall": evidence_recall, **row})
        print(f"question {i + 1}/{len(asked)} done", file=sys.stderr)
    table = summarise(rows)
    settings = {
        "model": runtime.info.name,
        "device": runtime.info.device,
        "dtype": runtime.info.dtype,
        "threads": torch.get_num_threads(),
        "prefix_tokens": prefix.length,
        "notes": args.notes,
        "recall": args.recall,
        "evidence_recall": statistics.mean(r["evidence_recall"] for r in rows) if rows else 0.0,
        "continuation": args.continuation,
        "conversation": conv.sample_id,
        "cpus": os.cpu_count(),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    print_table(
        f"Blended note caches vs a full prefill of the notes block ({settings})",
        [
            ("row", "row", "<16"),
            ("questions", "questions", ">9d"),
            ("block tok", "block_tokens", ">9.0f"),
            ("recomputed", "recomputed_tokens", ">10.1f"),
            ("ttft ms", "ttft_ms", ">8.1f"),
            ("speedup", "speedup", ">7.2f"),
            ("cpu ms", "cpu_ms", ">8.1f"),
            ("cpu speedup", "cpu_speedup", ">11.2f"),
            ("KL", "kl", ">8.4f"),
            ("top-1", "top1", ">6.3f"),
            ("ll delta", "ll_delta", ">+8.2%"),
            ("ll |delta|", "ll_abs_delta", ">10.2%"),
        ],
        table,
    )
    if args.json:
        payload = {"settings": settings, "summary": table, "rows": rows}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
