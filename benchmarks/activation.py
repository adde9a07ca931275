"""Activation memory: reuse speed, bytes on disk and quality of compressed KV caches.

Real text: the first LoCoMo conversation rendered as a dated transcript. For each context length
N the first N tokens are prefilled once, then for each bit width:

- TTFT: a short question after the context, answered by a full re-prefill of context + question
  (one run), against loading the stored activation from disk and continuing from it (load time
  included; median of 3 runs);
- bytes: the activation's files on disk, against the same kept keys/values in float16;
- quality: the next 257 tokens of the transcript are teacher-forced after the (compressed) cache;
  the 256 next-token predictions are compared with the uncompressed cache's (top-1 agreement) and
  scored (perplexity ratio, compressed / uncompressed).

The library baseline, transformers' `QuantizedCache` with the optimum-quanto backend (2 and 4
bits; its defaults otherwise: group 64, axis 0), is filled with the same captured keys/values and
scored the same way; its bytes are the quanto tensors' in memory, and it has no stored form.

    python benchmarks/activation.py --json out.json
    python benchmarks/activation.py --contexts 512 --bits 4      # quick
"""

from __future__ import annotations

import argparse
import json
import math
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

from benchmarks.locomo import Conversation, load_locomo  # noqa: E402
from benchmarks.report import print_table  # noqa: E402
from kv_runtime import (  # noqa: E402
    CompressionConfig,
    KVCache,
    Runtime,
    RuntimeConfig,
    load_activation,
)

CONTINUATION = 257  # tokens fed after the context: 256 next-token predictions


def transcript(conv: Conversation) -> str:
    """Turns as `Speaker: text`, a dated header before each session."""
    lines, session = [], None
    for turn in conv.turns:
        if turn.session != session:
            session = turn.session
            lines.append(f"\n[Session {session}, {turn.timestamp:%d %B %Y}]")
        lines.append(f"{turn.speaker}: {turn.render()}")
    return "\n".join(lines).strip() + "\n"


def quality(
    reference: torch.Tensor, logits: torch.Tensor, targets: list[int]
) -> tuple[float, float]:
    """(top-1 agreement with the reference, perplexity ratio) over the teacher-forced steps.

    reference, logits: (steps + 1, vocab); row i predicts targets[i + 1].
    """
    target = torch.tensor(targets[1:])
    agree = (logits[:-1].argmax(-1) == reference[:-1].argmax(-1)).float().mean().item()
    nll = torch.nn.functional.cross_entropy(logits[:-1], target).item()
    ref_nll = torch.nn.functional.cross_entropy(reference[:-1], target).item()
    return agree, math.exp(nll - ref_nll)


def ttft_prefill(runtime: Runtime, context: list[int], question: list[int]) -> float:
    result = runtime.generate([*context, *question], max_tokens=1).collect()
    return result.ttft_ms


def ttft_reuse(runtime: Runtime, directory: Path, question: list[int]) -> tuple[float, float]:
    """(load ms, load + first token ms) for a stored activation; medians of 3 runs."""
    loads, totals = [], []
    for _ in range(3):
        started = time.perf_counter()
        compressed = load_activation(directory, runtime.fingerprint)
        loads.append((time.perf_counter() - started) * 1000)
        result = runtime.generate(question, kv=compressed, max_tokens=1).collect()
        totals.append(loads[-1] + result.ttft_ms)
    return statistics.median(loads), statistics.median(totals)


def quanto_row(runtime: Runtime, kv: KVCache, bits: int, cont: list[int]) -> dict[str, Any] | None:
    """Fill transformers' QuantizedCache (quanto) with the captured context; None if it fails."""
    from transformers import QuantizedCache
    from transformers.cache_utils import QuantoQuantizedLayer

    model = runtime.runner.model
    try:
        cache = QuantizedCache(backend="quanto", config=model.config, nbits=bits)
        for layer, (k, v) in enumerate(zip(kv.keys, kv.values, strict=True)):
            cache.update(k.clone(), v.clone(), layer)
    except (ImportError, ValueError) as exc:
        print(f"quanto {bits}-bit skipped: {exc}", file=sys.stderr)
        return None
    nbytes = 0
    for cache_layer in cache.layers:
        assert isinstance(cache_layer, QuantoQuantizedLayer)
        for q in (cache_layer._quantized_keys, cache_layer._quantized_values):
            assert q is not None
            codes = q._data._data if hasattr(q._data, "_data") else q._data  # PackedTensor: bytes
            nbytes += sum(t.numel() * t.element_size() for t in (codes, q._scale, q._shift))
    logits = runtime.runner.forward(cont, cache, kv.length, all_logits=True)
    return {"bytes": nbytes, "logits": logits}


def run_context(
    runtime: Runtime,
    tokens: list[int],
    question: list[int],
    n: int,
    bits_list: list[int],
    args: argparse.Namespace,
    workdir: Path,
) -> list[dict[str, Any]]:
    context, cont = tokens[:n], tokens[n : n + CONTINUATION]
    started = time.perf_counter()
    kv = runtime.prefill(context)
    print(f"context {n}: prefill {time.perf_counter() - started:.1f} s", file=sys.stderr)
    reference = runtime.logits(cont, kv)
    prefill_ms = ttft_prefill(runtime, context, question) if not args.no_ttft else None
    rows = []
    for bits in bits_list:
        settings = CompressionConfig(
            bits=bits,
            group_size=args.group_size,
            residual_tokens=args.residual,
            sink_tokens=args.sinks,
        )
        compressed = runtime.compress(kv, settings)
        directory = workdir / f"{n}-{bits}"
        manifest = runtime.save_activation(directory, compressed)
        load_ms = reuse_ms = None
        if not args.no_ttft:
            load_ms, reuse_ms = ttft_reuse(runtime, directory, question)
        agree, ppl = quality(reference, runtime.logits(cont, compressed), cont)
        rows.append(
            {
                "context_tokens": n,
                "bits": bits,
                "method": "memosd",
                "ttft_prefill_ms": prefill_ms,
                "ttft_reuse_ms": reuse_ms,
                "bytes": manifest.bytes,
                "bytes_fp16": manifest.fp16_bytes,
                "load_ms": load_ms,
                "top1_agreement": round(agree, 4),
                "ppl_ratio": round(ppl, 4),
            }
        )
        print(rows[-1], file=sys.stderr)
        if bits in (2, 4) and not args.no_quanto:
            baseline = quanto_row(runtime, kv, bits, cont)
            if baseline is not None:
                agree, ppl = quality(reference, baseline["logits"], cont)
                rows.append(
                    {
                        "context_tokens": n,
                        "bits": bits,
                        "method": "quanto",
                        "ttft_prefill_ms": prefill_ms,
                        "ttft_reuse_ms": None,
                        "bytes": baseline["bytes"],
                        "bytes_fp16": compressed.fp16_nbytes(),
                        "load_ms": None,
                        "top1_agreement": round(agree, 4),
                        "ppl_ratio": round(ppl, 4),
                    }
                )
                print(rows[-1], file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data/locomo/locomo_dev.json"))
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 8, 4, 2])
    defaults = CompressionConfig()
    parser.add_argument("--group-size", type=int, default=defaults.group_size)
    parser.add_argument("--residual", type=int, default=defaults.residual_tokens)
    parser.add_argument("--sinks", type=int, default=defaults.sink_tokens)
    parser.add_argument("--conversation", type=int, default=0, help="which LoCoMo conversation")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    parser.add_argument("--model-cache", type=Path, help="where the converted model is kept")
    parser.add_argument("--no-quanto", action="store_true", help="skip the QuantizedCache rows")
    parser.add_argument("--no-ttft", action="store_true", help="quality and bytes only")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    if not args.data.exists():
        print(f"skipped: {args.data} not found", file=sys.stderr)
        return
    conv = load_locomo(args.data)[args.conversation]
    workdir = Path(tempfile.mkdtemp(prefix="memos-activation-"))
    cache_dir = args.model_cache or Path(tempfile.gettempdir()) / "memos-bench-models"
    runtime = Runtime.load(RuntimeConfig(cache_dir=cache_dir, threads=args.threads))
    tokens = runtime.tokenize(transcript(conv))
    asked = next(q for q in conv.questions if q.evidence)
    question = runtime.tokenize(f"\nQuestion: {asked.text}\nAnswer:")
    rows: list[dict[str, Any]] = []
    for n in args.contexts:
        if n + CONTINUATION > len(tokens):
            print(f"context {n} skipped: the transcript has {len(tokens)} tokens", file=sys.stderr)
            continue
        rows += run_context(runtime, tokens, question, n, args.bits, args, workdir)
    for row in rows:
        row["bytes_ratio"] = round(row["bytes"] / row["bytes_fp16"], 4)
        if row["ttft_reuse_ms"]:
            row["ttft_speedup"] = round(row["ttft_prefill_ms"] / row["ttft_reuse_ms"], 1)
    settings = {
        "group_size": args.group_size,
        "residual": args.residual,
        "sinks": args.sinks,
        "threads": torch.get_num_threads(),
        "conversation": conv.sample_id,
    }
    print_table(
        f"Activation reuse on LoCoMo, {runtime.info.name} "
        f"({runtime.info.device}, {runtime.info.dtype}); {settings}",
        [
            ("context", "context_tokens", ">8d"),
            ("bits", "bits", ">4d"),
            ("method", "method", ">8"),
            ("prefill ms", "ttft_prefill_ms", ">10.0f"),
            ("reuse ms", "ttft_reuse_ms", ">8.0f"),
            ("speedup", "ttft_speedup", ">7.1f"),
            ("load ms", "load_ms", ">7.0f"),
            ("bytes", "bytes", ">10d"),
            ("vs fp16", "bytes_ratio", ">7.3f"),
            ("top-1", "top1_agreement", ">6.4f"),
            ("ppl ratio", "ppl_ratio", ">9.4f"),
        ],
        rows,
    )
    if args.json:
        args.json.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
