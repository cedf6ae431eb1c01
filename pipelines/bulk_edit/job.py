"""The bulk-edit job's driver: stream → trainer actors → writer actor → snapshot store, exactly once.

Any registered editor runs here. An editor whose batches train independently (MELO) gets a pool of
`pipeline.trainers` stateless trainer actors that train consecutive batches at once, and a writer
actor, the single writer, that commits them in stream order; any other editor gets one trainer that
holds its whole state.

A batch is committed when a snapshot version holding it is published; the manifest of that version
records how far into the stream the job got (`job.rows_done`). Whatever happens (driver killed,
actor killed), the job restarts from the latest published version: the stateful actor is restored
from it and the stream is re-read from `rows_done`. Training is seeded by the batch's position in
the stream, so a batch redone after a crash, or trained by another trainer of the pool, gives the
same block and the same clusters as an uninterrupted run with one trainer.

The driver's loop is three named pieces: `BatchQueue` queues each batch on the actors without
waiting, `InFlightWindow` decides when to wait for the oldest, and `CommitPublisher` commits them in
stream order on one thread. Every publish is fenced by the store's writer lease, and a commit point
that cannot reach the store is retried with backoff (`pipeline.publish_retries`).
"""
from __future__ import annotations

import json
import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from melo_ray.cluster import init_ray
from melo_ray.config import EditorConfig
from melo_ray.editors.messages import IndexUpdate, StaleStateError, TrainedBatch
from melo_ray.editors.registry import editor_class
from melo_ray.records import EditRecord, RecordError, parse_record
from melo_ray.snapshots import SnapshotError, SnapshotMeta, check_editor
from melo_ray.store import FencedError, Lease, SnapshotStore, StoreBusyError
from melo_ray.training import label_error, length_error
from pipelines.bulk_edit.actors import CommitResult, TrainerActor, TrainerInfo, WriterActor
from pipelines.bulk_edit.source import EditSource, ReadAhead
from pipelines.bulk_edit.tracking import JobTracker

log = logging.getLogger(__name__)


READER_CPUS = 1.0  # kept free for the stream reader (Ray Data)
PLOTTED_METRICS = ("loss", "clusters", "index_size", "train_seconds")  # job_metrics.png in the MLflow run


class JobError(RuntimeError):
    """The job cannot run as asked (another job's state, changed input, failures beyond retries)."""


@dataclass
class JobState:
    """jobs/<id>/state.json: what an operator (or a resumed run) needs to know about one job."""

    job_id: str
    edits_uri: str
    fingerprint: str
    batch_size: int
    rows_total: int
    status: str = "running"  # running | completed | failed
    mlflow_run_id: str | None = None
    rows_done: int = 0
    edits_before: int = 0  # edits already in the store when the job started
    version_before: int = 0  # its snapshot version
    published: int = 0  # snapshot versions this job published
    edits_applied: int = 0  # by this job
    batches: int = 0
    rejected: int = 0
    last_version: int | None = None
    recoveries: int = 0
    seconds: float = 0.0
    edits_per_min: float = 0.0
    error: str | None = None


@dataclass
class JobSummary:
    state: JobState
    rejects_path: str
    snapshot_version: int | None
    stats: dict[str, Any] = field(default_factory=dict)


def _state_path(job_id: str) -> str:
    return f"jobs/{job_id}/state.json"


def _rejects_path(job_id: str) -> str:
    return f"jobs/{job_id}/rejects.jsonl"


def _check_job_id(job_id: str) -> None:
    if not job_id or not all(c.isalnum() or c in "-_." for c in job_id) or job_id.startswith("."):
        raise JobError(f"--job-id '{job_id}': use letters, digits, '-', '_' and '.' only")


def _unreachable(exc: BaseException | None) -> bool:
    """A failure to reach or write the store (OSError, also when wrapped in a SnapshotError), not a
    refusal or a damaged snapshot."""
    while exc is not None:
        if isinstance(exc, OSError):
            return True
        exc = exc.__cause__
    return False


def _save_state(store: SnapshotStore, state: JobState) -> None:
    store.put_bytes(_state_path(state.job_id), json.dumps(asdict(state), indent=2).encode())


def _load_rejects(store: SnapshotStore, job_id: str, before_row: int) -> list[dict[str, Any]]:
    data = store.get_bytes(_rejects_path(job_id))
    if not data:
        return []
    rows = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    return [r for r in rows if r["row"] < before_row]


def _save_rejects(store: SnapshotStore, job_id: str, rejects: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, default=repr) + "\n" for r in rejects)
    store.put_bytes(_rejects_path(job_id), text.encode())


@dataclass
class _InFlight:
    """A batch queued on the actors and not yet waited for."""

    version: int  # the version it makes
    last_row: int
    result_ref: Any  # TrainedBatch (one stateful trainer) or CommitResult (the writer)
    parts: list[Any] | None  # snapshot files and counters, when this batch is a publish point
    final: bool


@dataclass
class _Actors:
    trainers: list[Any]
    writer: Any  # None for an editor with shared state: its one trainer holds all its state
    info: TrainerInfo

    @property
    def stateful(self) -> Any:
        """The actor that holds the editor's state: restored, reset, and asked for snapshot files."""
        return self.writer if self.writer is not None else self.trainers[0]

    def all(self) -> list[Any]:
        return self.trainers + ([self.writer] if self.writer is not None else [])


@dataclass(frozen=True)
class StreamBatch:
    """Validated records of the stream, up to and including row `last_row`."""

    records: list[EditRecord]
    last_row: int
    final: bool  # the stream's last batch: published whatever `snapshot_every` says


@dataclass
class _JobClock:
    """The job's own clock: seconds of earlier runs of this job id plus this run's."""

    started: float
    before: float

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.started


class BatchQueue:
    """Queues batches on the actors without waiting: training (round robin over the pool), the commit
    by the writer (in stream order: Ray runs one caller's calls on an actor in order), and at a publish
    point the snapshot files as of this batch. The driver goes on reading the stream meanwhile."""

    def __init__(self, actors: _Actors, version: int, snapshot_every: int,
                 snapshot_parts: Callable[[], list[Any]]) -> None:
        self.actors = actors
        self.version = version  # of the last batch queued: every batch moves it by one
        self.snapshot_every = snapshot_every
        self.snapshot_parts = snapshot_parts
        self.unpublished = 0  # batches queued since the last one that will be published

    def submit(self, batch: StreamBatch) -> _InFlight:
        trainers, writer = self.actors.trainers, self.actors.writer
        records = list(batch.records)
        if writer is not None:
            trained_ref = trainers[self.version % len(trainers)].train_detached.remote(records, self.version)
            result_ref = writer.commit.remote(trained_ref)  # waits on the trainer's result
        else:
            result_ref = trainers[0].train.remote(records, self.version)
        self.version += 1
        self.unpublished += 1
        publish = self.unpublished >= self.snapshot_every or batch.final
        parts = self.snapshot_parts() if publish else None  # queued now: the state as of this batch
        if publish:
            self.unpublished = 0
        return _InFlight(self.version, batch.last_row, result_ref, parts, batch.final)


@dataclass
class InFlightWindow:
    """Batches queued on the actors and not yet waited for, oldest first, and when to wait for them."""

    size: int  # batches queued at most
    max_snapshots: int  # publish points queued at most: each holds a copy of the whole bank
    items: deque[_InFlight] = field(default_factory=deque)

    @classmethod
    def for_pool(cls, inflight_batches: int, trainers: int) -> "InFlightWindow":
        # each trainer keeps its own queue of `inflight_batches`: with one batch ahead per trainer, the
        # oldest (slowest) batch held the rest idle and 4 trainers reached 0.77 of 4x one (16 cores);
        # but a wide pool's memory must not grow with its queues: one snapshot per trainer + look-ahead
        return cls(size=inflight_batches * trainers, max_snapshots=inflight_batches + trainers - 1)

    def push(self, item: _InFlight) -> list[_InFlight]:
        """Queue `item`; returns the oldest batches to wait for now (all of them after a final one)."""
        self.items.append(item)
        due = []
        while self.items and (len(self.items) > self.size or item.final
                              or sum(i.parts is not None for i in self.items) > self.max_snapshots):
            due.append(self.items.popleft())
        return due

    def drain(self) -> list[_InFlight]:
        due = list(self.items)
        self.items.clear()
        return due


class CommitPublisher:
    """Waits for queued batches in stream order and hands each one's publish (the commit), job state and
    metrics to one thread: a slow store does not hold up the stream, and one thread keeps publishes,
    job state and tracking in stream order. A failed publish stops every later one and is raised in the
    driver at its next `finish` or on leaving the `with` block."""

    def __init__(self, job: "BulkEditJob", bar: Any, clock: _JobClock) -> None:
        self.job, self.bar, self.clock = job, bar, clock
        self.pending: deque[Future] = deque()
        self.failed_at: int | None = None  # the version whose publish failed
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="publisher")

    def __enter__(self) -> "CommitPublisher":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                while self.pending:
                    self.pending.popleft().result()
        finally:
            self.thread.shutdown(wait=True)

    def finish(self, item: _InFlight, rejects: list[dict[str, Any]]) -> None:
        """Wait for `item`'s training and commit, then queue its publish and metrics."""
        import ray

        result = ray.get(item.result_ref)
        if isinstance(result, CommitResult):
            trained, indexed = result.trained, result.update
        else:  # the one trainer applied everything; its counters stand in for a writer's
            assert isinstance(result, TrainedBatch)
            trained, indexed = result, result.update or IndexUpdate()
        if trained.version != item.version:
            raise StaleStateError(f"actor answered version {trained.version}, the job expected {item.version}")
        metrics = {
            "loss": trained.final_loss, "train_seconds": trained.seconds, "steps": trained.steps,
            "learned": trained.learned, "clusters": indexed.clusters, "conflicts": indexed.conflicts,
            "forgotten": indexed.forgotten_total, "index_size": indexed.members,
        }
        self.pending.append(self.thread.submit(self._commit, item, metrics, indexed.clusters, list(rejects)))
        while len(self.pending) > 1 or (self.pending and self.pending[0].done()):
            self.pending.popleft().result()  # re-raises a failed publish here

    def _commit(self, item: _InFlight, metrics: dict[str, float], clusters: int, rejects: list) -> None:
        """On the publisher thread: publish at a publish point, then log and report."""
        if self.failed_at is not None:  # a publish before this one failed: publish nothing after it
            return
        job, state = self.job, self.job.state
        try:
            state.batches = item.version - state.version_before
            if item.parts is not None:
                job._publish(item.version, item.last_row + 1, rejects, item.final, item.parts)
                state.seconds = self.clock.seconds()
                metrics.update(edits_total=state.edits_applied, rejected_total=state.rejected,
                               publish_seconds=job.last_publish_seconds)
            job.tracker.log_metrics(metrics, step=item.version)
            self.bar.n = item.last_row + 1
            self.bar.set_postfix(edits=state.edits_applied, clusters=clusters, rejected=len(rejects))
            if item.parts is not None and job.on_commit is not None:
                job.on_commit(job, item.version)
        except BaseException:
            self.failed_at = item.version
            raise


class BulkEditJob:
    """One run of one job id. `run()` returns when the whole stream is committed."""

    def __init__(self, config: EditorConfig, edits_uri: str, out_uri: str, job_id: str, *,
                 progress: bool = True, on_commit: Callable[["BulkEditJob", int], None] | None = None) -> None:
        _check_job_id(job_id)
        self.config = config
        self.cfg = config.pipeline
        self.job_id = job_id
        self.progress = progress
        self.on_commit = on_commit  # test and monitoring hook: called after each published version
        self.store = SnapshotStore(out_uri, keep=self.cfg.keep_versions)
        self.source = EditSource.open(edits_uri)  # unreadable input fails here, before any change
        self.batch_size = config.train.batch_size
        self.state = self._load_or_start_state()
        self.actors: _Actors | None = None
        self.tracker = None
        self.lease: Lease | None = None  # held while run() runs; every publish is fenced by it
        self.last_publish_seconds = 0.0

    # -- job state -------------------------------------------------------------------------------
    def _load_or_start_state(self) -> JobState:
        data = self.store.get_bytes(_state_path(self.job_id))
        if data is None:
            latest = self.store.latest_version()
            before = 0 if latest is None else int(self.store.read_manifest(latest)["stats"]["edits"])
            return JobState(job_id=self.job_id, edits_uri=self.source.uri, fingerprint=self.source.fingerprint,
                            batch_size=self.batch_size, rows_total=self.source.num_rows, edits_before=before,
                            version_before=latest or 0, last_version=latest)
        state = JobState(**json.loads(data))
        if state.fingerprint != self.source.fingerprint or state.batch_size != self.batch_size:
            raise JobError(
                f"job '{self.job_id}' in {self.store.uri} was started on other input or batch size; "
                "use a new --job-id for a new edit stream"
            )
        return state

    def _committed_progress(self) -> tuple[int | None, int]:
        """(latest published version, rows of this job's stream it covers)."""
        latest = self.store.latest_version()
        if latest is None:
            return None, 0
        job = self.store.read_manifest(latest).get("job") or {}
        if job.get("id") == self.job_id:
            return latest, int(job["rows_done"])
        if self.state.published > 0:
            raise JobError(
                f"{self.store.uri}: another job published version {latest} after job '{self.job_id}' committed; "
                "one writer per store"
            )
        return latest, 0

    # -- actors ----------------------------------------------------------------------------------
    def _start_actors(self) -> _Actors:
        """Start the whole pool and the writer at once (each start loads a backbone or imports torch:
        seconds apiece), then wait for them together."""
        import ray

        gpus = self.cfg.trainer_gpus
        cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus == "auto":
            gpus = 1 if cluster_gpus >= 1 else 0
        config = self.config.model_dump(mode="json")
        pooled = editor_class(self.config.editor).writer_type is not None
        wanted = self._pool_size(pooled, gpus, cluster_gpus)
        # spread over the cluster's nodes: one trainer per node (or GPU) before two share one
        # A killed trainer is restarted and its call retried: a pool trainer's call is a pure function
        # of (batch, position); a shared-state trainer restarts blank and the retried call fails its
        # version check, which starts a recovery from the last snapshot.
        options = dict(num_cpus=self.cfg.trainer_cpus, num_gpus=gpus, max_restarts=self.cfg.max_actor_restarts,
                       max_task_retries=self.cfg.max_actor_restarts, scheduling_strategy="SPREAD")
        args = (config, "cuda" if gpus else None, max(1, int(self.cfg.trainer_cpus)))
        trainer = ray.remote(TrainerActor).options(**options)
        launched = [trainer.remote(*args) for _ in range(wanted)]
        writer = ray.remote(WriterActor).options(num_cpus=0, max_restarts=self.cfg.max_actor_restarts).remote(
            config) if pooled else None
        info: TrainerInfo = ray.get(launched[0].info.remote())
        trainers = [launched[0]] + self._placed(launched[1:])
        log.info("%s: %d trainer(s) on %s%s", info.editor, len(trainers), info.device,
                 ", one writer" if writer is not None else "")
        return _Actors(trainers, writer, info)

    def _pool_size(self, pooled: bool, gpus: int, cluster_gpus: int) -> int:
        """How many trainers to start: `pipeline.trainers`, unless the editor's batches share state or
        the cluster has no room for them."""
        import ray

        wanted = self.cfg.trainers
        if wanted > 1 and not pooled:
            log.warning("pipeline.trainers=%d: the '%s' editor's batches edit shared state (each trains on the "
                        "last), so they cannot train at once; using one trainer", wanted, self.config.editor)
            return 1
        free = ray.cluster_resources().get("CPU", 0) - self.cfg.trainer_cpus  # the first trainer holds its CPUs
        fit = 1 + int(max(0.0, free - READER_CPUS) // self.cfg.trainer_cpus) if not gpus else wanted
        if wanted > fit:
            # Ray Data's parquet reader samples the files with one-CPU tasks: trainers holding every CPU
            # of the cluster would stall the stream that feeds them
            log.warning("pipeline.trainers=%d x trainer_cpus=%s leave no CPU for reading the stream on this "
                        "cluster; using %d trainers", wanted, self.cfg.trainer_cpus, fit)
            wanted = fit
        if gpus and wanted > cluster_gpus:
            log.warning("pipeline.trainers=%d but the cluster has %d GPUs; using %d trainers", wanted,
                        cluster_gpus, cluster_gpus)
            wanted = cluster_gpus
        return wanted

    def _placed(self, extra: list[Any]) -> list[Any]:
        """The extra trainers that start within `pipeline.trainer_start_s`: a cluster without room for
        all of them (resources per node, not in total, decide) gets a smaller pool, not a hang."""
        import ray

        if not extra:
            return []
        refs = [t.info.remote() for t in extra]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=self.cfg.trainer_start_s)
        placed = set(ready)
        started = [t for t, ref in zip(extra, refs) if ref in placed]
        if pending:
            log.warning("%d of %d trainers could not be placed within %.0f s; going on with %d",
                        len(pending), len(extra) + 1, self.cfg.trainer_start_s, len(started) + 1)
            for trainer in extra:
                if trainer not in started:
                    ray.kill(trainer, no_restart=True)
        return started

    def _actors_alive(self) -> bool:
        import ray

        if self.actors is None:
            return False
        try:
            writer = [self.actors.writer.peak_rss_bytes.remote()] if self.actors.writer is not None else []
            ray.get([t.info.remote() for t in self.actors.trainers] + writer, timeout=600)
            return True
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return False

    def _restore_actors(self, version: int | None) -> int:
        """The stateful actor back to `version` (None: the base model); returns its version."""
        import ray

        assert self.actors is not None
        writer, layout = self.actors.writer, self.actors.info.layout
        if version is None:
            return ray.get(writer.reset.remote(layout) if writer is not None else self.actors.trainers[0].reset.remote())
        manifest, files = self.store.read(version)
        if manifest.get("base_checksum") != self.actors.info.base_checksum:
            raise SnapshotError(f"{self.store.uri} v{version}: made on other base weights than this job's backbone")
        check_editor(manifest.get("editor"), self.config.editor, f"{self.store.uri} v{version}",
                     "this job runs the latter: use another --out")
        files_ref = ray.put(files)
        return ray.get(writer.restore.remote(layout, manifest, files_ref) if writer is not None
                       else self.actors.trainers[0].restore.remote(manifest, files_ref))

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> JobSummary:
        if self.state.status == "completed":
            log.info("job %s already completed; nothing to do", self.job_id)
            return self._summary()
        init_ray()
        with self.store.writing(f"job:{self.job_id}") as self.lease:  # one writer: a revert waits for us
            return self._run_tracked()

    def _run_tracked(self) -> JobSummary:
        import ray

        self.tracker = JobTracker(self.config, self.store, self.job_id, self.state.mlflow_run_id)
        self.state.mlflow_run_id = self.tracker.run_id
        self.state.status, self.state.error = "running", None  # a resumed job's old failure is history
        _save_state(self.store, self.state)
        try:
            for attempt in range(self.cfg.max_attempts):
                try:
                    self._run_from_latest()
                    break
                except (ray.exceptions.RayActorError, StaleStateError) as exc:
                    self.state.recoveries += 1
                    log.warning("actor failure (%s); recovering from the last snapshot (attempt %d)",
                                type(exc).__name__, attempt + 1)
                    self.tracker.log_metrics({"recoveries": self.state.recoveries}, step=self.state.batches)
            else:
                raise JobError(f"job '{self.job_id}': gave up after {self.cfg.max_attempts} recoveries; "
                               "run the same command again to resume")
        except BaseException as exc:
            self.state.status = "failed"
            self.state.error = f"{type(exc).__name__}: {exc}"
            try:
                _save_state(self.store, self.state)
            except OSError as unsaved:  # the store is what failed: the error raised below says more
                log.warning("job %s: could not record the failure in the store: %s", self.job_id, unsaved)
            self.tracker.end("FAILED" if not isinstance(exc, KeyboardInterrupt) else "KILLED")
            raise
        finally:
            self._stop_actors()  # give their CPUs/GPU back, whatever happened
        self._finish()
        return self._summary()

    def _stop_actors(self) -> None:
        import ray

        if self.actors is None:
            return
        for actor in self.actors.all():
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors = None

    def _run_from_latest(self) -> None:
        version, rows_done = self._committed_progress()
        # Ray Data starts reading while the actors start and restore, instead of after them
        with ReadAhead(self.source.rows(rows_done, self.cfg.read_rows), depth=self.cfg.read_rows) as rows:
            if not self._actors_alive():
                self._stop_actors()  # whatever is left of the old ones gives its CPUs/GPUs back first
                self.actors = self._start_actors()
            self._run_restored(rows, self._restore_actors(version), rows_done)

    def _run_restored(self, rows: Iterator[tuple[int, dict[str, Any]]], version: int, rows_done: int) -> None:
        """Train, commit and publish the stream's `rows` (from `rows_done` on) on actors restored to
        `version`: batches are queued on the actors without waiting (BatchQueue), waited for oldest first
        within a window (InFlightWindow), and committed in stream order on one thread (CommitPublisher)."""
        from tqdm import tqdm

        rejects = _load_rejects(self.store, self.job_id, rows_done)
        self.state.rows_done = rows_done
        self.state.rejected = len(rejects)
        clock = _JobClock(time.perf_counter(), self.state.seconds)
        bar = tqdm(total=self.source.num_rows, initial=rows_done, desc=f"job {self.job_id}", unit="row",
                   disable=not self.progress)
        queue = BatchQueue(self.actors, version, self.cfg.snapshot_every, self._snapshot_parts)
        window = InFlightWindow.for_pool(self.cfg.inflight_batches, len(self.actors.trainers))
        last_row = rows_done - 1
        with CommitPublisher(self, bar, clock) as publisher:
            for batch in self._batches(rows, rows_done, rejects, self.actors.info.labels):
                last_row = batch.last_row
                if batch.records:
                    for item in window.push(queue.submit(batch)):
                        publisher.finish(item, rejects)
            for item in window.drain():
                publisher.finish(item, rejects)
        if queue.unpublished:  # batches after the last publish point (snapshot_every > 1)
            self._publish(queue.version, last_row + 1, rejects, True, self._snapshot_parts())
        else:  # rows after the last batch (e.g. only rejects) still count as read
            self._record_progress(last_row + 1, rejects)
        bar.close()
        self.state.seconds = clock.seconds()

    def _batches(self, rows: Iterator[tuple[int, dict[str, Any]]], rows_done: int, rejects: list[dict[str, Any]],
                 labels: tuple[str, ...] | None) -> Iterator[StreamBatch]:
        """The stream's `rows` (from `rows_done` on), validated, in batches; bad rows go to `rejects`.
        The last batch is `final` (it may hold no records: rows after the last full batch were rejects)."""
        pending: list[EditRecord] = []
        last_row = rows_done - 1
        for row, raw in rows:
            last_row = row
            try:
                record = parse_record(raw, self.source.uri, row)
                if labels is not None and (problem := label_error(labels, record.target)):
                    raise RecordError(self.source.uri, row, "target", problem)
                if too_long := length_error(record, self.config.train.max_text_chars):
                    raise RecordError(self.source.uri, row, *too_long)
            except RecordError as exc:
                rejects.append({"row": row, "field": exc.field, "reason": exc.reason, "record": raw})
                continue
            pending.append(record)
            if len(pending) == self.batch_size:
                yield StreamBatch(pending, row, final=False)
                pending = []
        yield StreamBatch(pending, last_row, final=True)

    def _snapshot_parts(self) -> list[Any]:
        """Refs to the stateful actor's files and counters, queued now: they hold the state as of the
        calls already queued on it, whatever is queued after them."""
        stateful = self.actors.stateful
        return [stateful.files.remote(), stateful.stats.remote()]

    def _publish(self, version: int, rows_done: int, rejects: list[dict[str, Any]], final: bool,
                 parts_refs: list[Any]) -> None:
        """The commit point, retried (each step is idempotent) while the store cannot be reached."""
        retries, wait = self.cfg.publish_retries, self.cfg.publish_backoff_s
        for attempt in range(retries + 1):
            try:
                return self._publish_once(version, rows_done, rejects, final, parts_refs)
            except (FencedError, StoreBusyError):
                raise  # another writer holds the store: retrying cannot help
            except (OSError, SnapshotError) as exc:
                if not _unreachable(exc):
                    raise
                if attempt == retries:
                    raise JobError(
                        f"job '{self.job_id}': could not publish version {version} to {self.store.uri} after "
                        f"{retries + 1} tries: {exc}. Nothing partial was published (LATEST.json names v"
                        f"{self._latest_or_unknown()}); run the same command again to resume") from exc
                log.warning("job %s: publishing version %d failed (%s); retry %d of %d in %.1f s", self.job_id,
                            version, exc, attempt + 1, retries, wait)
                time.sleep(wait)
                wait *= 2

    def _latest_or_unknown(self) -> str:
        try:
            return str(self.store.latest_version())
        except (OSError, SnapshotError):
            return "? (unreachable)"

    def _publish_once(self, version: int, rows_done: int, rejects: list[dict[str, Any]], final: bool,
                      parts_refs: list[Any]) -> None:
        """Rejects first (idempotent), then the snapshot version (fenced by the lease), then job state."""
        import ray

        _save_rejects(self.store, self.job_id, [r for r in rejects if r["row"] < rows_done])
        files, stats = ray.get(parts_refs)
        meta = SnapshotMeta(self.config.editor, version, self.config.model_dump(mode="json"),
                            self.actors.info.base_checksum, stats,
                            {"job": {"id": self.job_id, "rows_done": rows_done, "final": final,
                                     "edits_uri": self.source.uri, "fingerprint": self.source.fingerprint}}).as_json()
        started = time.perf_counter()
        self.store.publish(version, files, meta, lease=self.lease)
        self.last_publish_seconds = time.perf_counter() - started
        self.state.edits_applied = stats["edits"] - self.state.edits_before
        self.state.last_version = version
        self.state.published += 1
        self._record_progress(rows_done, rejects)

    def _record_progress(self, rows_done: int, rejects: list[dict[str, Any]]) -> None:
        kept = [r for r in rejects if r["row"] < rows_done]
        _save_rejects(self.store, self.job_id, kept)
        self.state.rows_done = rows_done
        self.state.rejected = len(kept)
        _save_state(self.store, self.state)

    def _finish(self) -> None:
        state = self.state
        state.status = "completed"
        minutes = state.seconds / 60
        applied = state.edits_applied
        state.edits_per_min = applied / minutes if minutes > 0 else 0.0
        _save_state(self.store, state)
        summary = {"edits_per_min": state.edits_per_min, "edits_applied": applied,
                   "rejected": state.rejected, "batches": state.batches, "recoveries": state.recoveries}
        self.tracker.log_metrics(summary, step=state.last_version or 0)
        if state.last_version is not None:
            self.tracker.log_dict(self.store.read_manifest(state.last_version), "snapshot_manifest.json")
        self.tracker.log_dict(asdict(state), "job_state.json")
        self.tracker.log_metric_plots(PLOTTED_METRICS, "job_metrics.png")
        self.tracker.end()

    def _summary(self) -> JobSummary:
        stats = {}
        if self.state.last_version is not None:
            stats = self.store.read_manifest(self.state.last_version).get("stats", {})
        return JobSummary(state=self.state, rejects_path=f"{self.store.uri.rstrip('/')}/{_rejects_path(self.job_id)}",
                          snapshot_version=self.state.last_version, stats=stats)
