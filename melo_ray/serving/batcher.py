"""A replica's decode thread: requests join the running batch between decode steps, and snapshot
installs happen between batches.

Request handlers (asyncio, in the Serve replica) submit tickets and get their text back through a
callback; the thread admits waiting tickets whenever the batch has free rows (routing all of them in
one call), runs one decode step for every running row, and drops rows that finished or whose client
left. An install stops admission, lets the running rows finish on the version they started with,
swaps the snapshot in, and admission resumes: no request ever sees two versions.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from melo_ray.serving.decoding import DecodeLoop, Sequence
from melo_ray.serving.engine import Completion, CompletionRequest, ServingEngine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Update:
    """Text a request gained since its last update; `completion` is set on the last one."""

    delta: str
    completion: Completion | None = None
    error: str | None = None


@dataclass
class Ticket:
    request: CompletionRequest
    on_update: Callable[[Update], None]
    stream: bool = True  # False: only the final update is sent (no per-token wake-ups of the caller)
    cancelled: bool = False
    sequence: Sequence | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """The client left: the row leaves the batch at the next step."""
        self.cancelled = True
        if self.sequence is not None:
            self.sequence.cancelled = True


class Batcher:
    def __init__(self, engine: ServingEngine, max_batch: int = 32) -> None:
        self.engine = engine
        self.loop = DecodeLoop(engine.editor, max_batch)
        self.cond = threading.Condition()
        self.waiting: list[Ticket] = []
        self.installs: list[tuple[Mapping[str, Any], Mapping[str, bytes], Future]] = []
        self.counters = {"admitted": 0, "finished": 0, "cancelled": 0, "failed": 0, "steps": 0}
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="melo-ray-decode", daemon=True)
        self.thread.start()

    # -- called from request handlers ----------------------------------------------------------------
    def submit(self, request: CompletionRequest, on_update: Callable[[Update], None], *, stream: bool = True) -> Ticket:
        ticket = Ticket(request, on_update, stream)
        with self.cond:
            self.waiting.append(ticket)
            self.cond.notify()
        return ticket

    def install(self, manifest: Mapping[str, Any], files: Mapping[str, bytes]) -> Future:
        """Swap a verified snapshot in once the running rows have finished (a Future of None)."""
        done: Future = Future()
        with self.cond:
            self.installs.append((manifest, files, done))
            self.cond.notify()
        return done

    def stats(self) -> dict[str, int]:
        with self.cond:
            return {"running": len(self.loop.rows), "waiting": len(self.waiting), **self.counters}

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()

    # -- the decode thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cond:
                while not (self.stopped or self.waiting or self.loop.rows or self.installs):
                    self.cond.wait()
                if self.stopped:
                    return
                install = self.installs.pop(0) if self.installs and not self.loop.rows else None
                admit: list[Ticket] = []
                if install is None and not self.installs:  # an install waiting: let the batch drain first
                    admit, self.waiting = self.waiting[: self.loop.free], self.waiting[self.loop.free:]
            if install is not None:
                self._install(*install)
                continue
            try:
                self._admit([t for t in admit if not t.cancelled])
                for ticket in admit:
                    if ticket.cancelled and ticket.sequence is None:
                        self._finish_cancelled(ticket)
                if self.loop.rows:
                    self.loop.step()
                    self.counters["steps"] += 1
            except Exception as exc:  # a failed step fails its rows, never the replica
                log.exception("decode step failed")
                self._fail_running(f"{type(exc).__name__}: {exc}")

    def _install(self, manifest: Mapping[str, Any], files: Mapping[str, bytes], done: Future) -> None:
        try:
            self.engine.install(manifest, files)
        except Exception as exc:  # the replica keeps the version it has
            done.set_exception(exc)
        else:
            done.set_result(None)

    def _admit(self, tickets: list[Ticket]) -> None:
        if not tickets:
            return
        sequences = self.engine.sequences([t.request for t in tickets], emit=self._emitter())
        for ticket, seq in zip(tickets, sequences):
            ticket.sequence = seq
            seq.owner = ticket
        self.counters["admitted"] += len(tickets)
        self.loop.admit(sequences)

    def _emitter(self) -> Callable[[Sequence, str, bool], None]:
        def emit(seq: Sequence, delta: str, finished: bool) -> None:
            ticket: Ticket = seq.owner
            if not (finished or ticket.stream):
                return
            completion = self.engine.completion(ticket.request, seq) if finished else None
            if finished:
                self.counters["cancelled" if seq.finish_reason == "cancelled" else "finished"] += 1
            ticket.on_update(Update(delta, completion))

        return emit

    def _finish_cancelled(self, ticket: Ticket) -> None:
        self.counters["cancelled"] += 1
        ticket.on_update(Update("", error="cancelled before it started"))

    def _fail_running(self, error: str) -> None:
        self.counters["failed"] += len(self.loop.rows)
        for seq in self.loop.rows:
            ticket: Ticket = seq.owner
            ticket.on_update(Update("", error=error))
        self.loop.clear()
