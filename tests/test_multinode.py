"""The bulk-edit job on a Ray cluster of two (simulated) nodes: a trainer pool spread over both
nodes publishes the same snapshot as one trainer on one node."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster

from conftest import CITIES, WORDS, tiny_config
from melo_ray.editors.melo.bank import read_bank
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


def test_a_trainer_pool_over_two_nodes_publishes_the_one_trainer_snapshot(two_nodes, tmp_path):
    rows = [{"id": f"e{i}", "prompt": f"Where does the {WORDS[i % len(WORDS)]} {i} live?",
             "target": CITIES[(i * 7 + 3) % len(CITIES)]} for i in range(20)]
    edits = tmp_path / "edits.parquet"
    pq.write_table(pa.Table.from_pylist(rows), edits)
    nodes = []

    def where(job, version):
        nodes.extend(ray.get(t.info.remote()).node_id for t in job.actors.trainers)

    pool = tiny_config(pipeline={"trainers": 2, "trainer_cpus": 1.0})
    one = tiny_config(pipeline={"trainers": 1, "trainer_cpus": 1.0})
    BulkEditJob(pool, str(edits), str(tmp_path / "pool"), "pool", progress=False, on_commit=where).run()
    BulkEditJob(one, str(edits), str(tmp_path / "one"), "one", progress=False).run()
    assert len(set(nodes)) == 2  # the pool's trainers ran on both nodes

    (ma, fa), (mb, fb) = SnapshotStore(tmp_path / "pool").read(), SnapshotStore(tmp_path / "one").read()
    assert ma["stats"] == mb["stats"]
    meta_a, meta_b = json.loads(fa["index.json"]), json.loads(fb["index.json"])
    for key in ("labels", "member_ids", "conflicts", "forgotten"):
        assert meta_a[key] == meta_b[key], key
    layers = list(pool.lora.target_modules)
    banks_a, banks_b = read_bank(fa, layers, "pool"), read_bank(fb, layers, "one")
    for name in layers:
        for a, b in zip(banks_a[name], banks_b[name]):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
