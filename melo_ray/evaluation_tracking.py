"""Log an evaluation's results to MLflow: one parent run per results folder (the data set, T and the
command's settings), one child run per editor (every final metric, speed,
peak memory and size as metrics; the curve as steps). The parent holds the whole config as it ran,
every editor's section included, and the results files as artifacts. The same function logs a run just
finished (`melo-ray eval --mlflow-experiment`) and folders written earlier
(`melo-ray eval-log <folder>... --experiment NAME`), so the peer table can be
gathered in one experiment however its rows were produced."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from melo_ray.evaluation import METRIC_NAMES, PPL_NAMES, RESULT_FILES

# numeric row fields logged as metrics beside the quality metrics
SPEED_AND_SIZE = ("edits_per_min", "edit_seconds", "extra_parameters", "peak_rss_gb")


def default_tracking_uri(results_dir: Path) -> str:
    """MLFLOW_TRACKING_URI when set, else a sqlite file beside the results."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{results_dir.resolve()}/mlflow.db"


def _artifact_location(uri: str) -> str | None:
    """Beside a local sqlite database (MLflow's default would be ./mlruns under whatever the working
    directory is); a tracking server keeps its own default."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()


def _metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The row's finite numbers; a metric the data cannot give (None or NaN) is left out, not logged as 0."""
    out = {}
    for name in (*METRIC_NAMES, *PPL_NAMES, *SPEED_AND_SIZE):
        value = row.get(name)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[name] = float(value)
    return out


def flatten_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow parameters: dotted names, values as text within MLflow's length cap."""
    out: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(flatten_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:5000]
    return out


def _log_params(mlflow: Any, params: Mapping[str, str]) -> None:
    items = list(params.items())
    for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters per call
        mlflow.log_params(dict(items[start : start + 100]))


def log_results(results_dir: Path, experiment: str, tracking_uri: str | None = None) -> list[str]:
    """Log `results_dir/results.json` (as `write_results` writes it); returns the editor runs' ids. The
    config as it ran (`meta.resolved_config`; absent in results written before it was kept) is logged
    flat on the parent run."""
    import mlflow

    results_path = results_dir / "results.json"
    try:
        results = json.loads(results_path.read_text())
        meta, rows = results["meta"], results["editors"]
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{results_path}: not an evaluation's results ({exc})") from exc
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    uri = tracking_uri or default_tracking_uri(results_dir)
    mlflow.set_tracking_uri(uri)
    try:
        found = mlflow.get_experiment_by_name(experiment)
        experiment_id = (found.experiment_id if found
                         else mlflow.create_experiment(experiment, artifact_location=_artifact_location(uri)))
        data = Path(str(meta.get("data"))).stem
        run_ids = []
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"{data} T={meta.get('n_edits')}"):
            config = meta.get("resolved_config") or {}
            settings = {k: v for k, v in meta.items() if k != "resolved_config"}
            _log_params(mlflow, {**flatten_params(settings, "eval."), **flatten_params(config, "config.")})
            for name in RESULT_FILES:
                if (results_dir / name).is_file():
                    mlflow.log_artifact(str(results_dir / name))
            for row in rows:
                with mlflow.start_run(experiment_id=experiment_id, run_name=f"{row['editor']} {data} T={row['edits']}",
                                      nested=True) as child:
                    mlflow.log_params({"editor": str(row["editor"]), "edits": str(row["edits"])})
                    for point in row.get("curve", [])[:-1]:  # the last point is the final metrics below
                        mlflow.log_metrics(_metrics(point), step=int(point["edits"]))
                    mlflow.log_metrics(_metrics(row), step=int(row["edits"]))
                    run_ids.append(child.info.run_id)
        return run_ids
    finally:  # set_tracking_uri exports the variable; leave the process as it was
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous

