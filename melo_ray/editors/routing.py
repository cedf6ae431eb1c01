"""What routing decides, as typed data: an index's answer for a batch of keys (`SearchResult`) and an
editor's decision for a batch of prompts (`Routing`), which the routed forward pass, the serving engine
and `explain` read. Plain numpy and dataclasses only, so every layer above can import it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EditIds = tuple["str | None", ...]


@dataclass(frozen=True)
class ScopeDecision:
    """Why one prompt got its block, or none: the rule that decided, the edit it weighed last (the one
    that fired, else the best-scored one it refused), that edit's score and the bar the score had to
    reach, and how many edits were weighed. `explain` and every served answer carry it."""

    rule: str  # one of RULES
    edit_id: str | None = None
    score: float | None = None  # the scope test's logit (+inf: the very prompt; -inf: the names gate refused)
    bar: float | None = None
    considered: int = 0

    # the rules, in the order a query meets them
    RULES = {
        "out_of_reach": "no edit's cluster holds the prompt's key: the base model",
        "inside_radius": "the key lies inside an edit's cluster (no scope test): that edit",
        "names_gate": "every edit in reach names someone else: the base model",
        "below_bar": "no edit in reach scores the bar: the base model",
        "identical_prompt": "the prompt is an edited prompt: that edit",
        "scope_test": "the best-scored edit that reaches the bar",
        "same_names_first": "among edits that reach the bar, one naming exactly whom the prompt names",
        "latest_of_question": "a later edit of the same question, which supersedes the best-scored one",
    }

    def to_json(self) -> dict:
        def number(x: float | None) -> float | str | None:
            return x if x is None or np.isfinite(x) else ("inf" if x > 0 else "-inf")  # JSON has no infinities
        return {"rule": self.rule, "why": self.RULES[self.rule], "edit_id": self.edit_id, "score": number(self.score),
                "bar": number(self.bar), "considered": self.considered}


Decisions = tuple["ScopeDecision | None", ...]


@dataclass(frozen=True)
class SearchResult:
    """An index's answer for n keys, row-aligned."""

    block_ids: np.ndarray  # (n,) int64, -1 where no block applies
    distances: np.ndarray  # (n,) distance to the nearest centre (inf when the index is empty)
    clusters: np.ndarray  # (n,) int64 nearest cluster id, -1 when empty
    edit_ids: EditIds = ()  # (n,) the edit of the member that serves each row, None where no block
    decisions: Decisions = ()  # (n,) why each row got its block; None where the index does not say

    def __post_init__(self) -> None:
        for name in ("edit_ids", "decisions"):
            if getattr(self, name) == () and len(self.block_ids):
                object.__setattr__(self, name, (None,) * len(self.block_ids))
            if len(getattr(self, name)) != len(self.block_ids):
                raise ValueError(f"search result has {len(self.block_ids)} rows but {len(getattr(self, name))} {name}")


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
    decisions: Decisions = ()  # (n,) the scope decision behind each row, None where the editor does not say

    def __post_init__(self) -> None:
        for name in ("edit_ids", "decisions"):
            if getattr(self, name) == () and len(self.ids):
                object.__setattr__(self, name, (None,) * len(self.ids))
        if len(self.edit_ids) != len(self.ids) or len(self.distances) != len(self.ids) or len(self.decisions) != len(self.ids):
            raise ValueError(f"routing rows disagree: {len(self.ids)} ids, {len(self.distances)} distances, "
                             f"{len(self.edit_ids)} edit ids, {len(self.decisions)} decisions")
        if self.keys is not None and len(self.keys) != len(self.ids):
            raise ValueError(f"routing has {len(self.ids)} rows but {len(self.keys)} query keys")

    @classmethod
    def base(cls, rows: int) -> "Routing":
        return cls(np.full(rows, -1, np.int64), np.full(rows, np.nan))

    @classmethod
    def from_search(cls, result: SearchResult) -> "Routing":
        return cls(result.block_ids, result.distances, tuple(result.edit_ids), decisions=tuple(result.decisions))

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
        picked = rows.tolist()
        return Routing(self.ids[rows], self.distances[rows], tuple(self.edit_ids[i] for i in picked), keys,
                       tuple(self.decisions[i] for i in picked))

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
                   tuple(i for p in parts for i in p.edit_ids), keys, tuple(d for p in parts for d in p.decisions))
