"""The bulk-edit job: a Ray Data stream of edit records -> trainer actors (a pool for MELO) -> the
writer actor (the single writer) -> versioned snapshots, exactly once and resumable.

`job.py` the driver, `actors.py` the trainer and writer actors and their typed messages, `source.py` the
edit stream, `tracking.py` MLflow, `cli.py` the command line (`python -m pipelines.bulk_edit`).
"""
