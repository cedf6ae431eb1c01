"""The hot paths a large LoRA bank exposes, each against the naive way, in one run.

1. Commit: appending a block to a bank of B blocks. Naive: `torch.cat` (copies the whole bank each
   time, so a job is quadratic in its length); ours: `GrowingRows` (a spare buffer that doubles).
2. Publish: writing a snapshot of a B-block bank after one more block. Naive: every file written
   again; ours: the bank in 64-block segments and the store reusing unchanged files.

Shapes are the embedded SmolLM2-135M's (4 down-projections, rank 8, 1536 -> 576).

    python benchmarks/bank_hot_paths.py --blocks 1000
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from melo_ray.editors.melo.bank import GrowingRows, bank_files
from melo_ray.store import SnapshotStore

LAYERS, RANK, IN, OUT = 4, 8, 1536, 576


def commit_seconds(blocks: int, grow: bool) -> float:
    """Seconds to append `blocks` blocks one by one to every layer's bank."""
    banks = [(torch.zeros(0, RANK, IN), torch.zeros(0, OUT, RANK)) for _ in range(LAYERS)]
    growers = [(GrowingRows(), GrowingRows()) for _ in range(LAYERS)]
    a_block, b_block = torch.randn(1, RANK, IN), torch.randn(1, OUT, RANK)
    started = time.perf_counter()
    for _ in range(blocks):
        for i, (a, b) in enumerate(banks):
            if grow:
                banks[i] = (growers[i][0].append(a, a_block), growers[i][1].append(b, b_block))
            else:
                banks[i] = (torch.cat([a, a_block]), torch.cat([b, b_block]))
    return time.perf_counter() - started


def publish_cost(blocks: int, segmented: bool) -> dict[str, float]:
    """Seconds and bytes written to publish version 2 (one block more than version 1)."""
    torch.manual_seed(0)
    bank = {f"layer{i}": (torch.randn(blocks + 1, RANK, IN), torch.randn(blocks + 1, OUT, RANK)) for i in range(LAYERS)}

    def files(n: int) -> dict[str, bytes]:
        cut = {k: (a[:n], b[:n]) for k, (a, b) in bank.items()}
        if segmented:
            return bank_files(cut)
        import safetensors.torch

        flat = {f"{k}.{p}": t.contiguous() for k, pair in cut.items() for p, t in zip("AB", pair)}
        return {"adapters.safetensors": safetensors.torch.save(flat)}

    with tempfile.TemporaryDirectory() as tmp:
        store = SnapshotStore(Path(tmp) / "store")
        store.publish(1, files(blocks), {"version": 1})
        second = files(blocks + 1)
        started = time.perf_counter()
        store.publish(2, second, {"version": 2})
        seconds = time.perf_counter() - started
        first, new = store.local_folder(1), store.local_folder(2)
        written = sum(p.stat().st_size for p in new.iterdir()
                      if not (first / p.name).exists() or (first / p.name).stat().st_ino != p.stat().st_ino)
    return {"publish_s": seconds, "written_mb": written / 2**20, "snapshot_mb": sum(map(len, second.values())) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=1000)
    args = parser.parse_args()
    rows = []
    naive, ours = commit_seconds(args.blocks, grow=False), commit_seconds(args.blocks, grow=True)
    rows.append({"path": f"commit {args.blocks} blocks", "naive_s": naive, "ours_s": ours, "x_naive": naive / ours})
    full, incremental = publish_cost(args.blocks, segmented=False), publish_cost(args.blocks, segmented=True)
    rows.append({"path": f"publish after block {args.blocks + 1}", "naive_s": full["publish_s"],
                 "ours_s": incremental["publish_s"], "x_naive": full["publish_s"] / incremental["publish_s"],
                 "naive_written_mb": full["written_mb"], "ours_written_mb": incremental["written_mb"],
                 "snapshot_mb": incremental["snapshot_mb"]})
    for row in rows:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))


if __name__ == "__main__":
    main()
