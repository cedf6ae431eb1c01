"""Edit records: the schema every editor, converter and pipeline speaks, and its validation.

Columns: prompt (str, required), target (str, required), id (str, optional; unique across a store's
whole history, so a missing one is derived from prompt and target, never from a row number), rephrases (list of str,
optional), locality_prompt / locality_answer (str, optional).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

REQUIRED = ("prompt", "target")
OPTIONAL_STR = ("id", "locality_prompt", "locality_answer")


class RecordError(ValueError):
    """A record that cannot be used; names the source, the row and the field."""

    def __init__(self, source: str, row: int | None, field_name: str | None, reason: str) -> None:
        self.source, self.row, self.field, self.reason = source, row, field_name, reason
        where = source
        if row is not None:
            where += f": row {row}"
        if field_name:
            where += f": field '{field_name}'"
        super().__init__(f"{where}: {reason}")


def content_id(prompt: str, target: str) -> str:
    """An id derived from what the edit says, so it is the same in every job and file that holds it
    and differs between different edits (a row number would repeat across jobs)."""
    digest = hashlib.sha256(f"{prompt}\x00{target}".encode("utf-8", "surrogatepass")).hexdigest()
    return f"edit-{digest[:20]}"


@dataclass(frozen=True)
class EditRecord:
    prompt: str
    target: str
    id: str = ""  # empty: derived from prompt and target (content_id)
    rephrases: tuple[str, ...] = field(default_factory=tuple)
    locality_prompt: str | None = None
    locality_answer: str | None = None

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", content_id(self.prompt, self.target))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rephrases"] = list(self.rephrases)
        return out


def _string(value: Any, source: str, row: int, name: str, *, required: bool) -> str | None:
    if value is None:
        if required:
            raise RecordError(source, row, name, "is missing")
        return None
    if not isinstance(value, str):
        raise RecordError(source, row, name, f"must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise RecordError(source, row, name, "is empty")
    return value


def parse_record(raw: Mapping[str, Any], source: str, row: int) -> EditRecord:
    """Validate one raw mapping into an EditRecord, or raise RecordError naming row and field."""
    if not isinstance(raw, Mapping):
        raise RecordError(source, row, None, f"must be an object, got {type(raw).__name__}")
    prompt = _string(raw.get("prompt"), source, row, "prompt", required=True)
    target = _string(raw.get("target"), source, row, "target", required=True)
    raw_id = raw.get("id")
    if raw_id is not None and not isinstance(raw_id, (str, int)):
        raise RecordError(source, row, "id", f"must be a string, got {type(raw_id).__name__}")
    rephrases = raw.get("rephrases")
    if rephrases is None:
        rephrases = []
    if not isinstance(rephrases, (list, tuple)) or not all(isinstance(r, str) for r in rephrases):
        raise RecordError(source, row, "rephrases", "must be a list of strings")
    return EditRecord(
        prompt=prompt or "",
        target=target or "",
        id=str(raw_id) if raw_id is not None else "",  # "" -> derived from the content
        rephrases=tuple(rephrases),
        locality_prompt=_string(raw.get("locality_prompt"), source, row, "locality_prompt", required=False),
        locality_answer=_string(raw.get("locality_answer"), source, row, "locality_answer", required=False),
    )


def parse_records(rows: Iterable[Mapping[str, Any]], source: str = "records", start: int = 0) -> list[EditRecord]:
    return [parse_record(raw, source, start + i) for i, raw in enumerate(rows)]


def read_raw_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a Parquet or JSONL file as dicts; unreadable files raise RecordError."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise RecordError(source, None, None, "no such file")
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise RecordError(source, None, None, f"cannot read Parquet: {exc}") from exc
        return table.to_pylist()
    rows: list[dict[str, Any]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordError(source, None, None, f"cannot read: {exc}") from exc
    for number, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise RecordError(source, number, None, f"line {number + 1} is not JSON: {exc.msg}") from exc
    return rows


def read_edit_records(path: str | Path) -> list[EditRecord]:
    """Read and validate a whole edit file (Parquet or JSONL). The first bad record raises."""
    rows = read_raw_rows(path)
    if rows:
        missing = [name for name in REQUIRED if all(name not in r for r in rows if isinstance(r, Mapping))]
        if missing:
            raise RecordError(str(path), None, missing[0], "column is missing")
    return parse_records(rows, str(path))


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from JSONL (objects with `prompt`, or bare strings) or Parquet with a `prompt` column."""
    prompts = []
    for i, raw in enumerate(read_raw_rows(path)):
        value = raw if isinstance(raw, str) else raw.get("prompt") if isinstance(raw, Mapping) else None
        prompts.append(_string(value, str(path), i, "prompt", required=True) or "")
    return prompts


def write_parquet(records: Iterable[EditRecord], path: str | Path) -> None:
    schema = pa.schema([
        ("id", pa.string()), ("prompt", pa.string()), ("target", pa.string()),
        ("rephrases", pa.list_(pa.string())), ("locality_prompt", pa.string()),
        ("locality_answer", pa.string()),
    ])
    table = pa.Table.from_pylist([r.to_dict() for r in records], schema=schema)
    pq.write_table(table, str(path))
