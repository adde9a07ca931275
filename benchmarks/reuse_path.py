"""The reuse path: how soon a stored activation answers, against re-prefill and a naive baseline.

One run, one model, the same context and question for every row (the first LoCoMo
conversation as a dated transcript, its first N tokens; a question from its QA set after it).
TTFT is the time to the first generated token (greedy, `max_tokens=1`); medians over
`--repeats` rounds, the rows measured in turn inside each round so that a busy machine slows
them alike. Rows, per context length:

- re-prefill: the runtime prefills context + question;
- naive: plain transformers, no memosd: a `DynamicCache` filled by one forward of the context
  and kept in this process; a request runs the question on it (`logits_to_keep=1`) and crops
  the question off again afterwards. Nothing is copied, loaded or dequantized: the floor;
- naive deepcopy: transformers' documented recipe for reusing a prompt cache across requests,
  `copy.deepcopy(cache)` then `model.generate(..., max_new_tokens=1)`;
- memosd B-bit cold: the stored activation loaded from disk (checksums verified) and a first
  request on it (dequantized for it): what a request pays when its activation is not in memory;
- memosd B-bit dequantize per request: the activation already loaded (compressed) in memory,
  dequantized by every request (what the daemon did before it kept dequantized caches);
- memosd B-bit loaded: dequantized once when loaded, every request reads it (the daemon now).

Stages (medians of the same rounds): load from disk, dequantize (`decompress`: to the model's
dtype, fresh tensors), cache setup (`KVCache.to_transformers`), first forward (the question on
that cache, to its logits). `cpu ms` is this process's CPU time: with `--threads 1` it is the
work itself, which a loaded machine inflates far less than wall time; `best cpu` is the least
of the runs (the run least disturbed by other processes, as `timeit` reports).

`--daemon` adds the same through a real `memos serve` (HTTP, `POST /v1/cubes/{id}/generate` with
an `activation_id`, `max_tokens=1`): the server's `ttft_ms` and the client's wall time, first
request (loads the activation) and later ones (median), against a generate without activation
whose prompt carries the same context (re-prefill).

    python benchmarks/reuse_path.py --threads 1 --json out.json
    python benchmarks/reuse_path.py --contexts 512 --bits 4 --repeats 3      # quick
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import DynamicCache  # noqa: E402

from benchmarks.activation import transcript  # noqa: E402
from benchmarks.locomo import load_locomo  # noqa: E402
from benchmarks.report import print_table  # noqa: E402
from kv_runtime import (  # noqa: E402
    CompressedKV,
    CompressionConfig,
    Runtime,
    RuntimeConfig,
    load_activation,
)

Sample = tuple[float, float]  # (wall ms, cpu ms)


def timed(fn: Callable[[], Any]) -> tuple[Any, Sample]:
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, ((time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000)


class Samples:
    """Wall and CPU milliseconds by name; medians on demand."""

    def __init__(self) -> None:
        self.wall: dict[str, list[float]] = defaultdict(list)
        self.cpu: dict[str, list[float]] = defaultdict(list)

    def add(self, name: str, sample: Sample) -> None:
        self.wall[name].append(sample[0])
        self.cpu[name].append(sample[1])

    def median(self, name: str) -> tuple[float, float]:
        return statistics.median(self.wall[name]), statistics.median(self.cpu[name])

    def best_cpu(self, name: str) -> float:
        """The least CPU time of any run: the work with the least interference from others."""
        return min(self.cpu[name])


class Naive:
    """Plain transformers: one DynamicCache of the context, kept and continued."""

    def __init__(self, runtime: Runtime, context: list[int]) -> None:
        self.model = runtime.runner.model
        self.length = len(context)
        self.cache = DynamicCache()
        with torch.no_grad():
            self.model(input_ids=torch.tensor([context]), past_key_values=self.cache)

    def first_token(self, question: list[int]) -> int:
        with torch.no_grad():
            out = self.model(
                input_ids=torch.tensor([question]), past_key_values=self.cache, logits_to_keep=1
            )
        token = int(out.logits[0, -1].argmax())
        self.cache.crop(-len(question))
        assert self.cache.get_seq_length() == self.length
        return token

    def deepcopy_generate(self, context: list[int], question: list[int]) -> int:
        cache = copy.deepcopy(self.cache)
        ids = torch.tensor([[*context, *question]])
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache,
            max_new_tokens=1,
            do_sample=False,
        )
        return int(out[0, -1])


def measure_context(
    runtime: Runtime, tokens: list[int], question: list[int], n: int, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    context = tokens[:n]
    kv = runtime.prefill(context)
    naive = Naive(runtime, context)
    stored: dict[int, tuple[Path, CompressedKV]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="memos-reuse-"))
    for bits in args.bits:
        directory = workdir / f"{n}-{bits}"
        runtime.save_activation(directory, runtime.compress(kv, CompressionConfig(bits=bits)))
        stored[bits] = directory, load_activation(directory, runtime.fingerprint)
    ready = {bits: runtime.decompress(c) for bits, (_, c) in stored.items()}
    first = runtime.generate([*context, *question], max_tokens=1).collect().token_ids

    def ttft(name: str, run: Callable[[], Any]) -> None:
        result, sample = timed(run)
        samples.add(name, sample)
        answers[name] = result

    samples, answers = Samples(), {}
    for round_ in range(args.repeats):
        if round_ < args.prefill_repeats:
            ttft("re-prefill", lambda: runtime.generate([*context, *question], max_tokens=1)
                 .collect().token_ids)  # fmt: skip
        ttft("naive", lambda: (naive.first_token(question),))
        ttft("naive deepcopy", lambda: (naive.deepcopy_generate(context, question),))
        for bits, (directory, compressed) in stored.items():
            ttft(f"{bits} cold", lambda d=directory: runtime.generate(
                question, kv=load_activation(d, runtime.fingerprint), max_tokens=1
            ).collect().token_ids)  # fmt: skip
            ttft(f"{bits} per request", lambda c=compressed: runtime.generate(
                question, kv=c, max_tokens=1).collect().token_ids)  # fmt: skip
            ttft(f"{bits} loaded", lambda r=ready[bits]: runtime.generate(
                question, kv=r, max_tokens=1).collect().token_ids)  # fmt: skip
            # Stages, one at a time.
            _, sample = timed(lambda d=directory: load_activation(d, runtime.fingerprint))
            samples.add(f"{bits} stage load", sample)
            restored, sample = timed(lambda c=compressed: runtime.decompress(c))
            samples.add(f"{bits} stage dequantize", sample)
            cache, sample = timed(restored.to_transformers)
            samples.add(f"{bits} stage setup", sample)
            _, sample = timed(lambda c=cache: runtime.runner.forward(question, c, n))
            samples.add(f"{bits} stage forward", sample)

    prefill_wall, prefill_cpu = samples.median("re-prefill")
    prefill_best = samples.best_cpu("re-prefill")
    rows: list[dict[str, Any]] = []

    def row(name: str, label: str, bits: int | None) -> None:
        wall, cpu = samples.median(name)
        rows.append(
            {
                "context_tokens": n,
                "row": label,
                "bits": bits,
                "ttft_ms": round(wall, 1),
                "cpu_ms": round(cpu, 1),
                "speedup": round(prefill_wall / wall, 1),
                "cpu_speedup": round(prefill_cpu / cpu, 1),
                "best_cpu_ms": round(samples.best_cpu(name), 1),
                "best_cpu_speedup": round(prefill_best / samples.best_cpu(name), 1),
                "same_token": tuple(answers[name]) == tuple(first),
                "runs": len(samples.wall[name]),
            }
        )

    row("re-prefill", "re-prefill", None)
    row("naive", "naive (DynamicCache kept)", None)
    row("naive deepcopy", "naive (deepcopy+generate)", None)
    for bits in stored:
        row(f"{bits} cold", "memosd cold (disk)", bits)
        row(f"{bits} per request", "memosd dequant/request", bits)
        row(f"{bits} loaded", "memosd loaded", bits)
    stages = []
    for bits in stored:
        entry: dict[str, Any] = {"context_tokens": n, "bits": bits}
        for stage in ("load", "dequantize", "setup", "forward"):
            wall, cpu = samples.median(f"{bits} stage {stage}")
            entry[f"{stage}_ms"], entry[f"{stage}_cpu_ms"] = round(wall, 1), round(cpu, 1)
            entry[f"{stage}_best_cpu_ms"] = round(samples.best_cpu(f"{bits} stage {stage}"), 1)
        stages.append(entry)
    wall, cpu = samples.median("naive")  # a forward on the kept cache, nothing else
    stages.append(
        {
            "context_tokens": n,
            "bits": None,
            "forward_ms": round(wall, 1),
            "forward_cpu_ms": round(cpu, 1),
            "forward_best_cpu_ms": round(samples.best_cpu("naive"), 1),
        }
    )
    for r in rows:
        print(r, file=sys.stderr)
    return rows, stages


# -- through the daemon -----------------------------------------------------------------------


def _cpu_ms(pid: int) -> float | None:
    """CPU time (user + system) a process has used so far, from /proc; None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def measure_daemon(
    runtime: Runtime, tokens: list[int], question_text: str, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Activations built over REST, then: one first request each, `--repeats` rounds of later
    requests (each round visits every activation), and re-prefill requests last."""
    import httpx

    from benchmarks.daemon import start_daemon

    admin = f"admin-{secrets.token_hex(8)}"
    data_dir = Path(tempfile.mkdtemp(prefix="memos-reuse-daemon-"))
    env = {
        "MEMOS_RUNTIME__THREADS": str(args.threads),
        "MEMOS_ENRICHMENT__ENABLED": "false",
        "MEMOS_EMBEDDER__CACHE_DIR": str(args.model_cache),
        "MEMOS_RUNTIME__CACHE_DIR": str(args.model_cache),
    }
    proc, url = start_daemon(data_dir, admin, env, timeout=600)
    samples = Samples()  # (server ttft_ms, daemon cpu ms) by row
    client_ms: dict[str, list[float]] = defaultdict(list)
    prompt_tokens: dict[str, int] = {}
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}) as c:
            key = c.post("/v1/users", json={"name": "bench"}).json()["api_key"]
        auth = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, headers=auth, timeout=900) as client:
            cube = client.post("/v1/cubes", json={"name": "reuse"}).json()["id"]

            def generate(name: str, body: dict[str, Any]) -> None:
                cpu, started = _cpu_ms(proc.pid), time.perf_counter()
                r = client.post(f"/v1/cubes/{cube}/generate", json={**body, "max_tokens": 1})
                wall, after = (time.perf_counter() - started) * 1000, _cpu_ms(proc.pid)
                assert r.status_code == 200, r.text
                used = after - cpu if after is not None and cpu is not None else float("nan")
                samples.add(name, (r.json()["ttft_ms"], used))
                prompt_tokens[name] = r.json()["prompt_tokens"]
                client_ms[name].append(wall)

            texts = {n: runtime.detokenize(tokens[:n]) for n in args.contexts}
            acts: dict[tuple[int, int], dict[str, Any]] = {}
            for n, text in texts.items():
                for bits in args.bits:
                    act = client.post(
                        f"/v1/cubes/{cube}/activations",
                        json={"text": text, "compression": {"bits": bits}},
                    ).json()
                    while act["state"] == "building":
                        time.sleep(0.5)
                        act = client.get(f"/v1/cubes/{cube}/activations/{act['id']}").json()
                    assert act["state"] == "ready", act
                    acts[n, bits] = act
            for (n, bits), act in acts.items():
                body = {"prompt": question_text, "activation_id": act["id"]}
                generate(f"{n} {bits} first", body)
            for _ in range(args.repeats):
                for (n, bits), act in acts.items():
                    body = {"prompt": question_text, "activation_id": act["id"]}
                    generate(f"{n} {bits} later", body)
            for _ in range(args.prefill_repeats):
                for n, text in texts.items():  # the context travels in the prompt instead
                    generate(f"{n} prefill", {"prompt": f"{text}\n{question_text}"})
    finally:
        proc.terminate()
        proc.wait(60)

    rows: list[dict[str, Any]] = []
    for n in texts:
        prefill_ttft, prefill_cpu = samples.median(f"{n} prefill")
        entries = [(f"{n} prefill", "re-prefill (prompt)", None, None)]
        for bits in args.bits:
            entries += [
                (f"{n} {bits} first", "memosd first request", bits, acts[n, bits]["tokens"]),
                (f"{n} {bits} later", "memosd later requests", bits, acts[n, bits]["tokens"]),
            ]
        for name, label, bits, activation_tokens in entries:
            ttft, cpu = samples.median(name)
            rows.append(
                {
                    "context_tokens": n,
                    "row": label,
                    "bits": bits,
                    "activation_tokens": activation_tokens,
                    "prompt_tokens": prompt_tokens[name],
                    "server_ttft_ms": round(ttft, 1),
                    "client_ms": round(statistics.median(client_ms[name]), 1),
                    "daemon_cpu_ms": round(cpu, 1),
                    "speedup": round(prefill_ttft / ttft, 1),
                    "cpu_speedup": round(prefill_cpu / cpu, 1) if cpu else None,
                    "runs": len(client_ms[name]),
                }
            )
            print(rows[-1], file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data/locomo/locomo_dev.json"))
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 4])
    parser.add_argument("--repeats", type=int, default=7, help="rounds of per-request rows")
    parser.add_argument("--prefill-repeats", type=int, default=3, help="rounds with re-prefill")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's)")
    parser.add_argument("--conversation", type=int, default=0, help="which LoCoMo conversation")
    parser.add_argument("--model-cache", type=Path, help="where the converted model is kept")
    parser.add_argument("--daemon", action="store_true", help="also measure through the daemon")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    if not args.data.exists():
        print(f"skipped: {args.data} not found", file=sys.stderr)
        return
    args.prefill_repeats = min(args.prefill_repeats, args.repeats)
    args.model_cache = args.model_cache or Path(tempfile.gettempdir()) / "memos-bench-models"
    conv = load_locomo(args.data)[args.conversation]
    runtime = Runtime.load(RuntimeConfig(cache_dir=args.model_cache, threads=args.threads))
    tokens = runtime.tokenize(transcript(conv))
    asked = next(q for q in conv.questions if q.evidence)
    question_text = f"Question: {asked.text}\nAnswer:"
    question = runtime.tokenize(f"\n{question_text}")
    rows: list[dict[str, Any]] = []
    stages: list[dict[str, Any]] = []
    for n in args.contexts:
        if n > len(tokens):
            print(f"context {n} skipped: the transcript has {len(tokens)} tokens", file=sys.stderr)
            continue
        more_rows, more_stages = measure_context(runtime, tokens, question, n, args)
        rows += more_rows
        stages += more_stages
    daemon_rows = measure_daemon(runtime, tokens, question_text, args) if args.daemon else []
    load = os.getloadavg()
    settings = {
        "model": runtime.info.name,
        "device": runtime.info.device,
        "dtype": runtime.info.dtype,
        "threads": torch.get_num_threads(),
        "question_tokens": len(question),
        "repeats": args.repeats,
        "prefill_repeats": args.prefill_repeats,
        "conversation": conv.sample_id,
        "cpus": os.cpu_count(),
        "load_average_after": [round(x, 2) for x in load],
    }
    print_table(
        f"Time to first token on a reused context ({settings})",
        [
            ("context", "context_tokens", ">7d"),
            ("row", "row", "<26"),
            ("bits", "bits", ">4d"),
            ("ttft ms", "ttft_ms", ">8.1f"),
            ("speedup", "speedup", ">7.1f"),
            ("cpu ms", "cpu_ms", ">8.1f"),
            ("cpu speedup", "cpu_speedup", ">11.1f"),
            ("best cpu ms", "best_cpu_ms", ">11.1f"),
            ("best cpu speedup", "best_cpu_speedup", ">16.1f"),
            ("same token", "same_token", ">10"),
        ],
        rows,
    )
    print_table(
        "Stages of a memosd request (wall ms / cpu ms, medians); the naive row: its forward",
        [
            ("context", "context_tokens", ">7d"),
            ("bits", "bits", ">4d"),
            ("load", "load_ms", ">7.1f"),
            ("load cpu", "load_cpu_ms", ">8.1f"),
            ("dequantize", "dequantize_ms", ">10.1f"),
            ("dequant cpu", "dequantize_cpu_ms", ">11.1f"),
            ("setup", "setup_ms", ">7.1f"),
            ("setup cpu", "setup_cpu_ms", ">9.1f"),
            ("forward", "forward_ms", ">7.1f"),
            ("forward cpu", "forward_cpu_ms", ">11.1f"),
            ("fwd best cpu", "forward_best_cpu_ms", ">12.1f"),
        ],
        stages,
    )
    if daemon_rows:
        print_table(
            "Through the daemon (POST generate, max_tokens=1; daemon cpu from /proc, 10 ms ticks)",
            [
                ("context", "context_tokens", ">7d"),
                ("row", "row", "<22"),
                ("bits", "bits", ">4d"),
                ("server ttft ms", "server_ttft_ms", ">14.1f"),
                ("client ms", "client_ms", ">9.1f"),
                ("speedup", "speedup", ">7.1f"),
                ("daemon cpu ms", "daemon_cpu_ms", ">13.1f"),
                ("cpu speedup", "cpu_speedup", ">11.1f"),
            ],
            daemon_rows,
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"settings": settings, "rows": rows, "stages": stages, "daemon": daemon_rows},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
