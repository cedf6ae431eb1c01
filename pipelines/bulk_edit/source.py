"""The edit stream: Parquet rows from a path or URI, in order, through Ray Data.

Before anything runs, every file's footer is read (pyarrow.dataset), so a file that cannot be read
fails the job up front with no snapshot touched; this also gives the row count for progress and a
fingerprint that a resumed job must match.
"""
from __future__ import annotations

import hashlib
import json
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from melo_ray.records import RecordError
from melo_ray.store import resolve_uri


@dataclass(frozen=True)
class EditSource:
    uri: str
    files: tuple[str, ...]
    rows_per_file: tuple[int, ...]
    schemas: tuple[str, ...]
    fingerprint: str

    @property
    def num_rows(self) -> int:
        return sum(self.rows_per_file)

    @classmethod
    def open(cls, uri: str) -> "EditSource":
        try:
            fs, path = resolve_uri(uri)
            files = tuple(sorted(pads.dataset(path, filesystem=fs, format="parquet").files))
            if not files:
                raise RecordError(uri, None, None, "no Parquet files found")
            rows, schemas = [], []
            for name in files:  # every footer, so a broken file fails here
                with fs.open_input_file(name) as handle:
                    meta = pq.ParquetFile(handle)
                    rows.append(meta.metadata.num_rows)
                    schemas.append(str(meta.schema_arrow))
            sizes = [info.size for info in fs.get_file_info(list(files))]
        except RecordError:
            raise
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise RecordError(uri, None, None, f"cannot read the edit stream: {exc}") from exc
        digest = hashlib.sha256(json.dumps([list(files), sizes, rows, schemas]).encode())
        return cls(uri=uri, files=files, rows_per_file=tuple(rows), schemas=tuple(schemas),
                   fingerprint=digest.hexdigest())

    def _runs(self) -> list[tuple[list[str], int]]:
        """Consecutive files with one schema (one Ray dataset each), with the row number they start at."""
        runs: list[tuple[list[str], int]] = []
        row = 0
        for i, (name, count) in enumerate(zip(self.files, self.rows_per_file)):
            if runs and self.schemas[i] == self.schemas[i - 1]:
                runs[-1][0].append(name)
            else:
                runs.append(([name], row))
            row += count
        return runs

    def rows(self, start: int, read_rows: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(row number, raw row) from `start` on, in file order, streamed by Ray Data."""
        import ray.data

        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # edits must apply in the order given
        context.enable_progress_bars = False  # the job draws its own
        fs, _ = resolve_uri(self.uri)
        runs = self._runs()
        for i, (names, first_row) in enumerate(runs):
            end = runs[i + 1][1] if i + 1 < len(runs) else self.num_rows
            if end <= start:
                continue  # already committed by an earlier run
            row = first_row
            # reading is light next to training: it reserves no CPU, so a trainer pool that holds
            # every CPU of the cluster cannot starve the stream that feeds it
            dataset = ray.data.read_parquet(names, filesystem=fs, num_cpus=0)
            for table in dataset.iter_batches(batch_size=read_rows, batch_format="pyarrow"):
                if row + table.num_rows <= start:
                    row += table.num_rows
                    continue
                for raw in table.to_pylist():
                    if row >= start:
                        yield row, raw
                    row += 1


_END = object()


class ReadAhead:
    """Iterates `items` on a thread from the moment it is made, up to `depth` items ahead: the job's
    first rows are read (Ray Data starts its read tasks) while its actors start, not after them.
    Closing it lets the thread stop after at most one more item."""

    def __init__(self, items: Iterable[Any], depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(items,), name="stream-read-ahead", daemon=True)
        self._thread.start()

    def _fill(self, items: Iterable[Any]) -> None:
        try:
            for item in items:
                self._queue.put((item, None))
                if self._stop.is_set():
                    return
            self._queue.put((_END, None))
        except BaseException as exc:  # handed to the reader, which raises it where it reads
            self._queue.put((_END, exc))
        finally:  # a generator stopped early (a Ray Data read) ends here, not whenever it is collected
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator[Any]:
        while True:
            item, error = self._queue.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        while True:  # a full queue would hold the thread in put() forever
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
