"""Bulk-edit job: `python -m pipelines.bulk_edit --config C --edits URI --out URI --job-id ID`.

See melo_ray/pipeline/job.py for how it streams, trains, indexes and commits exactly once."""
import sys

from melo_ray.pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
