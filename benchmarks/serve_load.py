"""Load benchmark of the Serve app on the embedded model: requests/s and p50/p99 latency at several
client concurrencies, and the cost of routing (keys + index + per-row LoRA) against the base model.

    python benchmarks/serve_load.py --snapshots runs/scalability-2000/store --edits /tmp/cf-all.parquet

1. Routing ratio, in this process before Serve starts: ServingEngine.complete on a batch of prompts
   (half edited, half NQ-open questions) routed, against the same batch with routing off (base), both
   generating exactly max_new_tokens per row (end-of-sequence held off) so the work compared is the
   same. Median of --repeats, routed and base alternating.
2. HTTP load: one replica (all CPUs), @serve.batch up to 32; C client threads each send single-prompt
   /v1/generate requests back to back for --seconds; latency per request, requests/s overall.
Prints one JSON line per measurement, then a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from melo_ray.records import read_edit_records
from melo_ray.serving.engine import CompletionRequest, ServingEngine

ROOT = Path(__file__).resolve().parent.parent
NQ = ROOT.parent / "shared" / "data" / "nq-open" / "NQ-open.dev.jsonl"


def prompts_mix(edits: Path | None, n: int) -> list[str]:
    edited = [r.prompt for r in read_edit_records(edits)][:n] if edits else []
    nq = [json.loads(line)["question"] for line in NQ.read_text().splitlines()[:n]] if NQ.is_file() else []
    mixed = [p for pair in zip(edited, nq) for p in pair] or edited or nq
    return mixed[:n] if len(mixed) >= n else (mixed * (n // max(1, len(mixed)) + 1))[:n]


def routing_ratio(engine: ServingEngine, prompts: list[str], batch: int, max_new: int, repeats: int) -> dict:
    requests = [CompletionRequest(p, max_new, min_new_tokens=max_new) for p in prompts[:batch]]  # same tokens either way
    engine.complete(requests[:2])  # warm up
    times = {"routed": [], "base": []}
    for _ in range(repeats):
        for mode in ("routed", "base"):
            started = time.perf_counter()
            out = engine.complete(requests, base=(mode == "base"))
            times[mode].append(time.perf_counter() - started)
    routed_blocks = sum(1 for c in engine.complete(requests[: min(batch, 8)]) if c.block is not None)
    routed, base = statistics.median(times["routed"]), statistics.median(times["base"])
    del out
    return {"measurement": "routing_ratio", "batch": batch, "max_new_tokens": max_new, "routed_s": routed,
            "base_s": base, "ratio": routed / base, "rows_with_a_block_in_first_8": routed_blocks}


def load(port: int, prompts: list[str], concurrency: int, seconds: float, max_new: int) -> dict:
    latencies: list[float] = []
    failures: list[str] = []
    stop = time.perf_counter() + seconds

    def client(offset: int) -> None:
        i = offset
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as http:
            while time.perf_counter() < stop:
                body = {"prompts": [prompts[i % len(prompts)]], "max_new_tokens": max_new}
                started = time.perf_counter()
                response = http.post("/v1/generate", json=body)
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures.append(response.text)
                i += concurrency

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"measurement": "http_load", "concurrency": concurrency, "requests": len(latencies),
            "failures": len(failures), "requests_per_s": len(latencies) / wall,
            "p50_ms": float(np.percentile(latencies, 50) * 1000), "p99_ms": float(np.percentile(latencies, 99) * 1000)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snapshots", required=True, help="snapshot store root or folder")
    parser.add_argument("--edits", type=Path, default=None, help="the edit file behind the snapshot (prompts)")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--ratio-batches", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--ratio-only", action="store_true", help="skip the HTTP load")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--replica-cpus", type=float, default=None, help="default: all CPUs / replicas")
    args = parser.parse_args()

    from melo_ray.store import read_any_snapshot

    manifest, files, where = read_any_snapshot(args.snapshots)
    engine = ServingEngine.from_snapshot(manifest, files)
    prompts = prompts_mix(args.edits, 256)
    rows = []
    for batch in (int(b) for b in args.ratio_batches.split(",")):
        row = routing_ratio(engine, prompts, batch, args.max_new_tokens, args.repeats)
        rows.append(row)
        print(json.dumps(row), flush=True)
    del engine
    if args.ratio_only:
        for r in rows:
            print(f"| {r['batch']} | {r['routed_s']:.3f} | {r['base_s']:.3f} | {r['ratio']:.3f} |")
        return

    import ray

    from melo_ray.serving.app import ServeSettings, run_http

    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, object_store_memory=256 * 1024 * 1024)
    cpus = args.replica_cpus if args.replica_cpus is not None else (os.cpu_count() or 2) / args.replicas
    settings = ServeSettings(snapshots=args.snapshots, replicas=args.replicas, replica_cpus=cpus,
                             max_batch_size=32, max_prompts=32)
    run_http(settings, port=args.port, blocking=False)
    load(args.port, prompts, 2, 5, args.max_new_tokens)  # warm up
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        row = load(args.port, prompts, concurrency, args.seconds, args.max_new_tokens)
        rows.append(row)
        print(json.dumps(row), flush=True)
    ray.shutdown()

    print(f"\nsnapshot: {where} ({manifest['stats']['edits']} edits), max_new_tokens {args.max_new_tokens}")
    print("| batch | routed s | base s | routed / base |\n|---|---|---|---|")
    for r in rows:
        if r["measurement"] == "routing_ratio":
            print(f"| {r['batch']} | {r['routed_s']:.3f} | {r['base_s']:.3f} | {r['ratio']:.3f} |")
    print("\n| concurrency | requests/s | p50 ms | p99 ms | failed |\n|---|---|---|---|---|")
    for r in rows:
        if r["measurement"] == "http_load":
            print(f"| {r['concurrency']} | {r['requests_per_s']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['failures']} |")


if __name__ == "__main__":
    main()
