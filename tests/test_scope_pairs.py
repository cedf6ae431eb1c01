"""Scope validation pairs: kinds, re-asking probes kept apart, and splits that hold whole relations out."""
from __future__ import annotations

import json
import random

from melo_ray.editors.melo.scope.training.pairs import (
    DataPaths,
    Pair,
    all_pairs,
    family_part,
    leave_dataset_out,
    leave_relations_out,
    ship_split,
    template_pairs,
    wiki_recent_pairs,
)
from melo_ray.editors.melo.scope.training.wikidata_relations import BY_PID, PROPERTIES, property_of_template


def test_catalog_is_broad_and_inverse_pairs_share_a_family() -> None:
    assert len(PROPERTIES) >= 100
    for prop in PROPERTIES:
        assert len(prop.wordings()) >= 2, prop.pid
        assert all(w.count("{}") == 1 for w in prop.wordings()), prop.pid
        if prop.inverse:
            assert BY_PID[prop.inverse].family == prop.family  # a split never parts "follows" from "followed by"
    assert property_of_template("When was {} born?").pid == "P569"  # the longest match, not "born"
    assert property_of_template("{} is followed by").pid == "P156"
    assert property_of_template("{} follows").pid == "P155"


def test_template_pairs_hold_every_kind_with_the_right_label() -> None:
    pairs = template_pairs(random.Random(0), per_property=3)
    kinds = {p.kind for p in pairs}
    assert {"reword", "subject_other_relation", "relation_other_subject", "inverse", "namesake"} <= kinds
    assert all(p.label == (p.kind == "reword") for p in pairs)
    inverse = [p for p in pairs if p.kind == "inverse"]
    assert any("follows" in p.a + p.b or "followed by" in p.a + p.b or "came" in p.a + p.b for p in inverse)


def _wiki_recent_file(tmp_path) -> DataPaths:
    records = [
        {"subject": "Ada Brandt", "prompt": "The gender of Ada Brandt is", "target_new": "female",
         "portability": {"Subject_Aliasing": [{"prompt": "The gender of A. Brandt is", "ground_truth": [["female"]]}]},
         "locality": {"Relation_Specificity": [
             {"prompt": "The place of death of Ada Brandt is", "ground_truth": [["Oslo"]]},
             {"prompt": "The sex of Ada Brandt is", "ground_truth": [["male"]]}]}},
        {"subject": "Book One", "prompt": "Book One follows", "target_new": "Book Zero", "portability": {},
         "locality": {"Relation_Specificity": [{"prompt": "Book One is followed by", "ground_truth": [["Two"]]}]}},
        {"subject": "Ivo Lind", "prompt": "The gender of Ivo Lind is", "target_new": "male", "portability": {},
         "locality": {}},
    ]
    path = tmp_path / "wr.json"
    path.write_text(json.dumps(records))
    return DataPaths(tmp_path / "none", tmp_path / "none", path)


def test_wiki_recent_reasking_probes_are_apart_and_inverse_probes_are_negatives(tmp_path) -> None:
    pairs = wiki_recent_pairs(_wiki_recent_file(tmp_path).wiki_recent, random.Random(0))
    kind_of = {(p.a, p.b): p.kind for p in pairs}
    # "The sex of X" re-asks the edited gender: a perfect editor changes it, so it is no negative
    assert kind_of[("The gender of Ada Brandt is", "The sex of Ada Brandt is")] == "reasking"
    assert kind_of[("The gender of Ada Brandt is", "The place of death of Ada Brandt is")] == "subject_other_relation"
    assert kind_of[("Book One follows", "Book One is followed by")] == "inverse"
    assert kind_of[("The gender of Ada Brandt is", "The gender of A. Brandt is")] == "alias"
    assert kind_of[("The gender of Ada Brandt is", "The gender of Ivo Lind is")] == "relation_other_subject"


def test_leave_relations_out_never_shares_a_family_between_parts() -> None:
    pairs = template_pairs(random.Random(0), per_property=4)
    split = leave_relations_out(pairs, seed=1)
    seen = {part: {f for p in getattr(split, part) for f in p.families} for part in ("train", "calibration", "test")}
    assert seen["train"] and seen["calibration"] and seen["test"]
    assert not seen["train"] & seen["test"] and not seen["train"] & seen["calibration"]
    assert not seen["calibration"] & seen["test"]
    # a pair whose two relations fall in different parts is in none
    across = [p for p in pairs if len({family_part(f, 1) for f in p.families}) > 1]
    assert across and not set(across) & set(split.train + split.calibration + split.test)


def test_excluded_source_is_tested_but_never_trained_or_calibrated() -> None:
    pairs = template_pairs(random.Random(0), per_property=2)
    other = [Pair(p.a, p.b, p.label, p.kind, "wiki_recent", p.families) for p in pairs[:200]]
    split = leave_relations_out(pairs + other, seed=1, exclude_sources=("wiki_recent",))
    assert all(p.source != "wiki_recent" for p in split.train + split.calibration)
    assert any(p.source == "wiki_recent" for p in split.test)
    held = leave_dataset_out(pairs + other, "wiki_recent", seed=1)
    assert {p.source for p in held.test} == {"wiki_recent"}
    assert all(p.source == "templates" for p in held.train + held.calibration)


def test_ship_split_trains_on_test_families_but_never_on_calibration_ones() -> None:
    pairs = template_pairs(random.Random(0), per_property=2)
    other = [Pair(p.a, p.b, p.label, p.kind, "wiki_recent", p.families) for p in pairs[:200]]
    held = leave_relations_out(pairs + other, seed=1, exclude_sources=("wiki_recent",))
    ship = ship_split(pairs + other, seed=1, exclude_sources=("wiki_recent",))
    trained = {f for p in ship.train for f in p.families}
    assert not ship.test and set(ship.calibration) == set(held.calibration)
    assert trained >= {f for p in held.test if p.source != "wiki_recent" for f in p.families}
    assert not trained & {f for p in ship.calibration for f in p.families}
    assert all(p.source != "wiki_recent" for p in ship.train + ship.calibration)
    assert ship.trained_families == "train and test families" != held.trained_families


def test_all_pairs_drops_identical_prompts(tmp_path) -> None:
    paths = _wiki_recent_file(tmp_path)
    zsre = [{"src": "Who founded Acme?", "rephrase": "Who founded Acme?", "subject": "Acme"}]
    cf = [{"prompt": "Acme is based in", "subject": "Acme", "rephrase_prompt": "Acme has its seat in"}]
    (tmp_path / "zs.json").write_text(json.dumps(zsre))
    (tmp_path / "cf.json").write_text(json.dumps(cf))
    pairs = all_pairs(DataPaths(tmp_path / "zs.json", tmp_path / "cf.json", paths.wiki_recent), per_property=1)
    assert all(p.a.strip() != p.b.strip() for p in pairs)
    assert {"zsre", "counterfact", "wiki_recent", "templates"} >= {p.source for p in pairs}
    assert any(p.source == "counterfact" and p.kind == "reword" for p in pairs)


def test_namesakes_differ_by_more_than_an_article() -> None:
    """'The Salt and Ember' and 'Salt and Ember' are one work: never a namesake (or other-subject) negative."""
    for pair in template_pairs(random.Random(3), per_property=6):
        if pair.kind in ("namesake", "relation_other_subject"):
            a, b = (p.lower().replace("the ", "") for p in (pair.a, pair.b))
            assert a != b, pair


def test_split_training_pairs_keep_their_labels_and_the_calibration_picks_the_best_weight() -> None:
    import numpy as np

    from melo_ray.editors.melo.scope.training.split_training import as_training_pairs, calibrated_weight

    pairs = template_pairs(random.Random(0), per_property=2)[:200]
    tuples = as_training_pairs(pairs)
    assert all(label == (kind in ("rephrase", "alias", "identity")) for _, _, label, kind, _ in tuples)
    assert {a for a, b, *_ in tuples if a == b} == {p.a for p in pairs}  # each prompt also with itself

    class Judge:  # logits = weight x (1 for a rewording, 0 for a negative) - a fixed noise
        def __init__(self, weight: float = 0.0) -> None:
            self.weight = weight

        def with_relation_weight(self, weight: float) -> "Judge":
            return Judge(weight)

        def logits(self, firsts, seconds) -> np.ndarray:
            return self.weight * firsts[:, 0] - seconds[:, 0]

    positive = np.array([[float(p.label)] for p in pairs])
    noise = np.random.default_rng(0).uniform(0, 1, size=(len(pairs), 1))
    chosen, threshold, report = calibrated_weight(Judge(), positive, noise, pairs, [0.0, 2.0])
    assert chosen.weight == 2.0 and report["calibration_rewordings_accepted"] == 1.0 and threshold <= 1.0
