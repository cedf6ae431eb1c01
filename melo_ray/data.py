"""Converters from the public editing data sets into edit records (and Parquet edit streams).

Records that cannot be converted are reported with their index and reason, never dropped silently.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from melo_ray.records import EditRecord

log = logging.getLogger(__name__)

NQ_PREFIX = "nq question: "


@dataclass
class Conversion:
    records: list[EditRecord] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (index in the source, reason)


def _text(raw: dict[str, Any], name: str) -> str:
    value = raw.get(name)
    if isinstance(value, list) and value and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"field '{name}' is missing or empty")
    return value.strip()


def _zsre(raw: dict[str, Any], index: int) -> EditRecord:
    loc = raw.get("loc")
    locality_prompt = loc[len(NQ_PREFIX):] if isinstance(loc, str) and loc.startswith(NQ_PREFIX) else loc
    return EditRecord(
        id=f"zsre-{index}", prompt=_text(raw, "src"), target=_text(raw, "alt"),
        rephrases=(_text(raw, "rephrase"),) if raw.get("rephrase") else (),
        locality_prompt=locality_prompt if isinstance(locality_prompt, str) else None,
        locality_answer=raw.get("loc_ans") if isinstance(raw.get("loc_ans"), str) else None,
    )


def _counterfact(raw: dict[str, Any], index: int) -> EditRecord:
    rephrase = raw.get("rephrase_prompt")
    return EditRecord(
        id=f"counterfact-{raw.get('case_id', index)}", prompt=_text(raw, "prompt"), target=_text(raw, "target_new"),
        rephrases=(rephrase.strip(),) if isinstance(rephrase, str) and rephrase.strip() else (),
        locality_prompt=raw.get("locality_prompt") if isinstance(raw.get("locality_prompt"), str) else None,
        locality_answer=raw.get("locality_ground_truth") if isinstance(raw.get("locality_ground_truth"), str) else None,
    )


def _wikibio(raw: dict[str, Any], index: int) -> EditRecord:
    # KnowEdit keeps relation questions about the same person for locality; use the first one.
    probes = (raw.get("locality") or {}).get("Relation_Specificity") or []
    probe = probes[0] if probes and isinstance(probes[0], dict) else {}
    answer = probe.get("ground_truth")
    answer = answer[0] if isinstance(answer, list) and answer else answer
    return EditRecord(
        id=f"wikibio-{index}", prompt=_text(raw, "text"), target=_text(raw, "labels"),
        locality_prompt=probe.get("prompt") if isinstance(probe.get("prompt"), str) else None,
        locality_answer=answer if isinstance(answer, str) else None,
    )


def _nq(raw: dict[str, Any], index: int) -> EditRecord:
    return EditRecord(id=f"nq-{index}", prompt=_text(raw, "question"), target=_text(raw, "answer"))


CONVERTERS: dict[str, Callable[[dict[str, Any], int], EditRecord]] = {
    "zsre": _zsre,
    "counterfact": _counterfact,
    "wikibio": _wikibio,
    "nq": _nq,
}


def _load_rows(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return data


def convert(fmt: str, path: str | Path, limit: int | None = None) -> Conversion:
    """Convert a source file of a known format; bad rows go to `skipped` with their reason."""
    if fmt not in CONVERTERS:
        raise ValueError(f"unknown format '{fmt}'; choose from {sorted(CONVERTERS)}")
    converter = CONVERTERS[fmt]
    result = Conversion()
    for index, raw in enumerate(_load_rows(Path(path))):
        if limit is not None and len(result.records) >= limit:
            break
        try:
            if not isinstance(raw, dict):
                raise ValueError(f"record is a {type(raw).__name__}, not an object")
            result.records.append(converter(raw, index))
        except ValueError as exc:
            result.skipped.append((index, str(exc)))
    for index, reason in result.skipped:
        log.warning("%s record %d skipped: %s", path, index, reason)
    return result
