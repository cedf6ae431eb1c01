"""A replica's view of its store: what to install next, refused versions, and staleness it reports."""
from melo_ray.serving.follower import SnapshotFollower


class FakeStore:
    def __init__(self) -> None:
        self.version: int | None = 1
        self.down = False

    def serving_version(self) -> int | None:
        if self.down:
            raise OSError("connection refused")
        return self.version


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_follower_names_the_next_version_and_how_stale_the_replica_is():
    store, clock = FakeStore(), Clock()
    follower = SnapshotFollower(store, clock)
    assert follower.freshness(None).seconds_since_good_poll is None  # never polled yet
    follower.started(None)  # an empty store at start-up counts as a good poll
    assert follower.freshness(None).seconds_since_good_poll == 0.0 and not follower.freshness(None).behind
    assert follower.poll(serving=None) == 1
    follower.installed()
    assert follower.poll(serving=1) is None
    fresh = follower.freshness(1)
    assert (fresh.serving_version, fresh.latest_seen, fresh.behind, fresh.store_reachable) == (1, 1, False, True)

    store.version = 2  # a new version that fails verification: refused once, never tried again
    assert follower.poll(serving=1) == 2
    follower.refuse(2, "checksum mismatch in bank.safetensors")
    assert follower.poll(serving=1) is None
    stale = follower.freshness(1)
    assert stale.behind and stale.latest_seen == 2 and stale.refused_versions == (2,)
    assert "checksum mismatch" in stale.last_error

    clock.now += 30  # the store goes away for 30 s: the replica keeps its version and says so
    store.down = True
    assert follower.poll(serving=1) is None
    down = follower.freshness(1)
    assert not down.store_reachable and down.seconds_since_good_poll == 30.0 and "unreachable" in down.last_error
    assert down.serving_version == 1 and down.latest_seen == 2  # what it knew before the outage

    store.down, store.version = False, 3  # back, with a good version
    assert follower.poll(serving=1) == 3
    follower.installed()
    back = follower.freshness(3)
    assert back.store_reachable and not back.behind and back.seconds_since_good_poll == 0.0 and back.last_error is None
    assert back.as_json()["refused_versions"] == [2]


def test_a_replica_started_after_a_bad_publish_serves_the_newest_version_that_verifies(tmp_path):
    from conftest import fact_records, tiny_config
    from melo_ray.editors.melo.editor import MeloEditor
    from melo_ray.serving.app import ServeSettings, start_engine
    from melo_ray.store import SnapshotStore

    store = SnapshotStore(tmp_path / "store")
    editor = MeloEditor(tiny_config())
    for start in (0, 3):
        editor.edit(fact_records(start, 3))
        editor.publish(store)
    files = store.read_manifest(2)["files"]
    path = f"{store.version_path(2)}/{max(files, key=lambda n: files[n]['bytes'])}"
    data = bytearray(store.fs.open_input_stream(path).read())
    data[len(data) // 2] ^= 0xFF  # corrupted after it was written and published
    with store.fs.open_output_stream(path) as stream:
        stream.write(bytes(data))
    start = start_engine(ServeSettings(snapshots=str(store.root)))
    assert start.engine.version == 1 and list(start.refused) == [2] and "checksum" in start.refused[2]


def test_a_read_that_could_not_reach_the_store_is_retried_and_a_bad_file_is_refused():
    from melo_ray.serving.app import _unreachable
    from melo_ray.snapshots import SnapshotError

    def failed(cause: BaseException | None) -> SnapshotError:
        try:
            try:
                if cause is not None:
                    raise cause
                raise SnapshotError("v3/bank.safetensors: checksum mismatch")
            except OSError as exc:
                raise SnapshotError("v3/bank.safetensors: missing or unreadable") from exc
        except SnapshotError as error:
            return error

    assert _unreachable(failed(ConnectionError("connection refused")))  # tried again at the next poll
    assert _unreachable(failed(OSError("AWS Error NETWORK_CONNECTION")))
    assert not _unreachable(failed(FileNotFoundError("no such file")))  # the version lacks a file: refused
    assert not _unreachable(failed(None))  # a checksum mismatch: refused
