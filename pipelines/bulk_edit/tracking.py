"""MLflow tracking for a bulk-edit job: one run per job id, resumed with the job."""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from melo_ray.config import EditorConfig
from melo_ray.evaluation_tracking import flatten_params
from melo_ray.store import SnapshotStore

log = logging.getLogger(__name__)


def tracking_uri(config: EditorConfig, store: SnapshotStore) -> str:
    """Config, then MLFLOW_TRACKING_URI, then a sqlite file beside the job's output."""
    if config.pipeline.mlflow_tracking_uri:
        return config.pipeline.mlflow_tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = store.root if store.is_local else os.path.abspath(".")
    os.makedirs(root, exist_ok=True)
    return f"sqlite:///{root}/mlflow.db"


class JobTracker:
    """Thin wrapper so the job's code says what it logs, not how."""

    def __init__(self, config: EditorConfig, store: SnapshotStore, job_id: str, run_id: str | None) -> None:
        import mlflow

        self.mlflow = mlflow
        # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI; put it back when the job ends so a
        # later job in this process does not inherit our default
        self._previous_env = os.environ.get("MLFLOW_TRACKING_URI")
        self.uri = tracking_uri(config, store)
        mlflow.set_tracking_uri(self.uri)
        experiment = mlflow.get_experiment_by_name(config.pipeline.mlflow_experiment)
        if experiment is None:
            artifacts = f"{store.root}/mlartifacts" if store.is_local else f"{store.uri.rstrip('/')}/mlartifacts"
            experiment_id = mlflow.create_experiment(config.pipeline.mlflow_experiment, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        if run_id is not None:
            self.run = mlflow.start_run(run_id=run_id)
            log.info("resumed MLflow run %s", run_id)
        else:
            self.run = mlflow.start_run(experiment_id=experiment_id, run_name=job_id, tags={"melo_ray.job_id": job_id})
            mlflow.log_params(flatten_params(config.model_dump(mode="json")))
        self.run_id = self.run.info.run_id
        self.client = mlflow.tracking.MlflowClient(tracking_uri=self.uri)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.mlflow.log_params({k: str(v) for k, v in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        # by run id through the client: the job logs from its publisher thread, and mlflow's fluent
        # API keeps the active run per thread
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        self.mlflow.log_dict(dict(data), name)

    def log_metric_plots(self, keys: Sequence[str], name: str) -> None:
        """One panel per metric of this run (its history by step), as the artifact `name`. Drawn here,
        from what MLflow recorded, so the job's driver never touches matplotlib."""
        series = {}
        for key in keys:
            history = self.client.get_metric_history(self.run_id, key)
            if history:
                series[key] = sorted((m.step, m.value) for m in history)
        if not series:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3))
        axes = [axes] if len(series) == 1 else list(axes)
        for ax, (key, points) in zip(axes, series.items()):
            ax.plot([p[0] for p in points], [p[1] for p in points])
            ax.set_title(key)
            ax.set_xlabel("snapshot version (blocks)")
        figure.tight_layout()
        try:
            self.mlflow.log_figure(figure, name)
        finally:
            plt.close(figure)

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)
        if self._previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = self._previous_env
