"""Scalability run: one MLflow-tracked bulk-edit job over N CounterFact edits, measured at checkpoints.

    python -m pipelines.scalability --config configs/smollm2-135m.yaml --edits cf.parquet \
        --sizes 500,1000,2000 --out runs/scalability

At each checkpoint (edits applied = a size in --sizes) it logs, to the job's MLflow run with the
number of edits as the step: edits/min over the segment and overall (checkpoint evaluation time
excluded), index size (members, clusters), index search latency (HNSW and exact, per query, on real
keys from the index) and recall@1 of HNSW against exact, the trainers' and the writer's peak memory, a replica's memory
(this process with the snapshot loaded), snapshot size and publish time, and reliability /
generality / every locality kind on a sample of the edits applied so far, and neighbour and same-subject
locality over every probe of the whole history (`evaluation.history_locality`; `--no-history-locality`
leaves it out). It writes scalability.json,
scalability.md and scalability.png under --out and logs the figure to the run.
On a KubeRay cluster the same command runs as a RayJob entrypoint (see k8s/README.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from melo_ray.config import load_config
from melo_ray.editors.melo.block_index import BlockIndex
from melo_ray.editors.melo.editor import MeloEditor
from melo_ray.evaluation import base_outputs, history_locality, measure
from melo_ray.editors.melo.scope.index import distances
from pipelines.bulk_edit.job import BulkEditJob
from melo_ray.records import read_edit_records, write_parquet
from pipelines.bulk_edit.tracking import tracking_uri

log = logging.getLogger("pipelines.scalability")
ROOT = Path(__file__).resolve().parent.parent
NQ = ROOT.parent / "shared" / "data" / "nq-open" / "NQ-open.dev.jsonl"


QUALITY = ("reliability", "generality", "generality_latest", "locality_nq", "locality_neighbours", "locality_subject")
HISTORY = ("locality_neighbours_all", "locality_subject_all", "unrouted_changed")  # over the whole history


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def search_latency(index: Any, queries: np.ndarray) -> dict[str, float]:
    """Per-query latency of the index's search (HNSW + exact re-check) and of exact search over all
    centres (the naive way), and recall@1: HNSW's nearest centre is the exact nearest one."""
    started = time.perf_counter()
    result = index.search(queries)
    hnsw_ms = (time.perf_counter() - started) * 1000 / len(queries)
    alive = np.array([c.alive for c in index.clusters])
    centres = np.stack([c.centre for c in index.clusters])[alive]
    started = time.perf_counter()
    routing = queries[:, : index.route_dim]  # clusters are searched on the routing view alone
    exact = np.array([distances(index.metric, query[None], centres).min() for query in routing])
    exact_ms = (time.perf_counter() - started) * 1000 / len(queries)
    recall = float(np.mean(np.abs(result.distances - exact) <= 1e-5))
    return {"search_ms_hnsw": hnsw_ms, "search_ms_exact": exact_ms, "search_recall_at_1": recall}


class Checkpoints:
    """The job's on_commit hook: measures at each size once it has been reached."""

    def __init__(self, sizes: list[int], records: list, nq: list[str], sample: int, evaluator: MeloEditor,
                 whole_history: bool = True) -> None:
        self.sizes = sorted(sizes)
        self.whole_history = whole_history
        self.records = records
        self.nq = nq
        self.sample = sample
        self.evaluator = evaluator
        self.rows: list[dict[str, Any]] = []
        self.paused = 0.0  # seconds spent measuring, excluded from edits/min
        self.last = (0, 0.0)
        self.max_new = evaluator.config.generate.max_new_tokens
        self.baseline = base_outputs(evaluator, [], nq, self.max_new)

    def __call__(self, job: BulkEditJob, version: int) -> None:
        manifest = job.store.read_manifest(version)
        edits = int(manifest["stats"]["edits"])
        # sizes count stream records: a record superseded inside its batch (same prompt) is read but
        # not counted as an edit, so the last size may never be reached in edits
        rows = int(manifest["job"]["rows_done"])
        due = [s for s in self.sizes if s <= rows and all(r["size"] != s for r in self.rows)]
        if not due:
            return
        import ray

        pause_start = time.perf_counter()
        last_edits, last_wall = self.last
        wall = job.state.seconds - self.paused  # the job's own clock (stream start on), minus our pauses
        segment = wall - last_wall
        manifest, files = job.store.read(version)
        index = BlockIndex.from_files(self.evaluator.config, self.evaluator.key_dim(), files, f"v{version}").index
        keys = np.asarray(np.stack([k for c in index.clusters for k in c.member_keys]), np.float32)
        rng = np.random.default_rng(0)
        queries = keys[rng.choice(len(keys), size=min(1000, len(keys)), replace=False)]
        self.evaluator.restore_files(manifest, files, f"v{version}")
        applied = self.records[:rows]
        step = max(1, len(applied) // self.sample)
        sample = applied[::step][: self.sample]  # spread over the whole history, oldest edits included
        probes = base_outputs(self.evaluator, sample, [], self.max_new)
        baseline = dataclasses.replace(self.baseline, neighbours=probes.neighbours, subject=probes.subject,
                                       nq_probes=probes.nq_probes)
        quality = measure(self.evaluator, sample, self.nq, baseline, self.max_new, history=applied)
        if self.whole_history:
            quality.update(history_locality(self.evaluator, applied, self.max_new))
        trainers = [ray.get(t.info.remote()) for t in job.actors.trainers]
        writer_rss = ray.get(job.actors.writer.peak_rss_bytes.remote()) if job.actors.writer is not None else 0
        row = {
            "size": due[-1], "edits": edits, "version": version,
            "edits_per_min": edits / (wall / 60),
            "segment_edits_per_min": (edits - last_edits) / (segment / 60),
            "index_members": int(manifest["stats"]["members"]), "clusters": int(manifest["stats"]["clusters"]),
            "snapshot_mb": sum(f["bytes"] for f in manifest["files"].values()) / 2**20,
            "publish_s": job.last_publish_seconds,
            "trainer_peak_rss_mb": max(t.peak_rss_bytes for t in trainers) / 2**20,
            "writer_peak_rss_mb": writer_rss / 2**20,
            # a replica holds what this process holds for evaluation: the model plus the restored snapshot
            "replica_rss_mb": _rss_bytes() / 2**20,
            **search_latency(index, queries),
            **{k: quality[k] for k in (*QUALITY, *HISTORY) if k in quality},
        }
        for size in due:
            self.rows.append({**row, "size": size})
        job.tracker.log_metrics({f"checkpoint_{k}": v for k, v in row.items() if k not in ("size", "version")},
                                step=edits)
        log.info("checkpoint %s", json.dumps(row))
        self.paused += time.perf_counter() - pause_start
        self.last = (edits, wall)


def figure(rows: list[dict[str, Any]], path: Path) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["edits"] for r in rows]
    panels = [
        ("edits/min", ["edits_per_min", "segment_edits_per_min"]),
        ("index size", ["index_members", "clusters"]),
        ("search ms / query", ["search_ms_hnsw", "search_ms_exact"]),
        ("memory (MiB)", ["trainer_peak_rss_mb", "writer_peak_rss_mb", "replica_rss_mb"]),
        ("snapshot", ["snapshot_mb", "publish_s"]),
        ("quality (sample)", list(QUALITY)),
        ("locality, whole history", [k for k in HISTORY[:2] if k in rows[0]]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            ax.plot(x, [r[key] for r in rows], marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("edits applied")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2-135m.yaml"))
    parser.add_argument("--edits", required=True, help="edit records (Parquet/JSONL), e.g. converted CounterFact")
    parser.add_argument("--sizes", default="1000,2000,5000,10000")
    parser.add_argument("--out", required=True)
    parser.add_argument("--job-id", default=None, help="default: scale-<largest size>; rerun to resume")
    parser.add_argument("--sample", type=int, default=50, help="edits sampled for quality at each checkpoint")
    parser.add_argument("--n-locality", type=int, default=50)
    parser.add_argument("--snapshot-every", type=int, default=10, help="batches per published snapshot")
    parser.add_argument("--trainers", type=int, default=1, help="trainer actors (pipeline.trainers)")
    parser.add_argument("--history-locality", action=argparse.BooleanOptionalAction, default=True,
                        help="neighbour and same-subject locality over every probe of the history at each size")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    sizes = sorted(int(s) for s in args.sizes.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = read_edit_records(args.edits)[: sizes[-1]]
    if len(records) < sizes[-1]:
        parser.error(f"--edits has {len(records)} records, fewer than the largest size {sizes[-1]}")
    stream = out / f"edits-{sizes[-1]}.parquet"
    if not stream.exists():
        write_parquet(records, stream)
    data = load_config(args.config).model_dump(mode="json")
    data["pipeline"] = {**data["pipeline"], "snapshot_every": args.snapshot_every, "trainers": args.trainers}
    config = load_config(data)
    nq = []
    if NQ.is_file():
        nq = [json.loads(line)["question"] for line in NQ.read_text().splitlines()[: args.n_locality]]
    evaluator = MeloEditor(config)
    checkpoints = Checkpoints(sizes, records, nq, args.sample, evaluator, args.history_locality)
    job = BulkEditJob(config, str(stream), str(out / "store"), args.job_id or f"scale-{sizes[-1]}",
                      on_commit=checkpoints)
    summary = job.run()
    rows = checkpoints.rows
    (out / "scalability.json").write_text(json.dumps({"rows": rows, "job": summary.state.__dict__}, indent=2))
    header = ["size", "edits_per_min", "segment_edits_per_min", "index_members", "clusters", "search_ms_hnsw",
              "search_ms_exact", "search_recall_at_1", "trainer_peak_rss_mb", "writer_peak_rss_mb",
              "replica_rss_mb", "snapshot_mb", "publish_s", *QUALITY, *(HISTORY if args.history_locality else ())]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k])
                                       for k in header) + " |")
    (out / "scalability.md").write_text("\n".join(lines) + "\n")
    if rows:
        fig = figure(rows, out / "scalability.png")
        import mlflow

        with _reopen(job, summary):
            mlflow.log_figure(fig, "scalability.png")
            mlflow.log_dict({"rows": rows}, "scalability.json")
    print("\n".join(lines))
    return 0


def _reopen(job: BulkEditJob, summary: Any) -> Any:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(job.config, job.store))
    return mlflow.start_run(run_id=summary.state.mlflow_run_id)


if __name__ == "__main__":
    sys.exit(main())
