"""Command line of the bulk-edit job: `python -m pipelines.bulk_edit` and `melo-ray job bulk-edit`."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from melo_ray.config import ConfigError, load_config, with_overrides
from melo_ray.editors.registry import editor_names
from melo_ray.records import RecordError
from melo_ray.snapshots import SnapshotError
from pipelines.bulk_edit.job import BulkEditJob, JobError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="editor YAML (its `pipeline` section tunes the job)")
    parser.add_argument("--edits", required=True, help="Parquet file or folder: a local path or a pyarrow.fs URI")
    parser.add_argument("--out", required=True, help="snapshot store root (local path or URI); job state and rejects live here")
    parser.add_argument("--job-id", required=True, help="run the same id again to resume it")
    parser.add_argument("--editor", choices=editor_names(), help="override the config's `editor`")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. pipeline.trainers=4 (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    config = with_overrides(load_config(args.config), args.set)
    if args.editor:
        config = config.model_copy(update={"editor": args.editor})
    job = BulkEditJob(config, args.edits, args.out, args.job_id, progress=not args.quiet)
    summary = job.run()
    state = summary.state
    print(json.dumps({
        "job_id": state.job_id, "status": state.status, "edits_applied": state.edits_applied,
        "rejected": state.rejected, "rejects": summary.rejects_path, "snapshot_version": summary.snapshot_version,
        "editor": job.config.editor,
        "stats": summary.stats, "recoveries": state.recoveries,
        "edits_per_min": round(state.edits_per_min, 1), "mlflow_run_id": state.mlflow_run_id,
    }))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bulk_edit", description="Bulk-edit job on Ray.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (ConfigError, RecordError, SnapshotError, JobError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
