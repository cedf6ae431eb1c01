"""Labelled prompt pairs for the scope test, and splits that hold whole relations (or a whole data set)
out, so a score on them says how the test does on questions it never saw.

A pair is (edited prompt, query, same question?). Its kind says what it probes:
- `reword` (positive): another wording of the edited question, same subject;
- `alias` (positive): the edited question about the subject under another name (wiki_recent's
  portability.Subject_Aliasing whose answer is the target);
- `subject_other_relation`: the same subject, a question of another family;
- `relation_other_subject`: the edited relation about someone else; `namesake` when that someone
  shares part of the subject's name;
- `inverse`: the same subject, the link asked from the other end ("X follows" / "X is followed by");
- `reasking`: a locality probe that asks the edited relation again (wiki_recent probes whose relation is
  the edit's). A perfect editor changes its answer, so it is counted apart, never as a negative.

Sources: the training splits only (zsRE train-1k, CounterFact train, wiki_recent) and the hand-written
Wikidata templates (wikidata_relations.py). Every pair names the relation families it touches; a
leave-relations-out split puts each family in train, calibration or test, and a pair in a part only
when all its families are.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from melo_ray.data import RelationGroups, relation_template
from melo_ray.editors.melo.scope.training.wikidata_relations import (
    BY_PID,
    PROPERTIES,
    Property,
    inverse_of,
    property_of_template,
)
from melo_ray.text import focus

POSITIVE_KINDS = ("reword", "alias")
NEGATIVE_KINDS = ("subject_other_relation", "relation_other_subject", "namesake", "inverse")
APART_KINDS = ("reasking",)
SOURCES = ("zsre", "counterfact", "wiki_recent", "templates")


@dataclass(frozen=True)
class Pair:
    a: str  # the edited prompt
    b: str  # the query
    label: int  # 1: the same question
    kind: str
    source: str
    families: tuple[str, ...]  # relation families the two prompts ask

    @property
    def style(self) -> str:
        """`question` when both prompts are questions (zsRE-style), else `cloze` (CounterFact-style)."""
        return "question" if self.a.rstrip().endswith("?") and self.b.rstrip().endswith("?") else "cloze"


@dataclass(frozen=True)
class DataPaths:
    zsre: Path
    counterfact: Path
    wiki_recent: Path

    @classmethod
    def under(cls, root: Path) -> "DataPaths":
        return cls(root / "zsre-mend-train-1k/zsre_mend_train-1k.json",
                   root / "counterfact-mend-splits/counterfact-train.json",
                   root / "knowedit/benchmark_wiki_recent_recent_train.json")


@dataclass(frozen=True)
class Split:
    """Which pairs train, calibrate and test one split."""
    name: str
    train: tuple[Pair, ...]
    calibration: tuple[Pair, ...]
    test: tuple[Pair, ...]
    trained_families: str = "train families"  # what its training pairs cover, for a file's metadata


class _Families:
    """Relation families of a data set's templates: the catalog's family when a property's pattern names
    the template, else the template's group of rewordings (linked by the records' rephrasings)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.groups = RelationGroups()
        self.named: dict[str, str] = {}

    def link(self, a: str | None, b: str | None) -> None:
        if a:
            self.groups.find(a)
        self.groups.link(a, b)

    def settle(self) -> None:
        """Give a template no pattern names the family its rewordings' templates are named with."""
        votes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for template in list(self.groups.parent):
            prop = property_of_template(template)
            if prop:
                votes[self.groups.find(template)][prop.family] += 1
        self.named = {root: max(v, key=v.get) for root, v in votes.items()}

    def of(self, template: str) -> str:
        prop = property_of_template(template)
        if prop:
            return prop.family
        root = self.groups.find(template)
        return self.named.get(root) or f"{self.source}:{root}"


def _load(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def _fact_pairs(facts: list[tuple[str, str, str | None, str | None]], source: str, rng: random.Random,
                other_relations: int) -> list[Pair]:
    """facts: (prompt, subject, rewording, neighbour prompt: the relation about another subject)."""
    families = _Families(source)
    templates = []
    for prompt, subject, rephrase, _ in facts:
        own = relation_template(prompt, subject)
        families.link(own, relation_template(focus(rephrase), subject) if rephrase else None)
        templates.append(own)
    families.settle()
    pool = sorted({t for t in templates if t})
    subjects = sorted({s for _, s, _, _ in facts if s})
    pairs: list[Pair] = []
    for (prompt, subject, rephrase, neighbour), own in zip(facts, templates):
        family = families.of(own) if own else f"{source}:?{prompt}"
        if rephrase:
            pairs.append(Pair(prompt, rephrase, 1, "reword", source, (family,)))
        if neighbour:
            pairs.append(Pair(prompt, neighbour, 0, "relation_other_subject", source, (family,)))
        if own is None:
            continue
        other = rng.choice(subjects)
        if other.casefold() != subject.casefold() and other not in own:
            pairs.append(Pair(prompt, own.format(other), 0, "relation_other_subject", source, (family,)))
        for _ in range(other_relations):
            template = rng.choice(pool)
            their = families.of(template)
            if their != family and families.groups.differ(own, template):
                pairs.append(Pair(prompt, template.format(subject), 0, "subject_other_relation", source, (family, their)))
    return pairs


def zsre_pairs(path: Path, rng: random.Random) -> list[Pair]:
    return _fact_pairs([(r["src"], r["subject"], r.get("rephrase"), None) for r in _load(path)], "zsre", rng, 4)


def counterfact_pairs(path: Path, rng: random.Random, limit: int) -> list[Pair]:
    records = _load(path)[:limit]
    return _fact_pairs([(r["prompt"], r["subject"], r.get("rephrase_prompt"), r.get("locality_prompt")) for r in records],
                       "counterfact", rng, 3)


def _entries(section: object) -> list[tuple[str, str | None]]:
    out = []
    for entry in section if isinstance(section, list) else []:
        answer = entry.get("ground_truth")
        while isinstance(answer, list) and answer:
            answer = answer[0]
        out.append((entry["prompt"], answer if isinstance(answer, str) else None))
    return out


def wiki_recent_pairs(path: Path, rng: random.Random) -> list[Pair]:
    """Its records' Relation_Specificity probes (same subject; other relations, or the edited one again),
    subject-alias rewordings, and its templates about other subjects of the file."""
    records = _load(path)
    families = _Families("wiki_recent")
    by_template: dict[str, list[str]] = defaultdict(list)
    for r in records:
        own = relation_template(r["prompt"], r["subject"])
        if own:
            by_template[own].append(r["subject"])
    for own in by_template:
        families.link(own, None)
    families.settle()
    pairs: list[Pair] = []
    for r in records:
        prompt, subject, target = r["prompt"], r["subject"], r["target_new"]
        own = relation_template(prompt, subject)
        prop = property_of_template(own or prompt)
        family = families.of(own) if own else f"wiki_recent:?{prompt}"
        for probe, _ in _entries((r.get("locality") or {}).get("Relation_Specificity")):
            theirs = relation_template(probe, subject)
            other = property_of_template(theirs or probe)
            their_family = families.of(theirs) if theirs else f"wiki_recent:?{probe}"
            if theirs == own or (prop is not None and other is not None and prop.pid == other.pid):
                pairs.append(Pair(prompt, probe, 0, "reasking", "wiki_recent", (family,)))
            elif prop is not None and other is not None and inverse_of(prop, other):
                pairs.append(Pair(prompt, probe, 0, "inverse", "wiki_recent", (family, their_family)))
            elif their_family != family:
                pairs.append(Pair(prompt, probe, 0, "subject_other_relation", "wiki_recent", (family, their_family)))
        for alias, answer in _entries((r.get("portability") or {}).get("Subject_Aliasing")):
            if answer == target:
                pairs.append(Pair(prompt, alias, 1, "alias", "wiki_recent", (family,)))
        others = [s for s in by_template.get(own or "", []) if s.casefold() != subject.casefold()]
        if own and others:
            pairs.append(Pair(prompt, own.format(rng.choice(others)), 0, "relation_other_subject", "wiki_recent", (family,)))
    return pairs


# -- subjects for the hand-written templates ---------------------------------------------------------
_FIRST = ("Maren Tobias Ilse Anton Rosa Felix Nadia Oskar Lena Viktor Clara Jonas Irena Mateo Sofia Emil Hana Luka "
          "Petra Adrian Mila Teodor Alma Sven Yara Idris Noor Caspar Elif Ruben Ines Jasper Lotte Nikolai Freya "
          "Dario Selma Henrik Zofia Tomas Ada Milan Esme Kasper Livia Bruno Talia Ansel Greta").split()
_LAST = ("Halvorsen Okafor Brandt Vasquez Lindqvist Moreau Castellano Novak Achterberg Szabo Kowalczyk Ferreira "
         "Dimitrov Hartmann Oyelaran Marchetti Rasmussen Petrakis Delacroix Ivanova Sorensen Baptiste Yilmaz "
         "Kovalenko Aguilar Whitlock Nakamura Brennan Holmqvist Esposito Carvalho Lindgren Horvath Mbeki").split()
_PLACE_STEM = ("Varnholm Easterby Kelmora Drovnik Saltmere Aldena Brisca Tollund Merovin Halden Ostrava Kirrin Lowenby "
               "Castrelle Norvik Pellham Zaronda Quillan Rovereto Ashbourne Tarvis Elmsdale Korvatu Mirabeau").split()
_PLACE_FORM = ("{}", "Port {}", "{} Valley", "New {}", "{} City", "Lake {}", "{} Province", "{}-on-Sea")
_WORK_STEM = ("Glass Orchard", "Silent Harbor", "Winter Ledger", "Copper Sky", "Hollow Crown", "Paper Lanterns",
              "Northern Tide", "Iron Meadow", "Last Cartographer", "Velvet Engine", "Salt and Ember", "Quiet Republic",
              "Burning Atlas", "Distant Bells", "Marble Garden", "Open Water", "Lantern Men", "Ninth Orbit")
# no bare "{}" beside "The {}": a title with and without its article is one work, not a namesake
_WORK_FORM = ("The {}", "The {} II", "Return of the {}", "{}: Reprise")
_ORG_STEM = ("Heliotrope", "Norwind", "Bellcrest", "Quarrystone", "Ambervale", "Stroud", "Kestrel", "Oberlin",
             "Tidewater", "Falkner", "Marisco", "Greyhaven", "Lumora", "Castelli", "Pinecrest", "Vantor")
_ORG_FORM = ("{} Records", "{} Systems", "{} Group", "{} Motors", "{} University", "{} Airlines", "{} Press", "{} Holdings")
_THING_STEM = ("Zeta Aquilae", "Kestrel MK2", "Orvalis", "Tessaract 9", "Pyrellia", "HMS Ardent", "Nautica IV",
               "Corvane", "Helix 300", "Ostara Bridge", "Mirelda", "Sable Tower", "Drakon X", "Lumen Station")
_THING_FORM = ("{}", "{} B", "Greater {}", "{} Prime")


def _named(stems: Iterable[str], forms: Iterable[str]) -> list[str]:
    return [form.format(stem) for stem in stems for form in forms]


def _subjects(rng: random.Random, people_from_data: list[str]) -> dict[str, list[str]]:
    people = [f"{f} {l}" for f in _FIRST for l in _LAST]
    rng.shuffle(people)
    return {"person": people[:600] + people_from_data, "place": _named(_PLACE_STEM, _PLACE_FORM),
            "work": _named(_WORK_STEM, _WORK_FORM), "org": _named(_ORG_STEM, _ORG_FORM),
            "thing": _named(_THING_STEM, _THING_FORM)}


def _namesake(subject: str, pool: list[str], rng: random.Random) -> str | None:
    """Another subject of the pool sharing a word of this one's name."""
    words = set(subject.split())
    shared = [s for s in rng.sample(pool, min(len(pool), 400)) if s != subject and words & set(s.split())]
    return rng.choice(shared) if shared else None


def template_pairs(rng: random.Random, per_property: int = 24, people_from_data: list[str] | None = None,
                   other_relations: int = 4) -> list[Pair]:
    """Pairs of the catalog's wordings: rewordings, the same subject with another relation (half of them
    in the same wording: "The X of S is" / "The Y of S is"), the inverse relation, the relation about
    another subject (half of them a namesake)."""
    subjects = _subjects(rng, people_from_data or [])
    by_subject: dict[str, list[Property]] = defaultdict(list)
    for prop in PROPERTIES:
        by_subject[prop.subject].append(prop)
    pairs: list[Pair] = []
    for prop in PROPERTIES:
        wordings = prop.wordings()
        pool = subjects[prop.subject]
        others = [p for p in by_subject[prop.subject] if p.family != prop.family and not inverse_of(prop, p)]
        for _ in range(per_property):
            subject = rng.choice(pool)
            i, j = rng.sample(range(len(wordings)), 2)
            a = wordings[i].format(subject)
            pairs.append(Pair(a, wordings[j].format(subject), 1, "reword", "templates", (prop.family,)))
            for other in rng.sample(others, min(other_relations, len(others))):
                their = other.wordings()
                same_form = their[i] if i < len(their) and rng.random() < 0.5 else rng.choice(their)
                pairs.append(Pair(a, same_form.format(subject), 0, "subject_other_relation", "templates",
                                  (prop.family, other.family)))
            if prop.inverse:
                inverse = BY_PID[prop.inverse]
                pairs.append(Pair(a, rng.choice(inverse.wordings()).format(subject), 0, "inverse", "templates",
                                  (prop.family,)))
            someone = rng.choice(pool)
            if someone != subject:
                wording = wordings[i] if rng.random() < 0.5 else wordings[j]
                pairs.append(Pair(a, wording.format(someone), 0, "relation_other_subject", "templates", (prop.family,)))
            namesake = _namesake(subject, pool, rng)
            if namesake:
                pairs.append(Pair(a, rng.choice(wordings).format(namesake), 0, "namesake", "templates", (prop.family,)))
    return pairs


def _wiki_recent_people(path: Path) -> list[str]:
    """Subjects of wiki_recent records asked a person's relation (gender, occupation, birth place)."""
    people = set()
    for r in _load(path):
        probes = [p for p, _ in _entries((r.get("locality") or {}).get("Relation_Specificity"))] + [r["prompt"]]
        if any(k in p for p in probes for k in ("The gender of", "The occupation of", "The place of birth of")):
            people.add(r["subject"])
    return sorted(people)


def all_pairs(paths: DataPaths, *, seed: int = 0, counterfact_limit: int = 4000, per_property: int = 24) -> list[Pair]:
    """Every pair of every source, deduplicated (identical prompts dropped: they always pass)."""
    rng = random.Random(seed)
    pairs = (zsre_pairs(paths.zsre, rng) + counterfact_pairs(paths.counterfact, rng, counterfact_limit)
             + wiki_recent_pairs(paths.wiki_recent, rng)
             + template_pairs(rng, per_property, _wiki_recent_people(paths.wiki_recent)[:200]))
    seen, out = set(), []
    for pair in pairs:
        key = (pair.a, pair.b)
        if pair.a.strip() != pair.b.strip() and key not in seen:
            seen.add(key)
            out.append(pair)
    return out


def family_part(family: str, seed: int, calibration: float = 0.2, test: float = 0.3) -> str:
    """train, calibration or test for a relation family: a hash, so a family's part never depends on
    which other families a run happens to hold."""
    u = int(hashlib.sha256(f"{seed}:{family}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if u < test else "calibration" if u < test + calibration else "train"


def _part(pair: Pair, seed: int) -> str | None:
    parts = {family_part(f, seed) for f in pair.families}
    return parts.pop() if len(parts) == 1 else None  # a pair across parts belongs to none


def leave_relations_out(pairs: list[Pair], seed: int = 0, exclude_sources: tuple[str, ...] = ()) -> Split:
    """Train and calibrate on the train / calibration families (of sources not excluded), test on the
    test families of every source."""
    parts: dict[str, list[Pair]] = {"train": [], "calibration": [], "test": []}
    for pair in pairs:
        part = _part(pair, seed)
        if part == "test" or (part is not None and pair.source not in exclude_sources):
            parts[part].append(pair)
    name = f"leave-relations-out(seed {seed}" + (f", without {','.join(exclude_sources)}" if exclude_sources else "") + ")"
    return Split(name, tuple(parts["train"]), tuple(parts["calibration"]), tuple(parts["test"]))


def leave_dataset_out(pairs: list[Pair], source: str, seed: int = 0) -> Split:
    """Test on every pair of `source`; train and calibrate on the other sources (calibration: their
    calibration families)."""
    train, calibration, test = [], [], []
    for pair in pairs:
        if pair.source == source:
            test.append(pair)
        elif _part(pair, seed) == "calibration":
            calibration.append(pair)
        elif _part(pair, seed) is not None:
            train.append(pair)
    return Split(f"leave-{source}-out", tuple(train), tuple(calibration), tuple(test),
                 "every family of the other sources but their calibration families")


def ship_split(pairs: list[Pair], seed: int = 0, exclude_sources: tuple[str, ...] = ()) -> Split:
    """For a file to ship: train on every family but the calibration ones (the test families too),
    calibrate on those; nothing is left to test on, so its held-out figures come from the splits above.
    Pairs of excluded sources are left out entirely (wiki_recent: an end-to-end check it never saw)."""
    train, calibration = [], []
    for pair in pairs:
        parts = {family_part(f, seed) for f in pair.families}
        if pair.source in exclude_sources or not parts:
            continue
        if parts == {"calibration"}:
            calibration.append(pair)
        elif "calibration" not in parts:  # a pair touching a calibration family would leak it into training
            train.append(pair)
    name = f"ship(seed {seed}" + (f", without {','.join(exclude_sources)}" if exclude_sources else "") + ")"
    return Split(name, tuple(train), tuple(calibration), (), "train and test families")
