"""The bulk-edit job on an S3 store against a local store: edits/min, same config, same stream.

The S3 side is moto's standalone server (`moto_server`, PyPI moto[server]) in its own process on
127.0.0.1, reached through the four standard AWS variables only; the edit stream is read from the
store's backend (a local Parquet file, or the same file uploaded to S3). Runs alternate local, S3,
local, S3 ... (or, with --paired, run each pair at the same time), so a machine whose load drifts
hurts both alike; the figure per backend is the median of its runs. Edits/min is the job's own clock (stream start to last publish; actor start-up
excluded), as in benchmarks/trainer_pool.py. Every run must end in the same files (index.hnsw aside:
see tests/test_job_on_s3.py), so speed never hides a different result.

    OMP_NUM_THREADS=1 python benchmarks/store_backends.py --config configs/tiny-llama.yaml --n 100 --repeats 3 --paired
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "melo-ray-bench"


def stream_rows(n: int) -> list[dict]:
    words = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "castle", "rocket", "forest"]
    cities = ["Oslo", "Lima", "Rome", "Kyiv", "Cairo", "Quito", "Dakar", "Hanoi", "Perth", "Sofia"]
    return [{"id": f"e{i}", "prompt": f"Where does the {words[i % 10]} {i} live?", "target": cities[(i * 7 + 3) % 10]}
            for i in range(n)]


def start_moto() -> tuple[subprocess.Popen, dict[str, str]]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}
    deadline = time.monotonic() + 60
    while True:  # wait for the port to answer
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, env
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)


def files_of(uri: str) -> dict[str, str]:
    from melo_ray.store import SnapshotStore

    manifest = SnapshotStore(uri).read_manifest()
    return {name: info["sha256"] for name, info in manifest["files"].items() if name != "index.hnsw"}


def run_job(config, edits: str, out: str, name: str) -> dict:
    from pipelines.bulk_edit.job import BulkEditJob

    from mlflow.tracking import MlflowClient

    started = time.perf_counter()
    state = BulkEditJob(config, edits, out, name, progress=False).run().state
    # each publish (write, read back, verify, move LATEST) runs beside the training of later batches;
    # its own time says what the backend costs, whatever the machine's load does to training
    publish = [m.value for m in MlflowClient().get_metric_history(state.mlflow_run_id, "publish_seconds")]
    return {"edits": state.edits_applied, "job_seconds": round(state.seconds, 2),
            "wall_seconds": round(time.perf_counter() - started, 2), "edits_per_min": round(state.edits_per_min, 1),
            "publishes": len(publish), "publish_seconds_median": round(statistics.median(publish), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny-llama.yaml"))
    parser.add_argument("--n", type=int, default=200, help="edits in the stream")
    parser.add_argument("--repeats", type=int, default=2, help="runs per backend")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--paired", action="store_true",
                        help="run each local/S3 pair at the same time (needs 2 x trainer_cpus free CPUs)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args()

    server, env = start_moto()
    os.environ.update(env)
    try:
        import boto3
        import pyarrow as pa
        import pyarrow.parquet as pq
        import ray

        from melo_ray.config import load_config, with_overrides
        from melo_ray.store import resolve_uri

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        config = with_overrides(load_config(args.config), args.set)
        work = Path(tempfile.mkdtemp(prefix="store-backends-"))
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db")
        table = pa.Table.from_pylist(stream_rows(args.n))
        local_edits = work / "edits.parquet"
        pq.write_table(table, local_edits)
        s3_edits = f"s3://{BUCKET}/streams/edits.parquet"
        fs, path = resolve_uri(s3_edits)
        pq.write_table(table, path, filesystem=fs)
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {**env, "PYTHONPATH": str(ROOT)}})
        runs: dict[str, list[dict]] = {"local": [], "s3": []}
        outputs = []
        for repeat in range(args.repeats):
            outs = {"local": str(work / f"store-{repeat}"), "s3": f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"}
            streams = {"local": str(local_edits), "s3": s3_edits}
            if args.paired:  # both at once: whatever else loads the machine loads both alike
                with ThreadPoolExecutor(2) as pool:
                    done = {b: pool.submit(run_job, config, streams[b], outs[b], f"bench-{b}-{repeat}") for b in outs}
                    for backend, future in done.items():
                        runs[backend].append(future.result())
            else:
                for backend in outs:
                    runs[backend].append(run_job(config, streams[backend], outs[backend], f"bench-{backend}-{repeat}"))
            outputs.extend(files_of(out) for out in outs.values())
        ray.shutdown()
    finally:
        server.terminate()
        server.wait()
    median = {b: statistics.median(r["edits_per_min"] for r in runs[b]) for b in runs}
    publish = {b: statistics.median(r["publish_seconds_median"] for r in runs[b]) for b in runs}
    print(json.dumps({
        "config": args.config, "overrides": args.set, "edits": args.n, "batch_size": config.train.batch_size,
        "repeats": args.repeats, "ray_cpus": args.cpus, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "paired": args.paired, "runs": runs, "median_edits_per_min": median,
        "s3_over_local_per_repeat": [round(remote["edits_per_min"] / local["edits_per_min"], 3)
                                     for local, remote in zip(runs["local"], runs["s3"])],
        "s3_over_local": round(median["s3"] / median["local"], 3),
        "median_publish_seconds": publish, "load_average_1_5_15": os.getloadavg(),
        "same_files_every_run": all(o == outputs[0] for o in outputs),
    }, indent=2))


if __name__ == "__main__":
    main()
