"""Trainer pool scaling: the bulk-edit job with 1, 2, ... trainer actors on the same edits, one run.

Each job starts from an empty store on a local Ray with `--cpus` CPUs; every trainer reserves
`--trainer-cpus` (one torch thread per CPU), so N trainers need N x trainer-cpus free cores to
scale. Edits/min is the job's own clock (stream start to last publish; actor start-up excluded).
After the runs it checks that every pool size published the same snapshot as one trainer
(clusters, members, labels; block weights to float tolerance), so speed never hides a different
result.

    python benchmarks/trainer_pool.py --edits cf.parquet --n 200 --trainers 1,2
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def run_job(config_data: dict, edits: Path, out: Path, trainers: int, trainer_cpus: float) -> dict:
    from melo_ray.config import load_config
    from pipelines.bulk_edit.job import BulkEditJob

    data = json.loads(json.dumps(config_data))
    data["pipeline"] = {**data.get("pipeline", {}), "trainers": trainers, "trainer_cpus": trainer_cpus,
                        "snapshot_every": 5}
    started = time.perf_counter()
    summary = BulkEditJob(load_config(data), str(edits), str(out), f"pool-{trainers}", progress=False).run()
    state = summary.state
    return {"trainers": trainers, "edits": state.edits_applied, "job_seconds": round(state.seconds, 1),
            "wall_seconds": round(time.perf_counter() - started, 1), "edits_per_min": round(state.edits_per_min, 1)}


def same_state(a: Path, b: Path, layers: list[str]) -> bool:
    import safetensors.numpy

    from melo_ray.editors.melo.bank import read_bank
    from melo_ray.store import SnapshotStore

    (ma, fa), (mb, fb) = SnapshotStore(a).read(), SnapshotStore(b).read()
    if json.loads(fa["index.json"])["labels"] != json.loads(fb["index.json"])["labels"]:
        return False
    ia, ib = safetensors.numpy.load(fa["index.safetensors"]), safetensors.numpy.load(fb["index.safetensors"])
    if not all(np.array_equal(ia[k], ib[k]) for k in ("member_blocks", "member_clusters", "alive")):
        return False
    ba, bb = read_bank(fa, layers, "a"), read_bank(fb, layers, "b")
    return all(np.allclose(ba[n][i].numpy(), bb[n][i].numpy(), rtol=1e-3, atol=1e-5) for n in layers for i in (0, 1))


def main() -> None:
    import ray

    from melo_ray.config import load_config
    from melo_ray.records import read_edit_records, write_parquet

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2-135m.yaml"))
    parser.add_argument("--edits", required=True)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--trainers", default="1,2")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--trainer-cpus", type=float, default=1.0)
    parser.add_argument("--gpus", type=int, default=None,
                        help="GPUs Ray may use (default: what it detects; 0: CPU trainers)")
    parser.add_argument("--set", action="append", default=[], help="config override, e.g. backbone.dtype=bfloat16")
    args = parser.parse_args()

    from melo_ray.config import with_overrides

    config = with_overrides(load_config(args.config), args.set)
    ray.init(num_cpus=args.cpus, num_gpus=args.gpus, include_dashboard=False, object_store_memory=512 * 1024 * 1024)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        edits = Path(tmp) / "edits.parquet"
        write_parquet(read_edit_records(args.edits)[: args.n], edits)
        stores = {}
        for n in [int(t) for t in args.trainers.split(",")]:
            stores[n] = Path(tmp) / f"store-{n}"
            row = run_job(config.model_dump(mode="json"), edits, stores[n], n, args.trainer_cpus)
            rows.append(row)
            print(json.dumps(row), flush=True)
        one = rows[0]
        for row in rows:
            row["x_one_trainer"] = round(row["edits_per_min"] / one["edits_per_min"], 2)
            row["efficiency"] = round(row["x_one_trainer"] / (row["trainers"] / one["trainers"]), 2)
            row["same_snapshot_as_first"] = same_state(stores[one["trainers"]], stores[row["trainers"]],
                                                       list(config.section("lora").target_modules))
    ray.shutdown()
    print("| trainers | edits | edits/min | x one trainer | efficiency (x / N) | same snapshot |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['trainers']} | {r['edits']} | {r['edits_per_min']} | {r['x_one_trainer']} | {r['efficiency']} "
              f"| {r['same_snapshot_as_first']} |")


if __name__ == "__main__":
    main()
