"""Neuron-index search at 10k and 100k keys: our HNSW path against exact search, on real keys.

Keys are SmolLM2's layer-6 hidden states (the last_token key function's space, 576-d, L2) at every
token position of CounterFact prompts, rephrasings and neighbourhood prompts: a causal model's state at
position t is exactly the last-token key of the prompt's first t tokens, so one forward pass per text
gives many real keys. Each indexed key is its own cluster (the worst case for search). Queries are
keys from texts that are not in the index.

    python benchmarks/index_search.py --sizes 10000,100000 --keys-cache runs/index-keys.npz

Computing the keys takes minutes; --keys-cache keeps them (numpy .npz, arrays only) for reruns.

Per size: latency per query of NeuronIndex.search (HNSW top-`candidates` + exact re-check) one query
at a time and in a batch of 1000, the naive exact scan over every centre (numpy), and recall@1: our
nearest centre is the exact nearest one.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from melo_ray.backbones import load_backbone
from melo_ray.config import load_config
from melo_ray.editors.melo.scope.index import NeuronIndex, distances

ROOT = Path(__file__).resolve().parent.parent
CF = ROOT.parent / "shared" / "data" / "counterfact-mend-splits"


def texts() -> list[str]:
    out: list[str] = []
    for name in ("counterfact-edit.json", "counterfact-train.json"):
        for record in json.loads((CF / name).read_text()):
            out += [record.get("prompt", ""), record.get("rephrase_prompt", ""), record.get("locality_prompt", "")]
    seen: set[str] = set()
    return [t for t in out if t and not (t in seen or seen.add(t))]


class _Stop(Exception):
    pass


@torch.no_grad()
def prefix_keys(config_path: Path, sentences: list[str], want: int, layer: int = 6, min_pos: int = 3) -> np.ndarray:
    backbone = load_backbone(load_config(config_path).backbone)
    model, tok = backbone.model, backbone.tokenizer
    captured = {}

    def hook(_module, _inputs, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handle = model.model.layers[layer].register_forward_hook(hook)
    keys: list[np.ndarray] = []
    total = 0
    try:
        for start in range(0, len(sentences), 64):
            batch = tok(sentences[start : start + 64], return_tensors="pt", padding=True, padding_side="right")
            try:
                model(**batch)
            except _Stop:
                pass
            h, mask = captured["h"], batch["attention_mask"].bool()
            mask[:, :min_pos] = False  # very short prefixes are nearly identical across texts
            rows = h[mask].float().numpy()
            keys.append(rows)
            total += len(rows)
            if total >= want:
                break
    finally:
        handle.remove()
    out = np.concatenate(keys)[:want]
    return np.unique(out.round(4), axis=0).astype(np.float32)


def build_index(keys: np.ndarray, ef_search: int, candidates: int, m: int) -> NeuronIndex:
    n, dim = keys.shape
    arrays = {
        "centres": keys, "radii": np.full(n, 1.0), "alive": np.ones(n, np.uint8), "member_keys": keys,
        "member_blocks": np.arange(n), "member_clusters": np.arange(n),
    }
    meta = {"dim": dim, "metric": "l2", "r_init": 1.0, "candidates": candidates,
            "hnsw": {"M": m, "ef_construction": 200, "ef_search": ef_search},
            "labels": [str(i) for i in range(n)], "member_ids": [str(i) for i in range(n)],
            "conflicts": 0, "forgotten": 0}
    return NeuronIndex.from_state(arrays, meta)


def measure(keys: np.ndarray, queries: np.ndarray, size: int, ef_search: int, candidates: int, m: int,
            index: NeuronIndex | None = None) -> tuple[dict, NeuronIndex]:
    started = time.perf_counter()
    built = index is None
    if index is None:
        index = build_index(keys[:size], ef_search, candidates, m)
    else:  # same graph, another ef: only the query-time setting changes
        index._graph.set_ef(ef_search)
        index.hnsw_params["ef_search"] = ef_search
    build_s = time.perf_counter() - started if built else None
    centres = keys[:size]
    started = time.perf_counter()
    exact = np.array([distances("l2", q[None], centres)[0].argmin() for q in queries])
    exact_ms = (time.perf_counter() - started) * 1000 / len(queries)
    started = time.perf_counter()
    single = [index.search(q[None]).clusters[0] for q in queries]
    single_ms = (time.perf_counter() - started) * 1000 / len(queries)
    started = time.perf_counter()
    batched = index.search(queries).clusters
    batched_ms = (time.perf_counter() - started) * 1000 / len(queries)
    exact_d = np.linalg.norm(centres[exact] - queries, axis=1)
    ours_d = np.linalg.norm(centres[np.asarray(single)] - queries, axis=1)
    recall = float(np.mean(ours_d <= exact_d + 1e-4))  # ties count as found
    return {"measurement": "index_search", "keys": size, "dim": int(keys.shape[1]), "M": m, "ef_search": ef_search,
            "candidates": candidates, "build_s": build_s, "ms_per_query_single": single_ms,
            "ms_per_query_batched": batched_ms, "ms_per_query_exact": exact_ms,
            "speedup_vs_exact_single": exact_ms / single_ms, "recall_at_1": recall,
            "batched_matches_single": bool(np.array_equal(batched, np.asarray(single)))}, index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "smollm2-135m-last-token.yaml")
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--ef", default="64,128,256")
    parser.add_argument("--m", default="16,32", help="hnswlib M (graph degree) values")
    parser.add_argument("--keys-cache", type=Path, help="load keys from / save them to this .npz")
    parser.add_argument("--candidates", type=int, default=8)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    sentences = texts()
    held_out = sentences[-2000:]  # queries come from texts whose keys are not indexed
    started = time.perf_counter()
    if args.keys_cache and args.keys_cache.exists():
        with np.load(args.keys_cache, allow_pickle=False) as cached:
            keys, queries = cached["keys"], cached["queries"]
    else:
        # many texts share their first words (identical prefix states), so ask for more before de-duplicating
        keys = prefix_keys(args.config, sentences[:-2000], int(max(sizes) * 1.6))
        queries = prefix_keys(args.config, held_out, args.queries * 3)
        if args.keys_cache:
            args.keys_cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(args.keys_cache, keys=keys, queries=queries)
    queries = queries[np.random.default_rng(0).choice(len(queries), args.queries, replace=False)]
    print(json.dumps({"measurement": "keys", "keys": len(keys), "queries": len(queries),
                      "seconds": time.perf_counter() - started}), flush=True)
    if len(keys) < max(sizes):
        raise SystemExit(f"only {len(keys)} distinct keys; lower --sizes")
    rng = np.random.default_rng(1)
    keys = keys[rng.permutation(len(keys))]
    rows = []
    for size in sizes:
        for m in (int(v) for v in args.m.split(",")):
            index = None
            for ef in (int(e) for e in args.ef.split(",")):
                row, index = measure(keys, queries, size, ef, args.candidates, m, index)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| keys | M | ef | ours ms/query (1 at a time) | ours ms/query (batch 1000) | exact ms/query | speed-up | recall@1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['keys']:,} | {r['M']} | {r['ef_search']} | {r['ms_per_query_single']:.3f} | {r['ms_per_query_batched']:.3f} | "
              f"{r['ms_per_query_exact']:.2f} | {r['speedup_vs_exact_single']:.1f}x | {r['recall_at_1']:.3f} |")


if __name__ == "__main__":
    main()
