"""The edit log: every applied edit by id (oldest first), as `melo-ray edits list` shows it, kept in
each snapshot as `edits.json`."""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from melo_ray.editors.messages import TrainedBatch
from melo_ray.records import EditRecord
from melo_ray.snapshots import SnapshotError

EDIT_LOG = "edits.json"


@dataclass(frozen=True)
class EditEntry:
    """One applied edit, as `melo-ray edits list` shows it."""

    id: str
    prompt: str
    target: str
    version: int  # the snapshot version that added it
    block: int | None = None  # MELO: its LoRA block


def edit_log_files(entries: Iterable[EditEntry]) -> dict[str, bytes]:
    """The snapshot file of an edit log (oldest first)."""
    return {EDIT_LOG: json.dumps({"edits": [vars(e) for e in entries]}, sort_keys=True, ensure_ascii=False).encode()}


def log_batch(edit_log: dict[str, EditEntry], trained: TrainedBatch, records: Iterable[EditRecord] | None = None) -> None:
    """Enter a committed batch's edits in an edit log (an id edited again moves to the end)."""
    blocks = dict(zip(trained.ids, trained.edit_blocks(), strict=True))
    rows = ([(r.id, r.prompt, r.target) for r in records if r.id in blocks] if records is not None
            else list(zip(trained.ids, trained.prompts, trained.targets, strict=True)))
    for edit_id, prompt, target in rows:
        edit_log.pop(edit_id, None)
        edit_log[edit_id] = EditEntry(edit_id, prompt, target, trained.version, blocks[edit_id])


def read_edit_log(files: Mapping[str, bytes], where: str) -> dict[str, EditEntry]:
    """The edit log of a snapshot (empty for snapshots written before it existed)."""
    if EDIT_LOG not in files:
        return {}
    try:
        entries = [EditEntry(**e) for e in json.loads(files[EDIT_LOG])["edits"]]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise SnapshotError(f"{where}: {EDIT_LOG} is malformed ({exc})") from exc
    return {e.id: e for e in entries}
