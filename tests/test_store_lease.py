"""The writer lease and its fencing, on a local store and on an S3-compatible server (moto).

Exactly one of several writers that start at the same moment gets the lease; a writer whose lease
was broken can never move LATEST.json again, even when it is broken in the middle of its publish."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from melo_ray.snapshots import SnapshotError
from melo_ray.store import FencedError, Lease, SnapshotStore, StoreBusyError


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_env").new_prefix()


def publish(store: SnapshotStore, version: int, lease: Lease | None = None, text: str = "x") -> dict:
    return store.publish(version, {"a.bin": f"{text}{version}".encode() * 10, "b.json": b"{}"}, {"version": version},
                         lease=lease)


def wait_for(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_of_writers_that_start_at_the_same_moment_exactly_one_proceeds(store_uri):
    publish(SnapshotStore(store_uri), 1)
    n = 8
    start, done = threading.Barrier(n), threading.Event()
    outcome: dict[int, Lease | Exception] = {}

    def writer(i: int) -> None:
        store = SnapshotStore(store_uri)
        start.wait()
        try:
            with store.writing(f"job:w{i}") as lease:
                outcome[i] = lease
                done.wait(60)
        except StoreBusyError as exc:
            outcome[i] = exc

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(outcome) == n)
        leases = [o for o in outcome.values() if isinstance(o, Lease)]
        assert len(leases) == 1
        winner = leases[0]
        refused = [str(o) for o in outcome.values() if not isinstance(o, Lease)]
        assert len(refused) == n - 1
        for message in refused:  # each names the holder: job id and host
            assert f"'{winner.owner}' is writing" in message and socket.gethostname() in message
        assert publish(SnapshotStore(store_uri), 2, winner)["version"] == 2
    finally:
        done.set()
        for thread in threads:
            thread.join()
    store = SnapshotStore(store_uri)
    assert store.writer() is None and store.latest_version() == 2


def test_a_writer_whose_lease_was_broken_can_never_publish_again(store_uri):
    store = SnapshotStore(store_uri)
    publish(store, 1)
    with store.writing("job:old") as old:
        publish(store, 2, old)
        with pytest.raises(StoreBusyError, match="job:old"):  # not without --break-lock
            with SnapshotStore(store_uri).writing("melo-ray store rollback"):
                pass
        operator = SnapshotStore(store_uri)
        with operator.writing("melo-ray store rollback", take_over=True) as new:
            assert new.epoch > old.epoch
            publish(operator, 3, new, text="operator")
        for version in (3, 4):  # neither a version already taken nor a newer one
            with pytest.raises(FencedError, match=r"'job:old' \(epoch \d+\) was broken"):
                publish(store, version, old, text="old")
        with pytest.raises(FencedError):  # nor after the new holder let go
            publish(store, 5, old, text="old")
    manifest, files = store.read()
    assert manifest["version"] == 3 and files["a.bin"] == b"operator3" * 10
    assert store.versions() == [1, 2, 3]  # the fenced writer left no folder at all


def test_a_lease_broken_in_the_middle_of_a_publish_moves_nothing_and_mixes_no_files(store_uri, monkeypatch):
    """Both writers write version 2; the old one is broken after writing its files, before LATEST."""
    store = SnapshotStore(store_uri)
    publish(store, 1)
    write_files = store._write_version

    def write_then_lose_the_lease(*args, **kwargs):
        write_files(*args, **kwargs)
        operator = SnapshotStore(store_uri)
        with operator.writing("melo-ray store rollback", take_over=True) as new:
            publish(operator, 2, new, text="operator")

    monkeypatch.setattr(store, "_write_version", write_then_lose_the_lease)
    with store.writing("job:old") as old:
        with pytest.raises(FencedError, match="'job:old'"):
            publish(store, 2, old, text="old")
    reader = SnapshotStore(store_uri)
    manifest, files = reader.read()
    assert manifest["version"] == 2 and files["a.bin"] == b"operator2" * 10  # verified: no file of the old one
    with reader.writing("job:next") as lease:
        publish(reader, 3, lease)
    # the loser's folder was written, never named by LATEST.json, and pruned
    assert sorted(f[0] for f in reader._folders()) == [1, 2, 3]
    assert reader.read(2)[1]["a.bin"] == b"operator2" * 10


def test_a_publish_without_the_lease_is_refused_while_a_writer_holds_it(store_uri):
    store = SnapshotStore(store_uri)
    publish(store, 1)
    with store.writing("job:nightly"):
        with pytest.raises(StoreBusyError, match="job:nightly"):
            publish(SnapshotStore(store_uri), 2)
    assert publish(store, 2)["version"] == 2


def test_a_retried_publish_whose_answer_was_lost_is_not_an_error(store_uri):
    store = SnapshotStore(store_uri)
    with store.writing("job:a") as lease:
        first = publish(store, 1, lease)
        assert publish(store, 1, lease) == first  # same version, same content: already there
        with pytest.raises(SnapshotError, match="not newer"):
            publish(store, 1, lease, text="other")
