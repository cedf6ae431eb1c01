"""How a replica follows its snapshot store: which version to install next, and what it can say about
being behind (the store has a newer version it has not installed, or it cannot reach the store).

Plain and synchronous: the Serve deployment calls `poll()` from a worker thread on its own schedule,
and reads `freshness()` for /v1/version and /healthz. A version that fails verification is refused
once and never tried again; the replica keeps serving its last verified version meanwhile."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from melo_ray.store import SnapshotFolder, SnapshotStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Freshness:
    """What a replica knows about its own staleness (JSON in /v1/version and /healthz)."""

    serving_version: int | None  # installed and answering (None: the base model)
    latest_seen: int | None  # the newest version the store named at the last good poll (a pin counts)
    seconds_since_good_poll: float | None  # None: no poll has succeeded yet
    behind: bool  # the store names a version this replica does not serve
    store_reachable: bool  # the last poll reached the store
    last_error: str | None  # why the last poll or install failed, if it did
    refused_versions: tuple[int, ...]  # versions that failed verification and will not be installed

    def as_json(self) -> dict:
        return {**asdict(self), "refused_versions": list(self.refused_versions)}


class SnapshotFollower:
    """The polling state of one replica: latest version seen, refused versions, the last good poll."""

    def __init__(self, source: SnapshotStore | SnapshotFolder, clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.clock = clock
        self.latest_seen: int | None = None
        self.last_good_poll: float | None = None
        self.reachable = True
        self.last_error: str | None = None
        self.refused: set[int] = set()

    def started(self, serving: int | None) -> None:
        """The replica has just read `serving` from the store (None: the store was empty)."""
        self.latest_seen, self.last_good_poll, self.reachable = serving, self.clock(), True

    def poll(self, serving: int | None) -> int | None:
        """Ask the store which version to serve; the version to install now (None: nothing to do).

        Never raises for an unreachable store: it is recorded, and the replica keeps serving."""
        try:
            latest = self.source.serving_version()  # a store's PIN.json wins over LATEST
        except Exception as exc:  # network, permissions, a half-written pointer: keep serving what we have
            self.reachable, self.last_error = False, f"store unreachable: {exc}"
            log.warning("snapshot store %s unreachable: %s", getattr(self.source, "uri", self.source), exc)
            return None
        self.reachable, self.last_good_poll, self.latest_seen = True, self.clock(), latest
        if latest is None or latest == serving or latest in self.refused:
            if latest not in self.refused:
                self.last_error = None
            return None
        return latest

    def refuse(self, version: int, reason: str) -> None:
        """A version that failed verification: never installed, and said so."""
        self.refused.add(version)
        self.last_error = f"version {version} refused: {reason}"
        log.error("refusing snapshot version %s: %s", version, reason)

    def installed(self) -> None:
        self.last_error = None

    def freshness(self, serving: int | None) -> Freshness:
        since = None if self.last_good_poll is None else round(self.clock() - self.last_good_poll, 3)
        return Freshness(
            serving_version=serving, latest_seen=self.latest_seen, seconds_since_good_poll=since,
            behind=self.latest_seen is not None and self.latest_seen != serving, store_reachable=self.reachable,
            last_error=self.last_error, refused_versions=tuple(sorted(self.refused)),
        )
