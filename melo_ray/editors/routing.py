"""What routing decides, as typed data: an index's answer for a batch of keys (`SearchResult`) and an
editor's decision for a batch of prompts (`Routing`), which the routed forward pass, the serving engine
and `explain` read. Plain numpy and dataclasses only, so every layer above can import it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EditIds = tuple["str | None", ...]


@dataclass(frozen=True)
class SearchResult:
    """An index's answer for n keys, row-aligned."""

    block_ids: np.ndarray  # (n,) int64, -1 where no block applies
    distances: np.ndarray  # (n,) distance to the nearest centre (inf when the index is empty)
    clusters: np.ndarray  # (n,) int64 nearest cluster id, -1 when empty
    edit_ids: EditIds = ()  # (n,) the edit of the member that serves each row, None where no block

    def __post_init__(self) -> None:
        if self.edit_ids == () and len(self.block_ids):
            object.__setattr__(self, "edit_ids", (None,) * len(self.block_ids))
        if len(self.edit_ids) != len(self.block_ids):
            raise ValueError(f"search result has {len(self.block_ids)} rows but {len(self.edit_ids)} edit ids")


@dataclass(frozen=True)
class Routing:
    """Per prompt of one batch: what applies (`ids`, -1: none, the exact base model), the distance behind
    that decision (nan: not known), the edit behind each routed row (None where the editor cannot tell
    or no edit applies), and the query keys an editor's routed pass feeds its layers (ELDER's router;
    None for editors that need none)."""

    ids: np.ndarray  # (n,) int64
    distances: np.ndarray  # (n,) float
    edit_ids: EditIds = ()  # (n,)
    keys: np.ndarray | None = None  # (n, key_dim) float32

    def __post_init__(self) -> None:
        if self.edit_ids == () and len(self.ids):
            object.__setattr__(self, "edit_ids", (None,) * len(self.ids))
        if len(self.edit_ids) != len(self.ids) or len(self.distances) != len(self.ids):
            raise ValueError(f"routing rows disagree: {len(self.ids)} ids, {len(self.distances)} distances, "
                             f"{len(self.edit_ids)} edit ids")
        if self.keys is not None and len(self.keys) != len(self.ids):
            raise ValueError(f"routing has {len(self.ids)} rows but {len(self.keys)} query keys")

    @classmethod
    def base(cls, rows: int) -> "Routing":
        return cls(np.full(rows, -1, np.int64), np.full(rows, np.nan))

    @classmethod
    def from_search(cls, result: SearchResult) -> "Routing":
        return cls(result.block_ids, result.distances, tuple(result.edit_ids))

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, i: int) -> tuple[int | None, float | None, str | None]:
        """(what applies or None, the distance or None, the edit id or None) of one row."""
        chosen, distance = int(self.ids[i]), float(self.distances[i])
        fires = chosen >= 0
        return (chosen if fires else None, distance if np.isfinite(distance) else None,
                self.edit_ids[i] if fires else None)

    def take(self, rows: list[int] | np.ndarray) -> "Routing":
        """The routing of some rows, in the given order."""
        rows = np.asarray(rows, dtype=np.int64)
        keys = None if self.keys is None else self.keys[rows]
        return Routing(self.ids[rows], self.distances[rows], tuple(self.edit_ids[i] for i in rows.tolist()), keys)

    @classmethod
    def concat(cls, parts: list["Routing"]) -> "Routing":
        """Rows of several routings as one batch (rows without keys get zeros where others have some)."""
        if not parts:
            return cls.base(0)
        with_keys = [p.keys for p in parts if p.keys is not None]
        keys = None
        if with_keys:
            width = with_keys[0].shape[1:]
            keys = np.concatenate([p.keys if p.keys is not None else np.zeros((len(p), *width), np.float32)
                                   for p in parts])
        return cls(np.concatenate([p.ids for p in parts]), np.concatenate([p.distances for p in parts]),
                   tuple(i for p in parts for i in p.edit_ids), keys)
