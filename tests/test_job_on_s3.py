"""The bulk-edit job on object storage (moto's S3 server, configured by the standard AWS variables
only), and the job against faults: a driver killed, a store that stops answering in the middle of a
publish, a local disk that fills in the middle of a write, a lease broken under a running job.

One clean run over a 30-edit stream read from S3 is the reference; a run killed and resumed through
an outage, and a run on a full disk that is resumed, must end in its exact files. (Few job runs:
each starts actors and a Ray Data read, the bulk of these tests' time.)"""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from conftest import CITIES, WORDS, fresh_mlflow_db, tiny_config
from moto_s3 import S3Server
from melo_ray import snapshots
from melo_ray.cli.main import main as cli
from melo_ray.editors.registry import editor_from_snapshot
from melo_ray.store import (FencedError, SnapshotStore, StoreBusyError, open_snapshots, read_any_snapshot,
                            resolve_uri)
from pipelines.bulk_edit.job import BulkEditJob, JobError

ROOT = Path(__file__).resolve().parent.parent
N_EDITS = 30
IDS = [f"e{i}" for i in range(N_EDITS)]


def load(uri: str):
    """The editor of a store's latest version, read straight from its URI."""
    manifest, files, where = read_any_snapshot(uri)
    return editor_from_snapshot(manifest, files, where)


def rows() -> list[dict]:
    return [{"id": f"e{i}", "prompt": f"Where does the {WORDS[i % len(WORDS)]} {i} live?",
             "target": CITIES[(i * 7 + 3) % len(CITIES)]} for i in range(N_EDITS)]


def job_config(**pipeline):
    return tiny_config(pipeline={"keep_versions": 3, "trainers": 1, "trainer_cpus": 1.0, "publish_backoff_s": 0.05,
                                 **pipeline})


def outcome(uri: str) -> dict:
    """What must be equal to the reference: every file's SHA-256, the counters, and each edit once.

    Not index.hnsw: hnswlib does not save its level generator, so a graph loaded and then extended
    differs in its links from one built in one go (the centres it indexes, in index.safetensors, are
    equal; a search re-checks them exactly)."""
    manifest, files = SnapshotStore(uri).read()
    return {"version": manifest["version"], "stats": manifest["stats"],
            "files": {name: info["sha256"] for name, info in manifest["files"].items() if name != "index.hnsw"},
            "member_ids": json.loads(files["index.json"])["member_ids"]}


@pytest.fixture(scope="module")
def s3_ray(s3_server, tmp_path_factory, mlflow_db_template):
    """Ray for this module; its workers get the same four AWS variables as the driver."""
    mlflow_uri = fresh_mlflow_db(mlflow_db_template, tmp_path_factory.mktemp("mlflow") / "mlflow.db")
    with pytest.MonkeyPatch.context() as env:
        for name, value in s3_server.env.items():
            env.setenv(name, value)
        env.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT / "tests"), **s3_server.env}})
        try:
            yield s3_server
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def stream(s3_ray) -> str:
    """The edit stream: a Parquet file uploaded to S3."""
    uri = f"{s3_ray.new_prefix()}/edits.parquet"
    fs, path = resolve_uri(uri)
    pq.write_table(pa.Table.from_pylist(rows()), path, filesystem=fs)
    return uri


@pytest.fixture(scope="module")
def reference(s3_ray, stream) -> dict:
    """Two jobs started at the same moment on one new S3 store: one proceeds (a reader follows every
    version it publishes), the other must fail at once naming it. The one that ran is the reference."""
    out = s3_ray.new_prefix()
    followed = []

    def follow(job, version):
        reader = open_snapshots(out)  # a replica's view: the store's serving version, verified
        manifest, _ = reader.read(reader.serving_version())
        followed.append(manifest["version"])

    jobs = {name: BulkEditJob(job_config(), stream, out, name, progress=False, on_commit=follow)
            for name in ("ref", "rival")}
    start = threading.Barrier(len(jobs))
    ended: dict[str, object] = {}

    def run(name: str) -> None:
        start.wait()
        began = time.monotonic()
        try:
            ended[name] = jobs[name].run()
        except StoreBusyError as exc:
            ended[name] = exc
        ended[f"{name} seconds"] = time.monotonic() - began

    threads = [threading.Thread(target=run, args=(name,)) for name in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winner = next(name for name in jobs if not isinstance(ended[name], StoreBusyError))
    loser = "rival" if winner == "ref" else "ref"
    return {"out": out, "summary": ended[winner], "followed": followed, "outcome": outcome(out), "winner": winner,
            "refusal": ended[loser], "refused_after": ended[f"{loser} seconds"]}


def test_of_two_jobs_started_at_once_one_writes_an_s3_store_from_an_s3_stream_and_a_reader_follows_it(reference):
    refusal = str(reference["refusal"])
    assert f"'job:{reference['winner']}' is writing" in refusal and socket.gethostname() in refusal
    assert reference["refused_after"] < 10  # at once, not after the other's work
    summary = reference["summary"]
    assert summary.state.status == "completed" and summary.state.edits_applied == N_EDITS
    assert reference["followed"] == [1, 2, 3]
    assert reference["outcome"]["member_ids"] == IDS  # every edit once, in stream order
    assert SnapshotStore(reference["out"]).writer() is None  # the lease was given back
    served = load(reference["out"])  # straight from s3://
    sample = rows()[:: 3]
    outputs = served.generate([r["prompt"] for r in sample], max_new_tokens=8)
    assert sum(o.output.startswith(r["target"]) for o, r in zip(outputs, sample)) >= len(sample) - 1


@contextmanager
def server_stopping_midway(job: BulkEditJob, s3: S3Server) -> Iterator[threading.Event]:
    """The S3 server stops after the first file of the job's next version is written, and comes back
    once the job has logged its first retry. Yields that event."""
    from moto.server import ThreadedMotoServer

    retried, servers = threading.Event(), []

    class RetryWatch(logging.Handler):
        def emit(self, record):
            if "retry 1 of" in record.getMessage():
                retried.set()

    def come_back():
        retried.wait(300)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=s3.port, verbose=False)
        server.start()  # moto keeps its buckets in the process: the store is as it was
        servers.append(server)

    real_write = job.store._write_version

    def stop_midway(name, files, *args):
        if not servers and not retried.is_set():
            first, data = next(iter(files.items()))
            with job.store.fs.open_output_stream(f"{job.store.root}/versions/{name}/{first}") as handle:
                handle.write(data)  # one file lands, then the server is gone
            s3.server.stop()
            threading.Thread(target=come_back, daemon=True).start()
        return real_write(name, files, *args)

    job.store._write_version = stop_midway
    watch = RetryWatch()
    logging.getLogger("pipelines.bulk_edit.job").addHandler(watch)
    try:
        yield retried
    finally:
        logging.getLogger("pipelines.bulk_edit.job").removeHandler(watch)
        if servers:
            s3.server = servers[-1]  # the session fixture stops the one that runs


def test_a_killed_driver_resumes_through_a_store_outage_mid_publish_to_the_same_files(s3_ray, stream, reference,
                                                                                      tmp_path):
    """The driver is SIGKILLed after its first publish; the resumed run finds the S3 server stopping in
    the middle of its first publish, retries, and ends in the reference's files: no edit lost or doubled."""
    out = s3_ray.new_prefix()
    config = tmp_path / "config.json"
    config.write_text(json.dumps(job_config().model_dump(mode="json")))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT / "tests")}
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipelines.bulk_edit", "--config", str(config), "--edits", stream, "--out", out,
         "--job-id", "killed", "--quiet"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    store = SnapshotStore(out)
    deadline = time.monotonic() + 300
    while (store.latest_version() or 0) < 1:
        assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)  # mid-run: no clean-up of any kind
    driver.wait()
    killed_at = store.latest_version()
    assert 1 <= killed_at < 3 and store.writer()["owner"] == "job:killed"

    job = BulkEditJob(job_config(), stream, out, "killed", progress=False)  # takes its dead lease over
    with server_stopping_midway(job, s3_ray) as retried:
        summary = job.run()
    assert retried.is_set() and summary.state.status == "completed" and summary.state.edits_applied == N_EDITS
    assert outcome(out) == reference["outcome"]


def test_a_job_whose_lease_is_broken_by_a_rollback_publishes_nothing_more(s3_ray, stream):
    out = s3_ray.new_prefix()

    def break_the_lease(job, version):
        if version == 1:
            assert cli(["store", "rollback", "--store", out, "--to", "1", "--break-lock"]) == 0

    with pytest.raises(FencedError, match=r"'job:fenced' \(epoch 1\) was broken"):
        BulkEditJob(job_config(), stream, out, "fenced", progress=False, on_commit=break_the_lease).run()
    store = SnapshotStore(out)
    assert store.latest_version() == 2 and store.read_manifest()["operation"]["rollback_to"] == 1
    assert store.versions() == [1, 2]


def test_a_disk_that_fills_in_the_middle_of_a_write_fails_clearly_and_a_resume_ends_exactly(
        s3_ray, stream, reference, tmp_path, monkeypatch):
    """A local store: writes fail with ENOSPC after a few bytes of version 2; the bounded retries end
    in a clear error, LATEST.json still names version 1, and a resume (space freed) ends exactly."""
    out = tmp_path / "store"
    full = threading.Event()
    real_write = snapshots._write_file

    def write_until_full(path, data):
        if not full.is_set():
            return real_write(path, data)
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(snapshots, "_write_file", write_until_full)
    with pytest.raises(JobError, match=r"could not publish version 2 .* after 3 tries: .*No space left on device"):
        BulkEditJob(job_config(publish_retries=2), stream, str(out), "disk", progress=False,
                    on_commit=lambda job, version: full.set()).run()
    store = SnapshotStore(out)
    assert store.latest_version() == 1 and store.versions() == [1]  # nothing partial, no leftovers
    assert [p.name for p in (out / "versions").iterdir() if p.name.startswith(".")] == []
    full.clear()  # space freed
    summary = BulkEditJob(job_config(), stream, str(out), "disk", progress=False).run()
    assert summary.state.status == "completed" and summary.state.edits_applied == N_EDITS
    assert outcome(str(out)) == reference["outcome"]  # the same files as the clean run on S3
