"""The bulk-edit job on a Ray cluster of two (simulated) nodes: a trainer pool spread over both
nodes publishes the same snapshot as the single-process editor."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster

from conftest import CITIES, WORDS, fresh_mlflow_db, tiny_config
from melo_ray.editors.melo.bank import read_bank
from melo_ray.editors.melo.editor import MeloEditor
from melo_ray.store import SnapshotStore
from pipelines.bulk_edit.job import BulkEditJob

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 150 * 1024 * 1024})
    cluster.add_node(num_cpus=2, object_store_memory=150 * 1024 * 1024)
    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT / "tests")}})
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_a_trainer_pool_over_two_nodes_publishes_the_single_process_snapshot(two_nodes, tmp_path, mlflow_db_template):
    rows = [{"id": f"e{i}", "prompt": f"Where does the {WORDS[i % len(WORDS)]} {i} live?",
             "target": CITIES[(i * 7 + 3) % len(CITIES)]} for i in range(20)]
    edits = tmp_path / "edits.parquet"
    pq.write_table(pa.Table.from_pylist(rows), edits)
    nodes = []

    def where(job, version):
        nodes.extend(ray.get(t.info.remote()).node_id for t in job.actors.trainers)

    mlflow_uri = fresh_mlflow_db(mlflow_db_template, tmp_path / "mlflow.db")
    pool = tiny_config(pipeline={"trainers": 2, "trainer_cpus": 1.0, "mlflow_tracking_uri": mlflow_uri})
    BulkEditJob(pool, str(edits), str(tmp_path / "pool"), "pool", progress=False, on_commit=where).run()
    assert len(set(nodes)) == 2  # the pool's trainers ran on both nodes

    one = MeloEditor(pool)  # the same batches in one process, in order
    for start in range(0, len(rows), pool.train.batch_size):
        one.edit(rows[start : start + pool.train.batch_size])
    manifest, files = SnapshotStore(tmp_path / "pool").read()
    stats = one.snapshot_meta()["stats"]
    for key in ("edits", "blocks", "clusters", "members", "conflicts", "forgotten"):
        assert manifest["stats"][key] == stats[key], key
    meta_a, meta_b = json.loads(files["index.json"]), one.index.index.state()[1]
    for key in ("labels", "member_ids", "conflicts", "forgotten"):
        assert meta_a[key] == meta_b[key], key
    layers = list(pool.section("lora").target_modules)
    banks_a, banks_b = read_bank(files, layers, "pool"), read_bank(one.state_files(), layers, "one")
    for name in layers:
        for a, b in zip(banks_a[name], banks_b[name]):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
