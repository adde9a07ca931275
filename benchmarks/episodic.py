"""Episodic caches (EpiCache) against single bounded caches, on LoCoMo conversations (a sketch).

LongConvQA in the paper's way, with a measure a 135M model can give: for each question whose
evidence lies in the context, the log-likelihood of the gold answer (teacher-forced, mean over
its tokens; reported as `answer_nll`, lower is better) after the question, continuing from each
cache. The context is the conversation as an activation renders it (one `[date] Speaker: text`
line a turn, the system turn of the chat template), cut to `--max-context` tokens so that the
full cache fits the model; the question is a user turn after it, as `generate` renders it.

Methods, each at every budget M (`--budgets`), all built by `Runtime.prefill_budgeted` in
blocks of `--block` tokens, so their peak KV is comparable:
- episodic: the windows of 4 utterances embedded (the daemon's embedder) and clustered into
  `--episodes` episodes (`memcube.episodes`); one cache per episode scored by its patched prompt;
  a question is answered from the episode nearest it (`route`), as the daemon does;
- episodic+kvzip: the same episodes, each cache scored by the larger of its patched prompt's
  attention and KVzip's reconstruction score (what the daemon builds);
- snapkv, kvzip: one cache, scored by the block's last 64 tokens / by reconstruction;
- recent: the last M tokens; streamingllm: 4 sinks and the last M - 4;
and once: full, the whole context's cache (built in the same blocks, nothing evicted).
Variants (`--methods`): X/layered for X in episodic, kvzip, snapkv
(EpiCache's per-layer budgets from the model's profile, `Runtime.layer_sensitivity`, the same
entries in all as M in every layer).

Also per row: evidence retention (the share of the evidence turns' cache entries kept, over
layers and heads, in the cache used), peak KV bytes during the build, build seconds (episodic:
all E prefills plus embedding and clustering) and, for episodic, the query->episode time. The
caches are not quantized here: this isolates what eviction keeps (KIVI is measured elsewhere).

Targets (issue 10): at M = 1024 the episodic cache closes >= 50% of the answer_nll gap between
the best single-cache baseline and full KV, its evidence retention >= 2x SnapKV's, and its peak
KV <= 1/3 of full prefill's.

    python benchmarks/episodic.py --json out.json
    python benchmarks/episodic.py --merge a.json b.json --json out.json  # runs put together
    python benchmarks/episodic.py --conversations 0 --budgets 512 --max-questions 20  # quick
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.locomo import Conversation, Question, load_locomo  # noqa: E402
from benchmarks.report import print_table  # noqa: E402
from kv_runtime import KVCache, Runtime, RuntimeConfig  # noqa: E402
from kv_runtime.episodic import BudgetedPrefill  # noqa: E402
from memcube import episodes  # noqa: E402
from memcube.embedder import Embedder, EmbedderConfig  # noqa: E402

# Chosen so that the episodic build's peak (M + block + patched prompt) stays under a third of
# the full cache's at M = 1,024 on a ~6,500-token context: 1,024 + 512 + ~550 tokens (the
# daemon's defaults since: memos/services/activations/episodes.py).
BLOCK_TOKENS = 512
PATCH_CHARS = 2_000
SINGLE = {  # method -> (scorer, sink tokens); the strongest baseline first (a partial run has it)
    "kvzip": ("kvzip", 4),
    "snapkv": ("snapkv", 4),
    "recent": ("recent", 0),
    "streamingllm": ("recent", 4),
}
EPISODIC = {"episodic": "prompt", "episodic+kvzip": "prompt+kvzip"}  # method -> scorer
LAYERED = ("episodic", "kvzip", "snapkv")  # methods with a "/layered" variant
DEFAULT_METHODS = ("full", "episodic", "episodic+kvzip", *SINGLE)  # the daemon's: episodic+kvzip
METHODS = (*DEFAULT_METHODS, "episodic+kvzip", *(f"{m}/layered" for m in LAYERED))
SINKS, RECENT = 4, 32  # prefill_budgeted's defaults: every layer budget must exceed their sum


@dataclass(frozen=True)
class Context:
    """A conversation cut to fit: its messages, tokens, and each kept turn's token span."""

    messages: tuple[dict[str, str], ...]
    token_ids: list[int]
    spans: dict[str, tuple[int, int]]  # dia_id -> [first, end) token positions
    utterances: list[episodes.Utterance]


def build_context(runtime: Runtime, conv: Conversation, max_tokens: int) -> Context:
    """The longest prefix of the conversation whose rendering has at most `max_tokens` tokens,
    with the token span of each turn (from the tokens' texts laid along the rendered string)."""
    lines = [f"[{t.timestamp:%Y-%m-%d %H:%M}] {t.speaker}: {t.render()}" for t in conv.turns]
    keep = len(lines)
    while True:
        messages = ({"role": "system", "content": "\n".join(lines[:keep])},)
        ids = runtime.template.render(messages, add_generation_prompt=False)
        if len(ids) <= max_tokens or keep == 1:
            break
        keep = max(1, int(keep * max_tokens / len(ids)) - 1)
    texts = runtime.token_texts(ids)
    rendered = "".join(texts)
    starts = list(itertools.accumulate((len(t) for t in texts[:-1]), initial=0))
    # Each line is found by its head (`[date] Speaker:`, ASCII): a token's text may not spell
    # a character split across byte-level tokens (emoji), so the whole line need not match.
    # A turn's tokens run from the one its head starts in to the one the next head starts in.
    begins, cursor = [], 0
    for turn in conv.turns[:keep]:
        begin = rendered.index(f"[{turn.timestamp:%Y-%m-%d %H:%M}] {turn.speaker}:", cursor)
        begins.append(bisect.bisect_right(starts, begin) - 1)
        cursor = begin + 1
    ends = [*begins[1:], len(ids)]
    spans = {t.dia_id: (b, e) for t, b, e in zip(conv.turns[:keep], begins, ends, strict=True)}
    utterances = [episodes.Utterance(t.speaker, t.render()) for t in conv.turns[:keep]]
    return Context(messages, ids, spans, utterances)


def answer_nll(runtime: Runtime, context: Context, kv: KVCache, question: Question) -> float:
    """Mean negative log-likelihood of the gold answer's tokens after the question."""
    asked = [{"role": "user", "content": question.text}]
    q_ids = runtime.template.render_delta(context.messages, asked)
    a_ids = runtime.tokenize(str(question.answer))
    logits = runtime.logits([*q_ids, *a_ids], kv)
    rows = logits[len(q_ids) - 1 : len(q_ids) - 1 + len(a_ids)]
    logp = torch.log_softmax(rows.float(), dim=-1)
    return float(-logp[torch.arange(len(a_ids)), torch.tensor(a_ids)].mean())


def retention(kept_at: torch.Tensor | None, context: Context, question: Question) -> float:
    """Share of the evidence turns' entries the cache keeps, over layers and heads.
    kept_at: the build's `original_positions` (layers, kv_heads, kept); None: the full cache.
    (A compacted cache's own `positions` are its new slots 0..kept-1, not the tokens'.)"""
    wanted = [p for d in question.evidence if d in context.spans for p in range(*context.spans[d])]
    if not wanted or kept_at is None:
        return 1.0
    kept = torch.isin(kept_at, torch.tensor(wanted)).sum(dim=-1).float()  # (layers, heads)
    return float((kept / len(wanted)).mean())


def answerable(context: Context, questions: tuple[Question, ...]) -> list[Question]:
    return [
        q
        for q in questions
        if q.answer is not None and q.evidence and all(d in context.spans for d in q.evidence)
    ]


Built = tuple[KVCache, torch.Tensor | None]  # a cache and its entries' original positions


def evaluate(
    runtime: Runtime,
    context: Context,
    questions: list[Question],
    pick: Callable[[Question], Built],
) -> tuple[list[dict[str, Any]], float]:
    """Per question: its category, answer nll and evidence retention from the cache `pick`
    chooses for it; and the mean seconds `pick` took (the route, for episodic)."""
    out, picking = [], 0.0
    for q in questions:
        started = time.perf_counter()
        kv, kept_at = pick(q)
        picking += time.perf_counter() - started
        out.append(
            {
                "category": q.category_name,
                "nll": answer_nll(runtime, context, kv, q),
                "retention": retention(kept_at, context, q),
            }
        )
    return out, picking / max(1, len(questions))


def summarize(
    conv_id: str,
    method: str,
    budget: int | None,
    per_q: list[dict[str, Any]],
    peak: int,
    build_s: float,
    route_ms: float | None = None,
) -> list[dict[str, Any]]:
    """One row for all the questions (category "all") and one per category."""
    rows = []
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in per_q:
        groups["all"].append(item)
        groups[item["category"]].append(item)
    for category, items in sorted(groups.items()):
        rows.append(
            {
                "conversation": conv_id,
                "category": category,
                "method": method,
                "budget_tokens": budget,
                "questions": len(items),
                "answer_nll": statistics.fmean(i["nll"] for i in items),
                "evidence_retention": statistics.fmean(i["retention"] for i in items),
                "peak_kv_bytes": peak,
                "build_s": build_s,
                "route_ms": route_ms,
            }
        )
    return rows


def episodic_caches(
    runtime: Runtime,
    context: Context,
    found: list[episodes.Episode],
    windows: list[episodes.Window],
    budget: int,
    args: argparse.Namespace,
    scorer: str = "prompt",
    layer_budgets: tuple[int, ...] | None = None,
) -> tuple[list[BudgetedPrefill], list[int]]:
    """One budgeted prefill of the whole context per episode, scored by its patched prompt
    (a user turn after the context, as the daemon renders it); and each prompt's length."""
    built, prompt_tokens = [], []
    for episode in found:
        patch = episodes.patched_prompt(windows, episode, args.patch_chars)
        query = runtime.template.render_delta(
            context.messages, [{"role": "user", "content": patch}]
        )
        prompt_tokens.append(len(query))
        built.append(
            runtime.prefill_budgeted(
                context.token_ids,
                budget_tokens=budget,
                block_tokens=args.block,
                query_ids=query,
                scorer=scorer,
                layer_budgets=layer_budgets,
            )  # fmt: skip
        )
    return built, prompt_tokens


def run_conversation(
    runtime: Runtime,
    embedder: Embedder,
    conv: Conversation,
    args: argparse.Namespace,
    emit: Callable[[list[dict[str, Any]]], None],
) -> None:
    """Every method at every budget on one conversation; `emit(rows)` after each step."""
    context = build_context(runtime, conv, args.max_context)
    questions = answerable(context, conv.questions)[: args.max_questions]
    ids = context.token_ids
    print(
        f"{conv.sample_id}: {len(ids)} context tokens, {len(context.spans)} turns, "
        f"{len(questions)} questions",
        file=sys.stderr,
    )
    # The full cache, built in blocks (the same cache as one pass, without its context-square
    # attention matrix): nothing is evicted, so the peak is the whole context's KV.
    methods = args.methods
    if "full" in methods:
        started = time.perf_counter()
        full = runtime.prefill_budgeted(
            ids, budget_tokens=len(ids), block_tokens=args.block, scorer="recent", sink_tokens=0
        ).kv
        full_s = time.perf_counter() - started
        per_q, _ = evaluate(runtime, context, questions, lambda q: (full, None))
        emit(summarize(conv.sample_id, "full", None, per_q, full.nbytes(), full_s))
        del full
    profile = runtime.layer_sensitivity() if any("/" in m for m in methods) else None

    # Episodes do not depend on the budget: embed and cluster once, count it in every build.
    started = time.perf_counter()
    windows = episodes.segment(context.utterances)
    vectors = embedder.embed([w.text for w in windows])
    found = episodes.cluster(vectors, args.episodes)
    centroids = np.stack([e.centroid for e in found])
    cluster_s = time.perf_counter() - started
    for budget in args.budgets:
        layered = profile.budgets(budget, minimum=SINKS + RECENT + 1) if profile else None
        for method in methods:
            base, _, variant = method.partition("/")
            layer_budgets = layered if variant == "layered" else None
            if base in EPISODIC:
                started = time.perf_counter()
                built, prompt_tokens = episodic_caches(
                    runtime, context, found, windows, budget, args, EPISODIC[base], layer_budgets
                )
                build_s = cluster_s + time.perf_counter() - started

                def routed(q: Question, built: list[BudgetedPrefill] = built) -> Built:
                    chosen = built[episodes.route(embedder.embed_query(q.text), centroids)]
                    return chosen.kv, chosen.original_positions

                per_q, route_s = evaluate(runtime, context, questions, routed)
                peak = max(b.peak_kv_bytes for b in built)
                rows = summarize(
                    conv.sample_id, method, budget, per_q, peak, build_s, route_s * 1e3
                )
                for row in rows:
                    row["patched_prompt_tokens"] = max(prompt_tokens)
            elif base in SINGLE:
                scorer, sinks = SINGLE[base]
                started = time.perf_counter()
                one = runtime.prefill_budgeted(
                    ids, budget_tokens=budget, block_tokens=args.block, scorer=scorer,
                    sink_tokens=sinks, layer_budgets=layer_budgets,
                )  # fmt: skip
                build_s = time.perf_counter() - started

                def single(q: Question, one: BudgetedPrefill = one) -> Built:
                    return one.kv, one.original_positions

                per_q, _ = evaluate(runtime, context, questions, single)
                rows = summarize(conv.sample_id, method, budget, per_q, one.peak_kv_bytes, build_s)
            else:
                continue  # "full": above, once
            if layer_budgets is not None:
                for row in rows:
                    row["layer_budgets"] = list(layer_budgets)
            emit(rows)
        print(f"{conv.sample_id}: M={budget} done", file=sys.stderr)


def pooled(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversations together (conversation "all"): per method, budget and category, the
    question-weighted means of nll and retention, the largest peak, the mean build time."""
    groups: dict[tuple[str, int | None, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["conversation"] != "all":
            groups[(row["method"], row["budget_tokens"], row["category"])].append(row)
    out = []
    for (method, budget, category), items in groups.items():
        n = sum(r["questions"] for r in items)
        routes = [r["route_ms"] for r in items if r["route_ms"] is not None]
        out.append(
            {
                "conversation": "all",
                "category": category,
                "method": method,
                "budget_tokens": budget,
                "questions": n,
                "answer_nll": sum(r["answer_nll"] * r["questions"] for r in items) / n,
                "evidence_retention": sum(r["evidence_retention"] * r["questions"] for r in items)
                / n,
                "peak_kv_bytes": max(r["peak_kv_bytes"] for r in items),
                "build_s": statistics.fmean(r["build_s"] for r in items),
                "route_ms": statistics.fmean(routes) if routes else None,
                "conversations": len(items),
            }
        )
    return out


def gap_closed(rows: list[dict[str, Any]], category: str = "all") -> list[dict[str, Any]]:
    """Per conversation (and "all", pooled) and budget: the share of the nll gap between the
    best single cache and full KV that the episodic cache closes, its evidence retention over
    SnapKV's, and its build peak over full prefill's."""
    table = {(r["conversation"], r["method"], r["budget_tokens"]): r
             for r in rows if r["category"] == category}  # fmt: skip
    out = []
    for (conv_id, method, budget), episodic in sorted(table.items(), key=str):
        if not method.startswith("episodic"):
            continue
        full = table.get((conv_id, "full", None))
        singles = [table[k] for k in ((conv_id, m, budget) for m in SINGLE) if k in table]
        snapkv = table.get((conv_id, "snapkv", budget))
        if full is None or snapkv is None or len(singles) < len(SINGLE):
            continue  # a partial run: this budget's baselines are not measured yet
        # Any single cache measured counts as a baseline, a layered one included.
        singles += [
            r
            for (c, m, b), r in table.items()
            if (c, b) == (conv_id, budget) and m.partition("/")[0] in SINGLE and "/" in m
        ]
        best = min(singles, key=lambda r: r["answer_nll"])
        gap = best["answer_nll"] - full["answer_nll"]
        out.append(
            {
                "conversation": conv_id,
                "category": category,
                "method": method,
                "budget_tokens": budget,
                "best_single": best["method"],
                "full_nll": full["answer_nll"],
                "best_single_nll": best["answer_nll"],
                "episodic_nll": episodic["answer_nll"],
                # No gap to close where the best single cache is already at or below full KV's
                # nll (a ratio of two negatives would read as progress).
                "gap_closed": (best["answer_nll"] - episodic["answer_nll"]) / gap
                if gap > 0
                else None,
                "episodic_minus_best": episodic["answer_nll"] - best["answer_nll"],
                "retention_vs_snapkv": episodic["evidence_retention"]
                / max(snapkv["evidence_retention"], 1e-9),
                "peak_vs_full": episodic["peak_kv_bytes"] / full["peak_kv_bytes"],
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data/locomo/locomo_dev.json"))
    parser.add_argument("--conversations", type=int, nargs="+", help="indexes (default: all)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--episodes", type=int, default=episodes.EPISODES)
    parser.add_argument("--block", type=int, default=BLOCK_TOKENS, help="every build's blocks")
    parser.add_argument(
        "--patch-chars", type=int, default=PATCH_CHARS,
        help="cap on a patched prompt's medoid windows (characters)",
    )  # fmt: skip
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS),
        help="what to build and ask (default: the issue's set, without the variants)",
    )  # fmt: skip
    parser.add_argument("--max-context", type=int, default=6500, help="tokens of context kept")
    parser.add_argument("--max-questions", type=int, default=200, help="per conversation")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--model-cache", type=Path, help="where the converted models are kept")
    parser.add_argument("--json", type=Path, help="write the rows here (after every step)")
    parser.add_argument(
        "--merge", type=Path, nargs="+",
        help="run nothing: put these runs' JSON together (pooled rows and targets recomputed)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.json)
        return
    if not args.data.exists():
        print(f"skipped: {args.data} not found", file=sys.stderr)
        return
    cache = args.model_cache or Path(tempfile.gettempdir()) / "memos-bench-models"
    runtime = Runtime.load(RuntimeConfig(cache_dir=cache, threads=args.threads))
    embedder = Embedder(EmbedderConfig(cache_dir=cache))
    conversations = load_locomo(args.data)
    chosen = args.conversations or list(range(len(conversations)))
    settings = {
        "model": runtime.info.name,
        "block_tokens": args.block,
        "patch_chars": args.patch_chars,
        "episodes": args.episodes,
        "max_context": args.max_context,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }
    rows: list[dict[str, Any]] = []

    def emit(new: list[dict[str, Any]]) -> None:
        rows.extend(new)
        if args.json is not None:  # incrementally: an interrupted run keeps what it measured
            everything = rows + pooled(rows)
            report = {"settings": settings, "rows": everything, "targets": gap_closed(everything)}
            args.json.write_text(json.dumps(report, indent=1))

    for index in chosen:
        started = time.perf_counter()
        run_conversation(runtime, embedder, conversations[index], args, emit)
        print(f"conversation {index}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    report(rows + pooled(rows), settings)


def merge(paths: list[Path], out: Path | None) -> None:
    """Several runs' rows as one report (each run's own pooled rows are dropped and redone; a
    row measured again by a later run replaces the earlier one, e.g. a conversation's full KV)."""
    runs = [json.loads(path.read_text()) for path in paths]
    latest: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in (r for run in runs for r in run["rows"] if r["conversation"] != "all"):
        key = (row["conversation"], row["method"], row["budget_tokens"], row["category"])
        latest.pop(key, None)  # re-inserted: the order follows the latest run
        latest[key] = row
    rows = list(latest.values())
    settings = {"merged": [str(p) for p in paths], "runs": [run["settings"] for run in runs]}
    everything = rows + pooled(rows)
    if out is not None:
        payload = {"settings": settings, "rows": everything, "targets": gap_closed(everything)}
        out.write_text(json.dumps(payload, indent=1))
    report(everything, settings)


def report(everything: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    print_table(
        f"Answer NLL from each cache ({settings})",
        [
            ("conversation", "conversation", "<12"),
            ("category", "category", "<12"),
            ("method", "method", "<17"),
            ("M", "budget_tokens", ">6"),
            ("questions", "questions", ">9d"),
            ("answer nll", "answer_nll", ">10.3f"),
            ("evidence kept", "evidence_retention", ">13.3f"),
            ("peak KV bytes", "peak_kv_bytes", ">13,"),
            ("build s", "build_s", ">8.1f"),
            ("route ms", "route_ms", ">8.1f"),
        ],
        everything,
    )
    print_table(
        "Episodic against the best single cache (targets at M=1024: gap closed >= 0.5, "
        "retention >= 2x SnapKV's, peak <= 1/3 of full)",
        [
            ("conversation", "conversation", "<12"),
            ("method", "method", "<17"),
            ("M", "budget_tokens", ">6"),
            ("best single", "best_single", "<15"),
            ("gap closed", "gap_closed", ">10.2f"),
            ("nll - best", "episodic_minus_best", ">10.3f"),
            ("retention x snapkv", "retention_vs_snapkv", ">18.2f"),
            ("peak / full", "peak_vs_full", ">11.2f"),
        ],
        gap_closed(everything),
    )


if __name__ == "__main__":
    main()
