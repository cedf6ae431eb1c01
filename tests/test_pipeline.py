"""The Ray bulk-edit job against a real local Ray, with a tiny model.

The 80-edit stream through a pool of two trainers, with a trainer and the writer killed on the way, must end
in the single-process editor's final state. (A driver killed and resumed is tested on S3, in
test_job_on_s3.py: the resume code is the same for every store.)
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.numpy


import mlflow  # noqa: E402
import ray  # noqa: E402

from conftest import CITIES, WORDS, fresh_mlflow_db, tiny_config  # noqa: E402
from melo_ray.editors.melo.bank import read_bank  # noqa: E402
from melo_ray.editors.loading import load_editor  # noqa: E402
from melo_ray.editors.melo.editor import MeloEditor  # noqa: E402
from pipelines.bulk_edit.job import BulkEditJob  # noqa: E402
from pipelines.bulk_edit.tracking import tracking_uri  # noqa: E402
from melo_ray.records import RecordError  # noqa: E402
from melo_ray.store import SnapshotStore  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
N_EDITS = 80


def stream_rows(n: int = N_EDITS) -> list[dict]:
    """Distinct facts, plus every 25th row re-editing an earlier prompt with a new target (conflicts)."""
    rows = []
    for i in range(n):
        if i % 25 == 24:
            prompt = rows[i - 20]["prompt"]
            target = CITIES[(i * 3) % len(CITIES)]
        else:
            prompt = f"Where does the {WORDS[i % len(WORDS)]} {i} live?"
            target = CITIES[(i * 7 + 3) % len(CITIES)]
        rows.append({"id": f"e{i}", "prompt": prompt, "target": target})
    return rows


def job_config(trainers: int = 1):
    # half a CPU each: two trainers and the stream reader share the session's two CPUs
    return tiny_config(pipeline={"keep_versions": 3, "trainers": trainers, "trainer_cpus": 1.0 if trainers == 1 else 0.5})


def write_stream(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def final_state(store_root: Path) -> dict:
    store = SnapshotStore(store_root)
    manifest, files = store.read()
    arrays = safetensors.numpy.load(files["index.safetensors"])
    meta = json.loads(files["index.json"])
    adapters = _adapters(files)
    return {"manifest": manifest, "arrays": arrays, "meta": meta, "adapters": adapters}


def _adapters(files) -> dict:
    banks = read_bank(files, list(job_config().section("lora").target_modules), "test")
    return {f"{name}.{part}": t.numpy() for name, pair in banks.items() for part, t in zip("AB", pair)}


def assert_same_state(a: dict, b: dict, *, exact: bool) -> None:
    for key in ("edits", "blocks", "clusters", "members", "conflicts", "forgotten"):
        assert a["manifest"]["stats"][key] == b["manifest"]["stats"][key], key
    assert a["manifest"]["version"] == b["manifest"]["version"]
    for key in ("labels", "member_ids", "conflicts", "forgotten"):
        assert a["meta"][key] == b["meta"][key], key
    for key in ("member_blocks", "member_clusters", "alive"):
        np.testing.assert_array_equal(a["arrays"][key], b["arrays"][key])
    compare = np.testing.assert_array_equal if exact else (
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5))
    for key in ("centres", "radii", "member_keys"):
        compare(a["arrays"][key], b["arrays"][key])
    assert a["adapters"].keys() == b["adapters"].keys()
    for key in a["adapters"]:
        compare(a["adapters"][key], b["adapters"][key])


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory, mlflow_db_template):
    # one MLflow database for the module's jobs: a new sqlite file costs each job seconds of table creation
    mlflow_uri = fresh_mlflow_db(mlflow_db_template, tmp_path_factory.mktemp("mlflow") / "mlflow.db")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT / "tests")}})
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """The 80-edit stream through a pool of two trainers, one of which is killed at version 2 and the
    writer at version 4 (both restarted by Ray); the job must end as if nothing had happened."""
    folder = tmp_path_factory.mktemp("reference")
    edits = write_stream(folder / "edits.parquet", stream_rows())
    killed, pools = {}, []

    def kill(job, version):
        pools.append(len(job.actors.trainers))
        if version == 2 and "trainer" not in killed:
            killed["trainer"] = ray.get(job.actors.trainers[1].info.remote()).pid
            ray.kill(job.actors.trainers[1], no_restart=False)  # restarted; its call is retried
        elif version == 4 and "writer" not in killed:
            killed["writer"] = version
            ray.kill(job.actors.writer, no_restart=False)  # restarted blank: the job recovers
        elif version == 6:
            killed["later"] = ray.get(job.actors.trainers[1].info.remote()).pid

    job = BulkEditJob(job_config(trainers=2), str(edits), str(folder / "store"), "ref", progress=False,
                      on_commit=kill)
    summary = job.run()
    return {"edits": edits, "store": folder / "store", "summary": summary, "state": final_state(folder / "store"),
            "killed": killed, "pools": pools, "actors_after": job.actors}


def test_a_pool_job_through_a_trainer_and_a_writer_kill_equals_the_single_process_editor(reference):
    summary, killed = reference["summary"], reference["killed"]
    assert summary.state.status == "completed"
    assert summary.state.edits_applied == N_EDITS
    assert summary.snapshot_version == N_EDITS // 10
    assert set(reference["pools"]) == {2}  # two trainers trained the whole stream
    assert killed.keys() == {"trainer", "writer", "later"} and killed["later"] != killed["trainer"]
    assert summary.state.recoveries >= 1  # the writer's loss was noticed and recovered from
    assert reference["actors_after"] is None  # the job gave its actors back
    editor = MeloEditor(job_config())
    rows = stream_rows()
    for start in range(0, N_EDITS, 10):
        editor.edit(rows[start : start + 10])
    local = editor.snapshot_meta()
    arrays, meta = editor.index.index.state()
    adapters = _adapters(editor.state_files())
    single = {"manifest": local, "arrays": arrays, "meta": meta, "adapters": adapters}
    # the actors run in other processes (other thread counts), so floats may differ in the last bits
    assert_same_state(reference["state"], single, exact=False)
    assert reference["state"]["meta"]["conflicts"] > 0  # the re-edits really exercised the conflict rule

    # the published snapshot serves the edits: edited prompts give their latest targets
    served = load_editor(SnapshotStore(reference["store"]).local_folder(summary.snapshot_version))
    latest = {r["prompt"]: r["target"] for r in rows}
    sample = list(latest.items())[:40]
    outputs = served.generate([p for p, _ in sample], max_new_tokens=8)
    hits = sum(out.output.startswith(target) for out, (_, target) in zip(outputs, sample))
    assert hits >= 36


@pytest.fixture(scope="module")
def rejecting_job(ray_session, tmp_path_factory):
    """One job over a stream of bad and hostile rows among good ones: schema drift between files, nested
    values, nulls, empty and huge strings, wrong types, a repeated id."""
    folder = tmp_path_factory.mktemp("rejecting")
    stream = folder / "edits"
    stream.mkdir()
    rows = [dict(r) for r in stream_rows(25)]
    rows[3]["prompt"] = None        # missing
    rows[7]["target"] = "   "        # empty
    rows[11]["prompt"] = ""          # empty
    write_stream(stream / "part-0.parquet", rows)
    write_stream(stream / "part-1.parquet", [{"id": "t0", "prompt": "What is seven?", "target": 7},
                                             {"id": "t1", "prompt": "What is eight?", "target": 8}])  # wrong type
    write_stream(stream / "part-2.parquet", [{"id": "e90", "prompt": "Where does the comet 90 live?", "target": 7}])
    write_stream(stream / "part-3.parquet", [{"id": "e91", "prompt": {"nested": ["value"]}, "target": "Oslo"}])
    write_stream(stream / "part-4.parquet", [
        {"id": "e92", "prompt": None, "target": "Lima"},
        {"id": "e93", "prompt": "Where does the huge " + "x" * 200_000 + " live?", "target": "Rome"},
        {"id": "e94", "prompt": "Where does the heron 94 live?", "target": "Oslo"},
        {"id": "e94", "prompt": "Where does the heron 95 live?", "target": "Bern"},  # a repeated id is kept
    ])
    out = folder / "store"
    summary = BulkEditJob(job_config(), str(stream), str(out), "day-1", progress=False).run()
    return {"summary": summary, "out": out}


def test_bad_and_hostile_rows_go_to_the_rejects_file_row_by_row_and_the_job_goes_on(rejecting_job):
    summary = rejecting_job["summary"]
    assert summary.state.status == "completed"
    assert summary.state.edits_applied == 24 and summary.state.rejected == 9
    rejects = [json.loads(line) for line in Path(summary.rejects_path).read_text().splitlines()]
    assert [(r["row"], r["field"]) for r in rejects] == [
        (3, "prompt"), (7, "target"), (11, "prompt"), (25, "target"), (26, "target"), (27, "target"),
        (28, "prompt"), (29, "prompt"), (30, "prompt")]
    assert "missing" in rejects[0]["reason"] and "empty" in rejects[1]["reason"]
    assert "must be a string" in rejects[3]["reason"]
    assert "train.max_text_chars" in rejects[8]["reason"]
    assert all(r["reason"] for r in rejects)


def test_a_second_job_builds_on_the_first_and_mlflow_has_its_metrics(rejecting_job, tmp_path):
    out, first = rejecting_job["out"], rejecting_job["summary"]
    rows = stream_rows(45)[25:]
    second = BulkEditJob(job_config(), str(write_stream(tmp_path / "b.parquet", rows)), str(out), "day-2",
                         progress=False).run()
    assert second.snapshot_version == first.snapshot_version + 2
    assert second.state.edits_applied == 20 and second.stats["edits"] == first.stats["edits"] + 20 == 44

    client = mlflow.tracking.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(second.state.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["melo_ray.job_id"] == "day-2"
    assert run.data.params["train.batch_size"] == "10"
    for metric in ("loss", "train_seconds", "clusters", "conflicts", "forgotten", "index_size", "edits_per_min"):
        assert metric in run.data.metrics, metric
    assert [m.step for m in client.get_metric_history(run.info.run_id, "clusters")] == [
        first.snapshot_version + 1, first.snapshot_version + 2]


def test_without_a_tracking_uri_mlflow_writes_beside_a_local_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(job_config(), SnapshotStore(tmp_path / "store")) == f"sqlite:///{tmp_path / 'store'}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking_uri(job_config(), SnapshotStore(tmp_path / "store")) == "http://mlflow:5000"


def test_an_unreadable_file_fails_the_job_and_changes_no_snapshot(reference, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(reference["store"], out)  # a store with published versions
    before = (out / "LATEST.json").read_bytes(), sorted(p.name for p in (out / "versions").iterdir())
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(RecordError, match="broken.parquet"):
        BulkEditJob(job_config(), str(broken), str(out), "second", progress=False).run()
    assert ((out / "LATEST.json").read_bytes(), sorted(p.name for p in (out / "versions").iterdir())) == before


def test_an_elder_job_equals_the_single_process_editor_and_resumes_after_a_trainer_kill(ray_session, tmp_path):
    from melo_ray.editors.elder.editor import ElderEditor
    from melo_ray.serving.engine import CompletionRequest, ServingEngine

    config = tiny_config(elder={"num_experts": 8, "replay": 10}, pipeline={"keep_versions": 3})
    config = config.model_copy(update={"editor": "elder"})
    rows = stream_rows(40)
    edits = write_stream(tmp_path / "edits.parquet", rows)
    killed = []

    def kill_trainer(job, version):
        if version == 2 and not killed:
            killed.append(version)
            ray.kill(job.actors.trainers[0], no_restart=False)

    summary = BulkEditJob(config, str(edits), str(tmp_path / "store"), "elder", progress=False,
                          on_commit=kill_trainer).run()
    assert summary.state.status == "completed" and summary.state.edits_applied == 40
    assert killed and summary.state.recoveries >= 1
    manifest, files = SnapshotStore(tmp_path / "store").read()
    assert manifest["editor"] == "elder" and manifest["version"] == 4 and manifest["stats"]["stored_codes"] == 40

    single = ElderEditor(config)
    for start in range(0, 40, 10):
        single.edit(rows[start : start + 10])
    job_editor = ElderEditor.from_files(manifest, files)
    assert job_editor.stats() == single.stats()
    assert job_editor.allocations.keys() == single.allocations.keys()
    for fact, allocation in single.allocations.items():
        np.testing.assert_array_equal(job_editor.allocations[fact], allocation)
    for a, b in zip(job_editor.trainable(), single.trainable()):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-3, atol=1e-4)

    # the server answers exactly as the editor restored from the same snapshot, and the last batch holds
    # (ELDER forgets earlier batches on this tiny model; the quality figures are in docs/results.md)
    engine = ServingEngine.from_snapshot(manifest, files)
    prompts = [r["prompt"] for r in rows]
    out = engine.complete([CompletionRequest(p, 8) for p in prompts])
    assert [o.text.strip() for o in out] == [g.output for g in job_editor.generate(prompts, 8)]
    last = rows[30:]
    hits = sum(o.text.strip().startswith(r["target"]) for o, r in zip(out[30:], last))
    assert hits >= 8, hits


def _raise_a_record_error() -> None:
    raise RecordError("edits.parquet", 4, "target", "is empty")


def test_a_record_error_crosses_ray_intact(ray_session):
    """Bug: it reached the driver as "UnserializableException: Failed to deserialize exception". (A task
    raises it: the error crosses Ray the same way from an actor, without an actor's start-up.)"""
    with pytest.raises(RecordError) as caught:
        ray.get(ray.remote(_raise_a_record_error).remote())
    assert (caught.value.row, caught.value.field, caught.value.reason) == (4, "target", "is empty")


def test_a_target_outside_a_classifiers_labels_is_rejected_and_the_stream_goes_on(tmp_path):
    """Bug: one such row stopped the whole job with a traceback. The trainers report their backbone's
    labels (ActorInfo.labels); the job's batching rejects a row against them and keeps the rest. The
    rejects' path through a running job is the rejecting_job fixture's."""
    from conftest import tiny_config as config_of
    from melo_ray.backbones import load_backbone

    config = config_of("tiny-bert", train={"batch_size": 4, "num_iter": 20}, pipeline={"keep_versions": 2})
    labels = load_backbone(config.backbone).labels
    assert labels is not None and {"affirmed", "reversed", "remanded"} <= set(labels)
    rows = [{"prompt": f"Case {i}: the court heard the {WORDS[i]} appeal.", "target": ["affirmed", "reversed", "remanded"][i % 3]}
            for i in range(8)]
    rows[5]["target"] = "dismissed"
    job = BulkEditJob(config, str(write_stream(tmp_path / "cases.parquet", rows)), str(tmp_path / "store"), "cases",
                      progress=False)
    rejects: list[dict] = []
    batches = list(job._batches(iter(enumerate(rows)), 0, rejects, tuple(labels)))
    assert [[r.prompt for r in b.records] for b in batches] == [
        [rows[i]["prompt"] for i in (0, 1, 2, 3)], [rows[i]["prompt"] for i in (4, 6, 7)]]
    assert [b.final for b in batches] == [False, True] and batches[-1].last_row == 7
    assert [(r["row"], r["field"]) for r in rejects] == [(5, "target")] and "dismissed" in rejects[0]["reason"]


# GRACE stands for the editors whose batches share state (LoRA's job path is the same code; ELDER's is
# tested above through a trainer kill); each job costs this suite about ten seconds of actor start-up.
@pytest.mark.parametrize("name", ["grace"])
def test_the_baselines_run_in_the_job_and_equal_the_single_process_editor(name, ray_session, tmp_path, caplog):
    from melo_ray.editors.registry import build_editor, editor_from_snapshot

    # a pool is asked for, but each batch of these editors trains on the last: one trainer, and a warning
    config = tiny_config(grace={"num_iter": 20}, pipeline={"keep_versions": 2, "trainers": 2, "trainer_cpus": 0.5})
    config = config.model_copy(update={"editor": name})
    rows = stream_rows(20)
    pools = []
    with caplog.at_level("WARNING", logger="pipelines.bulk_edit.job"):
        summary = BulkEditJob(config, str(write_stream(tmp_path / "e.parquet", rows)), str(tmp_path / "store"), name,
                              progress=False, on_commit=lambda job, v: pools.append(len(job.actors.trainers))).run()
    assert set(pools) == {1} and "edit shared state" in caplog.text
    assert summary.state.status == "completed" and summary.state.edits_applied == 20
    manifest, files = SnapshotStore(tmp_path / "store").read()
    assert manifest["editor"] == name and manifest["version"] == 2
    single = build_editor(name, config)
    for start in range(0, 20, 10):
        single.edit(rows[start : start + 10])
    served = editor_from_snapshot(manifest, files, "job")
    assert served.stats() == single.stats()
    prompts = [r["prompt"] for r in rows]
    assert [g.output for g in served.generate(prompts, 6)] == [g.output for g in single.generate(prompts, 6)]
