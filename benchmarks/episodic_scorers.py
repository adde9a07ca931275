"""Which scorer keeps what a later question needs? Block-wise prefill under a budget on LoCoMo.

For one LoCoMo conversation, the first `--context` tokens of its transcript (turns written
`Speaker said, "text"`, EpiCache's format) are prefilled block by block under `--budget`
(`kv_runtime.episodic`) with each scorer, and every question whose evidence lies in that context
(categories 1-4, the first `--questions` of them in file order, none picked by result) is asked
after the cache: the measure is the mean per-token negative log-likelihood of the gold answer,
teacher-forced after "\\nQuestion: ...\\nAnswer:" (lower is better; a 135M model's generated
answers score near the floor on F1). Also: the share of the evidence turns' tokens the cache kept
(over layers and KV heads), peak KV bytes during the build, build time.

Methods: `full` (the whole context, no eviction), `snapkv`, `kvzip` (query-agnostic), `recent`
(sinks + the most recent tokens: StreamingLLM), and `prompt(question)`: the prompt scorer with
the question itself as the scoring prompt, one build per question. That is an oracle, the best a
scoring prompt can do; an EpiCache episode's patched prompt sits between it and the
query-agnostic scorers.

    nice -n 19 .venv/bin/python benchmarks/episodic_scorers.py --context 4096 --budget 1024
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.locomo import Conversation, Question, load_locomo  # noqa: E402
from benchmarks.report import print_table  # noqa: E402
from kv_runtime import KVCache, Runtime, RuntimeConfig  # noqa: E402
from kv_runtime.block_scorers import KVZIP_CONTINUE_PROMPT, KVZIP_PROMPT, make_block_scorer  # noqa: E402
from kv_runtime.episodic import BudgetedPrefill, prefill_under_budget  # noqa: E402


def turn_tokens(runtime: Runtime, conv: Conversation) -> tuple[list[int], dict[str, range]]:
    """The transcript's token ids and each turn's token span (turns tokenized one by one)."""
    ids: list[int] = []
    spans: dict[str, range] = {}
    session = None
    for turn in conv.turns:
        if turn.session != session:
            session = turn.session
            ids += runtime.tokenize(f"\n[Session {session}, {turn.timestamp:%d %B %Y}]")
        start = len(ids)
        ids += runtime.tokenize(f'\n{turn.speaker} said, "{turn.render()}"')
        spans[turn.dia_id] = range(start, len(ids))
    return ids, spans


def answer_nll(runtime: Runtime, kv: KVCache, question: Question) -> float:
    """Mean per-token NLL of the gold answer, teacher-forced after the question."""
    prompt = runtime.tokenize(f"\nQuestion: {question.text}\nAnswer:")
    answer = runtime.tokenize(f" {question.answer}")
    logits = runtime.logits([*prompt, *answer], kv)
    predicted = logits[len(prompt) - 1 : -1]
    return float(torch.nn.functional.cross_entropy(predicted, torch.tensor(answer)))


def retention(built: BudgetedPrefill | None, spans: list[range]) -> float | None:
    if built is None:
        return 1.0
    positions = built.original_positions
    kept = sum(int(((positions >= s.start) & (positions < s.stop)).sum()) for s in spans)
    return kept / (sum(len(s) for s in spans) * positions.shape[0] * positions.shape[1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data/locomo/locomo_dev.json"))
    parser.add_argument("--conversation", type=int, default=0)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument(
        "--methods", nargs="+", default=["full", "snapkv", "kvzip", "recent", "prompt"]
    )
    parser.add_argument(
        "--positions", default="original", choices=["original", "compacted"],
        help="where kept tokens sit (kv_runtime.episodic); the same for every method",
    )  # fmt: skip
    parser.add_argument("--kvzip-chunk", type=int, default=1024, help="tokens repeated a pass")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--model-cache", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not args.data.exists():
        print(f"skipped: {args.data} not found", file=sys.stderr)
        return
    conv = load_locomo(args.data)[args.conversation]
    cache_dir = args.model_cache or Path(tempfile.gettempdir()) / "memos-bench-models"
    runtime = Runtime.load(RuntimeConfig(cache_dir=cache_dir, threads=args.threads))
    ids, spans = turn_tokens(runtime, conv)
    context = ids[: args.context]
    asked = [
        q
        for q in conv.questions
        if q.category in (1, 2, 3, 4)
        and q.answer
        and q.evidence
        and all(e in spans and spans[e].stop <= len(context) for e in q.evidence)
    ][: args.questions]
    print(f"{len(context)} context tokens, {len(asked)} questions", file=sys.stderr)

    def build(scorer: str, query: list[int] | None = None) -> tuple[BudgetedPrefill, float]:
        started = time.perf_counter()
        built = prefill_under_budget(
            runtime.runner, context, budget_tokens=args.budget, block_tokens=args.block,
            positions=args.positions,
            scorer=make_block_scorer(
                scorer, prompt_ids=query or (), repeat_ids=runtime.tokenize(KVZIP_PROMPT),
                continue_ids=runtime.tokenize(KVZIP_CONTINUE_PROMPT),
                chunk_tokens=args.kvzip_chunk,
            ),
        )  # fmt: skip
        return built, time.perf_counter() - started

    rows: list[dict[str, Any]] = []
    for method in args.methods:
        nlls, kept, peaks, seconds, per_category = [], [], [], [], {}
        shared: tuple[BudgetedPrefill | None, KVCache, float] | None = None
        if method == "full":
            started = time.perf_counter()
            kv = runtime.prefill(context)
            shared = (None, kv, time.perf_counter() - started)
        elif method != "prompt":
            built, took = build(method)
            shared = (built, built.kv, took)
        for q in asked:
            if shared is None:
                query = runtime.tokenize(f"\nQuestion: {q.text}\nAnswer:")
                built, took = build("prompt", query)
                entry: tuple[BudgetedPrefill | None, KVCache, float] = (built, built.kv, took)
            else:
                entry = shared
            built_or_none, kv, took = entry
            nll = answer_nll(runtime, kv, q)
            nlls.append(nll)
            per_category.setdefault(q.category_name, []).append(nll)
            kept.append(retention(built_or_none, [spans[e] for e in q.evidence]))
            peaks.append(kv.nbytes() if built_or_none is None else built_or_none.peak_kv_bytes)
            seconds.append(took)
        rows.append(
            {
                "conversation": conv.sample_id,
                "method": {"prompt": "prompt(question)", "kvzip": f"kvzip/{args.kvzip_chunk}"}.get(
                    method, method
                ),
                "budget_tokens": None if method == "full" else args.budget,
                "answer_nll": statistics.mean(nlls),
                "evidence_retention": statistics.mean(k for k in kept if k is not None),
                "peak_kv_bytes": max(peaks),
                "build_s": statistics.mean(seconds),
                "per_category": {c: round(statistics.mean(v), 4) for c, v in per_category.items()},
                "per_question": [round(x, 4) for x in nlls],
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    print_table(
        f"Block-wise prefill scorers on LoCoMo {conv.sample_id}: {len(context)} context tokens, "
        f"budget {args.budget}, block {args.block}, {args.positions} positions, "
        f"{len(asked)} questions; "
        f"{runtime.info.name} ({runtime.info.device}, {runtime.info.dtype}, "
        f"{torch.get_num_threads()} threads)",
        [
            ("method", "method", "<16"),
            ("answer NLL", "answer_nll", ">10.4f"),
            ("evidence kept", "evidence_retention", ">13.3f"),
            ("peak KV MB", "peak_mb", ">10.1f"),
            ("build s", "build_s", ">8.1f"),
        ],
        [{**row, "peak_mb": row["peak_kv_bytes"] / 2**20} for row in rows],
    )
    for row in rows:
        print(f"  {row['method']:<16} per category: {row['per_category']}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
