"""What every editor (MELO, and the baselines) offers, so harness, pipeline and server treat them alike."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from melo_ray.records import EditRecord, parse_records


@dataclass(frozen=True)
class Generation:
    prompt: str
    output: str
    block: int | None  # the LoRA block used, None for the base model
    distance: float | None  # distance to the nearest cluster centre, None when the index is empty


@dataclass(frozen=True)
class EditResult:
    edits: int
    block: int
    clusters: int
    conflicts: int
    forgotten: tuple[str, ...]
    steps: int
    final_loss: float
    learned: float
    seconds: float


class Editor(Protocol):
    version: int

    def edit(self, records: Iterable[EditRecord | Mapping[str, Any]]) -> EditResult: ...

    def generate(self, prompts: list[str], max_new_tokens: int | None = None) -> list[Generation]: ...

    def save(self, folder: str | Path) -> dict[str, Any]: ...


def as_records(records: Iterable[EditRecord | Mapping[str, Any]]) -> list[EditRecord]:
    """Accept EditRecords or raw mappings; raw ones are validated (errors name row and field)."""
    items = list(records)
    if all(isinstance(r, EditRecord) for r in items):
        return items  # type: ignore[return-value]
    return [
        r if isinstance(r, EditRecord) else parse_records([r], "edit batch", start=i)[0]
        for i, r in enumerate(items)
    ]
