"""The scope policy: every setting that acts on a query besides the verifier's own logit, in one frozen,
versioned object. The index writes it whole into each snapshot (`index.json`, key `scope_policy`), and a
snapshot routes by the policy it carries, never by the config that opens it.

What each setting does, in the order a query meets it:
- `focus_reach`: a cluster also holds a query whose last sentence lies inside its radius;
- `threshold`: the verifier's logit an edit must reach (the bar);
- `namesake_bar`, `closest_namesakes`: the bar rises by namesake_bar x ln(k) for the k edits in reach that
  name whom the query names (most closely, or every one from a trigram cosine of 0.5);
- `prefer_same_names`: among edits that pass, those naming exactly whom the query names rank first;
- `latest_of_question`: a rewording goes to the latest edit of its question;
- at write time, `cluster_per_edit` (each edit its own cluster) and `conflict_threshold` (the logit at
  which a new edit supersedes an earlier one; None: only the very prompt does).

Snapshots written before this object carry flat `scope_*` keys, some absent when a rule was off or did not
exist yet; `from_legacy_index_meta` is the one place that reading lives.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

POLICY_VERSION = 1


@dataclass(frozen=True)
class ScopePolicy:
    threshold: float
    conflict_threshold: float | None = None
    latest_of_question: bool = True
    prefer_same_names: bool = True
    namesake_bar: float = 1.0
    closest_namesakes: bool = True
    focus_reach: bool = True
    cluster_per_edit: bool = True
    version: int = POLICY_VERSION

    def __post_init__(self) -> None:
        if self.namesake_bar < 0:
            raise ValueError("scope namesake_bar must be >= 0")
        if self.version != POLICY_VERSION:
            raise ValueError(f"scope policy version {self.version}: this build reads version {POLICY_VERSION}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> "ScopePolicy":
        """Exactly the fields this version writes: a missing or unknown field is an error, not a default."""
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, Mapping) or set(data) != fields:
            got = set(data) if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(f"{where}: scope_policy must have exactly the fields {sorted(fields)}, got {got}")
        if data["version"] != POLICY_VERSION:
            raise ValueError(f"{where}: scope policy version {data['version']}; this build reads {POLICY_VERSION}")
        conflict = data["conflict_threshold"]
        return cls(threshold=float(data["threshold"]), conflict_threshold=None if conflict is None else float(conflict),
                   latest_of_question=bool(data["latest_of_question"]), prefer_same_names=bool(data["prefer_same_names"]),
                   namesake_bar=float(data["namesake_bar"]), closest_namesakes=bool(data["closest_namesakes"]),
                   focus_reach=bool(data["focus_reach"]), cluster_per_edit=bool(data["cluster_per_edit"]))

    @classmethod
    def from_legacy_index_meta(cls, meta: Mapping[str, Any]) -> "ScopePolicy":
        """The policy of a snapshot written before this object: each rule absent from its index.json was
        off (or did not exist yet) when it was written, so it routes as it did then."""
        conflict = meta["scope_conflict_threshold"]
        return cls(threshold=float(meta["scope_threshold"]), conflict_threshold=None if conflict is None else float(conflict),
                   latest_of_question=bool(meta.get("scope_latest_of_question", False)),
                   prefer_same_names=bool(meta.get("scope_prefer_same_names", False)),
                   namesake_bar=float(meta.get("scope_namesake_bar", 0.0)),
                   closest_namesakes=bool(meta.get("scope_closest_namesakes", False)),
                   focus_reach=bool(meta.get("scope_focus_reach", False)),
                   cluster_per_edit=bool(meta.get("scope_cluster_per_edit", False)))

    @classmethod
    def from_index_meta(cls, meta: Mapping[str, Any], where: str) -> "ScopePolicy":
        if "scope_policy" in meta:
            return cls.from_json(meta["scope_policy"], where)
        return cls.from_legacy_index_meta(meta)
