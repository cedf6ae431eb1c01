"""Edit records: the schema every editor, converter and pipeline speaks, and its validation.

Columns: prompt (str, required), target (str, required), id (str, optional; unique across a store's
whole history, so a missing one is derived from prompt and target, never from a row number), subject (str,
optional), rephrases (list of str, optional; evaluation only), train_rephrases (list of str, optional; an editor
may train on them), alias_rephrases (list of str, optional; the prompt asked with an alias of the subject,
evaluation only), locality (list of {prompt, answer, kind}, optional), portability (list of {prompt, answer},
optional), locality_prompt / locality_answer (str, optional), question (str, optional; records with the same
value ask one question, however worded: the evaluation scores an edit that a later one re-asks apart).

Locality probes are inputs whose output the edit must leave as the base model gave it, one of three kinds:
"neighbour" (same relation, another subject), "subject" (same subject, another relation) and "nq" (an
unrelated question). The older single-probe columns locality_prompt / locality_answer still parse, as one
"neighbour" probe; on every record they mirror its first probe, so code and files that only know them still work.
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
LOCALITY_KINDS = ("neighbour", "subject", "nq")


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

    def __reduce__(self):
        # Rebuilt from its fields when it crosses a process (a Ray actor -> the driver); the default
        # would call __init__ with the message alone and fail to deserialise.
        return (type(self), (self.source, self.row, self.field, self.reason))


def question_label(subject: str, true_answer: str) -> str:
    """`EditRecord.question` for data without relation ids (zsRE, CounterFact's MEND split): records
    about one subject with one true answer ask one question, however worded and whatever the target."""
    return f"{subject.casefold()} | {true_answer.casefold()}"


def content_id(prompt: str, target: str) -> str:
    """An id derived from what the edit says, so it is the same in every job and file that holds it
    and differs between different edits (a row number would repeat across jobs)."""
    digest = hashlib.sha256(f"{prompt}\x00{target}".encode("utf-8", "surrogatepass")).hexdigest()
    return f"edit-{digest[:20]}"


@dataclass(frozen=True)
class LocalityProbe:
    """An input the edit must not change: `kind` says how it relates to the edited fact (LOCALITY_KINDS);
    `answer`, where known, is its true answer (for perplexity)."""

    prompt: str
    answer: str | None = None
    kind: str = "neighbour"

    def __post_init__(self) -> None:
        if self.kind not in LOCALITY_KINDS:
            raise ValueError(f"locality kind '{self.kind}' is not one of {LOCALITY_KINDS}")


@dataclass(frozen=True)
class PortabilityProbe:
    """A question whose answer follows from the edited fact (reasoning over it, or a related fact)."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class EditRecord:
    prompt: str
    target: str
    id: str = ""  # empty: derived from prompt and target (content_id)
    rephrases: tuple[str, ...] = field(default_factory=tuple)
    locality_prompt: str | None = None  # mirrors locality[0] (older single-probe column)
    locality_answer: str | None = None
    subject: str | None = None
    train_rephrases: tuple[str, ...] = field(default_factory=tuple)
    alias_rephrases: tuple[str, ...] = field(default_factory=tuple)
    locality: tuple[LocalityProbe, ...] = field(default_factory=tuple)
    portability: tuple[PortabilityProbe, ...] = field(default_factory=tuple)
    question: str | None = None  # the data's own label of the question asked (zsRE: subject and true answer)

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", content_id(self.prompt, self.target))
        # Lists and dicts (from to_dict, JSON, Parquet) become tuples and probes, so EditRecord(**r.to_dict()) == r.
        for name in ("rephrases", "train_rephrases", "alias_rephrases"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        probes = tuple(p if isinstance(p, LocalityProbe) else LocalityProbe(**p) for p in self.locality)
        if self.locality_prompt and all(p.prompt != self.locality_prompt for p in probes):
            probes = (LocalityProbe(self.locality_prompt, self.locality_answer, "neighbour"), *probes)
        object.__setattr__(self, "locality", probes)
        if probes:
            object.__setattr__(self, "locality_prompt", probes[0].prompt)
            object.__setattr__(self, "locality_answer", probes[0].answer)
        object.__setattr__(self, "portability", tuple(
            p if isinstance(p, PortabilityProbe) else PortabilityProbe(**p) for p in self.portability))

    def probes(self, kind: str) -> tuple[LocalityProbe, ...]:
        """This record's locality probes of one kind."""
        return tuple(p for p in self.locality if p.kind == kind)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and dicts (JSON- and Parquet-ready); parse_record(to_dict()) gives the record back."""
        out = asdict(self)
        for name in ("rephrases", "train_rephrases", "alias_rephrases", "locality", "portability"):
            out[name] = list(out[name])
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


def _strings(value: Any, source: str, row: int, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise RecordError(source, row, name, "must be a list of strings")
    return tuple(value)


def _probe_list(value: Any, source: str, row: int, name: str) -> list[Mapping[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise RecordError(source, row, name, f"must be a list of objects, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise RecordError(source, row, f"{name}[{i}]", f"must be an object, got {type(item).__name__}")
    return list(value)


def _locality(value: Any, source: str, row: int) -> tuple[LocalityProbe, ...]:
    probes = []
    for i, item in enumerate(_probe_list(value, source, row, "locality")):
        where = f"locality[{i}]"
        kind = item.get("kind")
        if kind is None:
            kind = "neighbour"
        if kind not in LOCALITY_KINDS:
            raise RecordError(source, row, f"{where}.kind", f"must be one of {list(LOCALITY_KINDS)}, got {kind!r}")
        probes.append(LocalityProbe(
            prompt=_string(item.get("prompt"), source, row, f"{where}.prompt", required=True) or "",
            answer=_string(item.get("answer"), source, row, f"{where}.answer", required=False), kind=kind,
        ))
    return tuple(probes)


def _portability(value: Any, source: str, row: int) -> tuple[PortabilityProbe, ...]:
    return tuple(
        PortabilityProbe(
            prompt=_string(item.get("prompt"), source, row, f"portability[{i}].prompt", required=True) or "",
            answer=_string(item.get("answer"), source, row, f"portability[{i}].answer", required=True) or "",
        )
        for i, item in enumerate(_probe_list(value, source, row, "portability"))
    )


def parse_record(raw: Mapping[str, Any], source: str, row: int) -> EditRecord:
    """Validate one raw mapping into an EditRecord, or raise RecordError naming row and field."""
    if not isinstance(raw, Mapping):
        raise RecordError(source, row, None, f"must be an object, got {type(raw).__name__}")
    prompt = _string(raw.get("prompt"), source, row, "prompt", required=True)
    target = _string(raw.get("target"), source, row, "target", required=True)
    raw_id = raw.get("id")
    if raw_id is not None and not isinstance(raw_id, (str, int)):
        raise RecordError(source, row, "id", f"must be a string, got {type(raw_id).__name__}")
    return EditRecord(
        prompt=prompt or "",
        target=target or "",
        id=str(raw_id) if raw_id is not None else "",  # "" -> derived from the content
        rephrases=_strings(raw.get("rephrases"), source, row, "rephrases"),
        locality_prompt=_string(raw.get("locality_prompt"), source, row, "locality_prompt", required=False),
        locality_answer=_string(raw.get("locality_answer"), source, row, "locality_answer", required=False),
        subject=_string(raw.get("subject"), source, row, "subject", required=False),
        train_rephrases=_strings(raw.get("train_rephrases"), source, row, "train_rephrases"),
        alias_rephrases=_strings(raw.get("alias_rephrases"), source, row, "alias_rephrases"),
        locality=_locality(raw.get("locality"), source, row),
        portability=_portability(raw.get("portability"), source, row),
        question=_string(raw.get("question"), source, row, "question", required=False),
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


PARQUET_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("target", pa.string()),
    ("rephrases", pa.list_(pa.string())), ("locality_prompt", pa.string()),
    ("locality_answer", pa.string()), ("subject", pa.string()),
    ("train_rephrases", pa.list_(pa.string())), ("alias_rephrases", pa.list_(pa.string())),
    ("locality", pa.list_(pa.struct([("prompt", pa.string()), ("answer", pa.string()), ("kind", pa.string())]))),
    ("portability", pa.list_(pa.struct([("prompt", pa.string()), ("answer", pa.string())]))),
    ("question", pa.string()),
])


def write_parquet(records: Iterable[EditRecord], path: str | Path) -> None:
    table = pa.Table.from_pylist([r.to_dict() for r in records], schema=PARQUET_SCHEMA)
    pq.write_table(table, str(path))
