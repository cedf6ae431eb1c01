"""The job reads its stream ahead on a thread (pipelines/bulk_edit/source.py: ReadAhead): rows come
out in order, a reading error surfaces where the job reads, and closing early lets the thread go."""
from __future__ import annotations

import threading

import pytest

from pipelines.bulk_edit.source import ReadAhead


def test_rows_come_out_in_order_and_reading_starts_before_anyone_asks():
    started = threading.Event()

    def rows():
        started.set()
        yield from range(100)

    reader = ReadAhead(rows(), depth=4)
    assert started.wait(timeout=30)  # the thread began reading on its own
    with reader:
        assert list(reader) == list(range(100))


def test_an_error_while_reading_is_raised_where_the_rows_are_read():
    def rows():
        yield 1
        raise OSError("the store went away")

    with ReadAhead(rows(), depth=2) as reader, pytest.raises(OSError, match="went away"):
        for _ in reader:
            pass


def test_closing_early_stops_the_thread_after_at_most_one_more_row():
    produced = []
    finished = threading.Event()

    def rows():
        try:
            for i in range(10_000):
                produced.append(i)
                yield i
        finally:
            finished.set()

    reader = ReadAhead(rows(), depth=2)
    first = next(iter(reader))
    reader.close()
    assert finished.wait(timeout=30)  # the generator was let go, not left blocked on a full queue
    assert first == 0 and len(produced) <= 2 + 2 + 1  # the queue's depth, the row in hand, one more
