"""Converters from the public editing data sets into edit records (and Parquet edit streams).

Records that cannot be converted are reported with their index and reason, never dropped silently.
Each converter tags its locality probes with their kind: zsRE's `loc` is an NQ question ("nq"),
CounterFact's `locality_prompt` shares the relation with another subject ("neighbour"), and KnowEdit's
Relation_Specificity prompts ask the same subject another relation ("subject"). zsRE has no such probes of
its own; `zsre_subject_probes` takes them from other records of the same file about the same subject.
"""
from __future__ import annotations

import json
import logging
import random
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from melo_ray.records import LOCALITY_KINDS, EditRecord, LocalityProbe, PortabilityProbe, question_label
from melo_ray.text import content_words, focus  # focus: the same last-sentence rule the scope test uses

log = logging.getLogger(__name__)

NQ_PREFIX = "nq question: "


@dataclass
class Conversion:
    records: list[EditRecord] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (index in the source, reason)

    def counts(self) -> dict[str, int]:
        """How many converted records carry each kind of probe (records with at least one)."""
        out = {"records": len(self.records), "skipped": len(self.skipped)}
        for kind in LOCALITY_KINDS:
            out[f"locality_{kind}"] = sum(bool(r.probes(kind)) for r in self.records)
        for name in ("rephrases", "alias_rephrases", "portability"):
            out[name] = sum(bool(getattr(r, name)) for r in self.records)
        return out


def _text(raw: dict[str, Any], name: str) -> str:
    value = raw.get(name)
    if isinstance(value, list) and value and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"field '{name}' is missing or empty")
    return value.strip()


def _optional(raw: dict[str, Any], name: str) -> str | None:
    value = raw.get(name)
    return value.strip() if isinstance(value, str) and value.strip() else None


def _first_string(value: Any) -> str | None:
    """The first non-empty string in a string or (nested) list: KnowEdit answers are lists of alias lists."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, list):
        for item in value:
            found = _first_string(item)
            if found is not None:
                return found
    return None


def _knowedit_entries(section: Any, name: str) -> list[tuple[str, str | None]]:
    """(prompt, first answer) of each well-formed entry of a KnowEdit locality/portability list."""
    entries = (section or {}).get(name) if isinstance(section, dict) else None
    out = []
    for entry in entries if isinstance(entries, list) else []:
        prompt = _optional(entry, "prompt") if isinstance(entry, dict) else None
        if prompt is not None:
            out.append((prompt, _first_string(entry.get("ground_truth"))))
    return out


def _zsre(raw: dict[str, Any], index: int) -> EditRecord:
    loc = _optional(raw, "loc")
    loc = loc[len(NQ_PREFIX):] if loc is not None and loc.startswith(NQ_PREFIX) else loc
    port = raw.get("portability") if isinstance(raw.get("portability"), dict) else {}
    question, answer = _optional(port, "New Question"), _optional(port, "New Answer")  # the eval subset's GPT-4 follow-up
    return EditRecord(
        id=f"zsre-{index}", prompt=_text(raw, "src"), target=_text(raw, "alt"), subject=_optional(raw, "subject"),
        rephrases=(_text(raw, "rephrase"),) if raw.get("rephrase") else (),
        locality=(LocalityProbe(loc, _optional(raw, "loc_ans"), "nq"),) if loc else (),
        portability=(PortabilityProbe(question, answer),) if question and answer else (),
        question=_question_label(raw, _first_string(raw.get("answers"))),
    )


def _question_label(raw: dict[str, Any], true_answer: str | None) -> str | None:
    subject = _optional(raw, "subject")
    return question_label(subject, true_answer) if subject and true_answer else None


def _counterfact(raw: dict[str, Any], index: int) -> EditRecord:
    rephrase, neighbour = _optional(raw, "rephrase_prompt"), _optional(raw, "locality_prompt")
    return EditRecord(
        id=f"counterfact-{raw.get('case_id', index)}", prompt=_text(raw, "prompt"), target=_text(raw, "target_new"),
        subject=_optional(raw, "subject"), rephrases=(rephrase,) if rephrase else (),
        locality=(LocalityProbe(neighbour, _optional(raw, "locality_ground_truth"), "neighbour"),) if neighbour else (),
        # a neighbour prompt names another subject with the same true answer: an edit of that subject
        # with that true answer asks the neighbour's question (evaluation leaves it out of locality)
        question=_question_label(raw, _first_string(raw.get("ground_truth"))),
    )


def _wikibio(raw: dict[str, Any], index: int) -> EditRecord:
    # KnowEdit keeps relation questions about the same person for locality: same subject, other relation.
    probes = _knowedit_entries(raw.get("locality"), "Relation_Specificity")
    return EditRecord(
        id=f"wikibio-{index}", prompt=_text(raw, "text"), target=_text(raw, "labels"), subject=_optional(raw, "concept"),
        locality=tuple(LocalityProbe(p, a, "subject") for p, a in probes),
    )


def _knowedit(raw: dict[str, Any], index: int) -> EditRecord:
    """KnowEdit fact records (wiki_recent; wiki_counterfact has the same layout)."""
    target = _text(raw, "target_new")
    aliases, portability = [], []
    for prompt, answer in _knowedit_entries(raw.get("portability"), "Subject_Aliasing"):
        # the edited fact asked with another name of the subject: a rephrasing when its answer is the target
        if answer == target:
            aliases.append(prompt)
        elif answer is not None:
            portability.append(PortabilityProbe(prompt, answer))
    for name in ("Reasoning", "Logical_Generalization"):
        portability += [PortabilityProbe(p, a) for p, a in _knowedit_entries(raw.get("portability"), name) if a]
    rephrase = _optional(raw, "rephrase") or _optional(raw, "rephrase_prompt")
    return EditRecord(
        id=f"knowedit-{index}", prompt=_text(raw, "prompt"), target=target, subject=_optional(raw, "subject"),
        rephrases=(rephrase,) if rephrase else (), alias_rephrases=tuple(aliases),
        # Forgetfulness (other values of the edited one-to-many relation) is none of our three kinds: left out
        locality=tuple(LocalityProbe(p, a, "subject")
                       for p, a in _knowedit_entries(raw.get("locality"), "Relation_Specificity")),
        portability=tuple(portability),
        # KnowEdit's zsRE split keeps the true answer: label the question as for zsRE (wiki_recent has none)
        question=_question_label(raw, _first_string(raw.get("ground_truth"))),
    )


def _nq(raw: dict[str, Any], index: int) -> EditRecord:
    return EditRecord(id=f"nq-{index}", prompt=_text(raw, "question"), target=_text(raw, "answer"))


CONVERTERS: dict[str, Callable[[dict[str, Any], int], EditRecord]] = {
    "zsre": _zsre,
    "counterfact": _counterfact,
    "wikibio": _wikibio,
    "knowedit": _knowedit,
    "nq": _nq,
}


def zsre_subject_probes(rows: list[Any]) -> dict[int, tuple[LocalityProbe, ...]]:
    """Same-subject, other-relation probes for zsRE rows, taken from the other rows about the same subject.

    zsRE has no relation ids and often asks one relation in several wordings, so another row counts as
    another relation only when its original answer differs; its question is the probe and that answer
    (`answers`[0]) the probe's answer. Keys are row indices; rows without such a neighbour are absent.
    """
    facts: dict[str, list[tuple[int, str, str]]] = defaultdict(list)  # subject -> (row, question, answer)
    for index, raw in enumerate(rows):
        if not isinstance(raw, dict):
            continue
        subject, question, answer = _optional(raw, "subject"), _optional(raw, "src"), _first_string(raw.get("answers"))
        if subject and question and answer:
            facts[subject].append((index, question, answer))
    probes: dict[int, tuple[LocalityProbe, ...]] = {}
    for same_subject in facts.values():
        for index, question, answer in same_subject:
            others = {q: a for i, q, a in same_subject
                      if i != index and q != question and a.casefold() != answer.casefold()}
            if others:
                probes[index] = tuple(LocalityProbe(q, a, "subject") for q, a in others.items())
    return probes


def _content_words(template: str) -> set[str]:
    return set(content_words(template))


def relation_template(prompt: str, subject: str | None) -> str | None:
    """The prompt with its subject replaced by "{}" (None unless the subject occurs exactly once)."""
    if not subject or prompt.count(subject) != 1 or "{" in prompt or "}" in prompt:
        return None
    return prompt.replace(subject, "{}")


class RelationGroups:
    """Relation templates joined when one record's prompt and rephrasing use both (union-find), so two
    templates count as other relations only if never joined and without a content word in common."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, t: str) -> str:
        self.parent.setdefault(t, t)
        while self.parent[t] != t:
            self.parent[t] = self.parent[self.parent[t]]
            t = self.parent[t]
        return t

    def link(self, a: str | None, b: str | None) -> None:
        if a and b:
            self.parent[self.find(a)] = self.find(b)

    def differ(self, a: str, b: str) -> bool:
        return self.find(a) != self.find(b) and not (_content_words(a) & _content_words(b))


def synthetic_subject_probes(records: list[EditRecord], per_record: int = 2, seed: int = 0) -> list[EditRecord]:
    """Add same-subject, other-relation probes to records that have none: the record's subject put into
    the relation templates of other records of the same list ("{} was born in" -> "Ada Lovelace was
    born in"). A template sharing a content word with the record's own template ("architect") is
    skipped, and so is one joined to it through some record's rephrasing or through records with the same
    `question` label, so a probe does not ask the edited relation in other words. Answers are unknown (None)."""
    rng = random.Random(seed)
    templates = [(relation_template(r.prompt, r.subject), r) for r in records]
    pool = sorted({t for t, _ in templates if t})
    groups = RelationGroups()
    asked: dict[str, str] = {}  # question label -> a template that asks it
    for template, record in templates:
        for rephrase in record.rephrases if template else ():
            groups.link(template, relation_template(focus(rephrase), record.subject))
        if template and record.question:  # two wordings of one labelled question: one relation
            groups.link(template, asked.setdefault(record.question, template))
    out = []
    for template, record in templates:
        if template is None or record.probes("subject") or not pool:
            out.append(record)
            continue
        chosen: list[str] = []
        for _ in range(20 * per_record):
            if len(chosen) >= per_record:
                break
            other = rng.choice(pool)
            if other != template and other not in chosen and groups.differ(template, other):
                chosen.append(other)
        probes = tuple(LocalityProbe(t.format(record.subject), None, "subject") for t in chosen)
        out.append(replace(record, locality=record.locality + probes))
    return out


def _load_rows(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return data


def convert(fmt: str, path: str | Path, limit: int | None = None, *, subject_probes: int = 0) -> Conversion:
    """Convert a source file of a known format; bad rows go to `skipped` with their reason.

    `subject_probes` > 0 adds that many synthetic same-subject probes to each record that has none
    (`synthetic_subject_probes`, templates from the converted records themselves)."""
    if fmt not in CONVERTERS:
        raise ValueError(f"unknown format '{fmt}'; choose from {sorted(CONVERTERS)}")
    converter = CONVERTERS[fmt]
    rows = _load_rows(Path(path))
    extra = zsre_subject_probes(rows) if fmt == "zsre" else {}
    result = Conversion()
    for index, raw in enumerate(rows):
        if limit is not None and len(result.records) >= limit:
            break
        try:
            if not isinstance(raw, dict):
                raise ValueError(f"record is a {type(raw).__name__}, not an object")
            record = converter(raw, index)
        except ValueError as exc:
            result.skipped.append((index, str(exc)))
            continue
        if index in extra:
            record = replace(record, locality=record.locality + extra[index])
        result.records.append(record)
    if subject_probes > 0:
        result.records = synthetic_subject_probes(result.records, subject_probes)
    for index, reason in result.skipped:
        log.warning("%s record %d skipped: %s", path, index, reason)
    log.info("%s: %s", path, result.counts())
    return result
