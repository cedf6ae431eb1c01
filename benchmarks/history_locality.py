"""Neighbour and same-subject locality over the whole history of a published snapshot, every probe of
every edit instead of a sample (`evaluation.history_locality`).

    OMP_NUM_THREADS=1 python benchmarks/history_locality.py --config configs/smollm2-135m.yaml \
        --store runs/scale10k_names/store --edits runs/scale10k_names/edits-10000.parquet

The history is the first `rows_done` records of --edits (the job's stream) as the snapshot's manifest
records them. Only the probes the index routes to an edit are generated both ways; `unrouted_changed`
reports the check on a random sample of the others (0: they ran on the exact base model). `--generality`
adds generality over every edit's first rephrasing (`evaluation.generality_split`).
"""
from __future__ import annotations

import argparse
import json
import logging
import time

from melo_ray.config import load_config
from melo_ray.editors.melo.editor import MeloEditor
from melo_ray.evaluation import generality_split, history_locality
from melo_ray.records import read_edit_records
from melo_ray.store import open_snapshots


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smollm2-135m.yaml")
    parser.add_argument("--store", required=True, help="a snapshot store, or one published snapshot folder")
    parser.add_argument("--edits", required=True, help="the job's stream of edit records")
    parser.add_argument("--version", type=int, default=None, help="default: the latest")
    parser.add_argument("--check", type=int, default=256, help="probes of each kind generated both ways as a check")
    parser.add_argument("--locality", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-locality: generality alone (with --generality), e.g. where the job measured locality")
    parser.add_argument("--generality", action="store_true",
                        help="also generality over every edit's first rephrasing (one generation per edit)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = load_config(args.config)
    manifest, files = open_snapshots(args.store).read(args.version)
    version = int(manifest["version"])
    history = read_edit_records(args.edits)[: int(manifest["job"]["rows_done"])]
    editor = MeloEditor(config)
    editor.restore_files(manifest, files, f"v{version}")
    started = time.perf_counter()
    result = history_locality(editor, history, config.generate.max_new_tokens, check=args.check) if args.locality else {}
    if args.generality:
        result.update({f"{k}_all": v for k, v in generality_split(editor, history).items()})
    print(json.dumps({"version": version, "history": len(history), "edits": manifest["stats"]["edits"],
                      **result, "seconds": round(time.perf_counter() - started, 1)}, indent=2))


if __name__ == "__main__":
    main()
