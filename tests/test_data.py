"""Converters from the public data formats into edit records."""
from __future__ import annotations

import json

import pytest

from conftest import SHARED_DATA
from melo_ray.data import convert, zsre_subject_probes
from melo_ray.records import LocalityProbe, PortabilityProbe, read_edit_records


ZSRE_ROWS = [
    {"src": "Which family does Ramalinaceae belong to?", "alt": "Lamiinae", "rephrase": "What family are Ramalinaceae?",
     "loc": "nq question: who sings ain't nothing but a good time", "loc_ans": "Poison"},
    {"src": "Broken record", "alt": ""},
    "not an object",
]


def test_zsre_conversion_and_skipped_records_are_reported(tmp_path):
    (tmp_path / "z.json").write_text(json.dumps(ZSRE_ROWS))
    result = convert("zsre", tmp_path / "z.json")
    assert len(result.records) == 1
    record = result.records[0]
    assert record.target == "Lamiinae" and record.rephrases == ("What family are Ramalinaceae?",)
    assert record.locality == (LocalityProbe("who sings ain't nothing but a good time", "Poison", "nq"),)
    assert record.locality_prompt == "who sings ain't nothing but a good time"
    assert [i for i, _ in result.skipped] == [1, 2] and "alt" in result.skipped[0][1]


def test_data_convert_command_writes_parquet_and_reports_skipped_records(tmp_path, capsys):
    from melo_ray.cli.main import main

    (tmp_path / "z.json").write_text(json.dumps(ZSRE_ROWS))
    assert main(["data", "convert", "--format", "zsre", "--in", str(tmp_path / "z.json"), "--out", str(tmp_path / "z.parquet")]) == 0
    captured = capsys.readouterr()
    assert "converted=1 skipped=2" in captured.out and "skipped record 1" in captured.err
    assert read_edit_records(tmp_path / "z.parquet") == convert("zsre", tmp_path / "z.json").records


def test_counterfact_conversion(tmp_path):
    rows = [{"case_id": 7, "prompt": "The mother tongue of X is", "target_new": "English", "ground_truth": "French",
             "subject": "X", "rephrase_prompt": "X speaks", "locality_prompt": "Y is a native speaker of",
             "locality_ground_truth": "French"}]
    (tmp_path / "c.json").write_text(json.dumps(rows))
    record = convert("counterfact", tmp_path / "c.json").records[0]
    assert (record.id, record.target, record.locality_prompt) == ("counterfact-7", "English", "Y is a native speaker of")
    assert record.locality == (LocalityProbe("Y is a native speaker of", "French", "neighbour"),)
    assert record.question == "x | french"  # subject and true answer label the question, as for zsRE


def test_zsre_subject_probes_come_from_other_relations_of_the_same_subject(tmp_path):
    def row(src, subject, answer):
        return {"src": src, "alt": "new", "answers": [answer], "subject": subject, "loc": "nq question: q", "loc_ans": "a"}

    rows = [row("When was Luna 1 launched?", "Luna 1", "2 January 1959"),
            row("What is the launch date of Luna 1?", "Luna 1", "2 January 1959"),  # same relation, reworded
            row("Of what series is Luna 1 a part?", "Luna 1", "Luna programme"),
            row("Who wrote GODI?", "GODI", "OCaml")]
    probes = zsre_subject_probes(rows)
    assert sorted(probes) == [0, 1, 2]
    assert probes[0] == (LocalityProbe("Of what series is Luna 1 a part?", "Luna programme", "subject"),)
    assert [p.prompt for p in probes[2]] == ["When was Luna 1 launched?", "What is the launch date of Luna 1?"]
    (tmp_path / "z.json").write_text(json.dumps(rows))
    result = convert("zsre", tmp_path / "z.json")
    assert [len(r.probes("subject")) for r in result.records] == [1, 1, 2, 0]
    assert result.records[0].subject == "Luna 1" and result.records[0].locality[0].kind == "nq"
    assert result.counts()["locality_subject"] == 3 and result.counts()["locality_nq"] == 4


def test_zsre_questions_are_labelled_and_probes_never_ask_a_labelled_question_again(tmp_path):
    def row(src, subject, answer, alt="new"):
        return {"src": src, "alt": alt, "answers": [answer], "subject": subject}

    rows = [row("What war did Alec Rose fight in?", "Alec Rose", "Spanish Civil War"),
            row("Which battle involved Alec Rose?", "Alec Rose", "Spanish Civil War", alt="other"),
            row("Where was Ada Byron born?", "Ada Byron", "London")]
    (tmp_path / "z.json").write_text(json.dumps(rows))
    records = convert("zsre", tmp_path / "z.json", subject_probes=2).records
    assert records[0].question == records[1].question == "alec rose | spanish civil war" != records[2].question
    # "{} involved which battle" asks the war question again (one label), so it is never Alec Rose's probe
    assert all("battle" not in p.prompt for p in records[0].probes("subject"))
    assert read_edit_records_round_trip(tmp_path, records) == records


def read_edit_records_round_trip(tmp_path, records):
    from melo_ray.records import write_parquet

    write_parquet(records, tmp_path / "r.parquet")
    return read_edit_records(tmp_path / "r.parquet")


def test_knowedit_conversion_tags_every_probe(tmp_path):
    rows = [
        {"subject": "Tom Ash", "prompt": "The gender of Tom Ash is", "target_new": "female",
         "locality": {"Relation_Specificity": [
             {"prompt": "The place of birth of Tom Ash is", "ground_truth": [["Cesis"]]},
             {"prompt": "The name of the award Tom Ash won is", "ground_truth": [[], ["Cross of Recognition", "CoR"]]},
             {"prompt": "The name of the father of Tom Ash is", "ground_truth": [[]]}],
             "Forgetfulness": [{"prompt": "The sibling of Tom Ash, which is not Ann, is", "ground_truth": [["Bo"]]}]},
         "portability": {
             "Subject_Aliasing": [{"prompt": "The gender of T. Ash is", "ground_truth": [["female", "woman"]]}],
             "Reasoning": [{"prompt": "The pronoun of Tom Ash is", "ground_truth": [["she"]]}],
             "Logical_Generalization": [{"prompt": "Tom Ash is a", "ground_truth": "woman"}]}},
        {"subject": "Lee Orr", "prompt": "The occupation of Lee Orr is", "target_new": "luger", "portability": {},
         "locality": {}},
        {"subject": "No target", "prompt": "The occupation of X is", "target_new": ""},
    ]
    (tmp_path / "k.json").write_text(json.dumps(rows))
    result = convert("knowedit", tmp_path / "k.json")
    first, second = result.records
    assert (first.id, first.subject, first.target) == ("knowedit-0", "Tom Ash", "female")
    assert first.locality == (LocalityProbe("The place of birth of Tom Ash is", "Cesis", "subject"),
                              LocalityProbe("The name of the award Tom Ash won is", "Cross of Recognition", "subject"),
                              LocalityProbe("The name of the father of Tom Ash is", None, "subject"))
    assert first.alias_rephrases == ("The gender of T. Ash is",) and first.rephrases == ()
    assert first.portability == (PortabilityProbe("The pronoun of Tom Ash is", "she"), PortabilityProbe("Tom Ash is a", "woman"))
    assert second.locality == () and second.portability == ()
    assert [i for i, _ in result.skipped] == [2] and "target_new" in result.skipped[0][1]
    assert result.counts() == {"records": 2, "skipped": 1, "locality_neighbour": 0, "locality_subject": 1,
                               "locality_nq": 0, "rephrases": 0, "alias_rephrases": 1, "portability": 1}


def test_knowedit_zsre_split_keeps_rephrasings_and_labels_each_question(tmp_path):
    def row(prompt, target, rephrase_key="rephrase"):
        return {"subject": "Luna 1", "prompt": prompt, "target_new": target, "ground_truth": ["2 January 1959"],
                rephrase_key: prompt.replace("When was", "On what date was"),
                "locality": {"Relation_Specificity": [{"prompt": "Luna 1 is part of", "ground_truth": ["Luna"]}]}}

    rows = [row("When was Luna 1 launched?", "1960"), row("When was Luna 1 sent up?", "1961", "rephrase_prompt")]
    (tmp_path / "z.json").write_text(json.dumps(rows))
    first, second = convert("knowedit", tmp_path / "z.json").records
    assert first.rephrases == ("On what date was Luna 1 launched?",)
    assert second.rephrases == ("On what date was Luna 1 sent up?",)  # the other spelling of the field
    assert first.question == second.question == "luna 1 | 2 january 1959"  # one question asked twice
    assert first.probes("subject")[0].prompt == "Luna 1 is part of"


def test_wikibio_conversion_keeps_a_locality_probe(tmp_path):
    rows = [{"text": "This is a passage about x.", "labels": "X was born in 1900.", "concept": "x",
             "locality": {"Relation_Specificity": [{"prompt": "The field of work of x is", "ground_truth": ["medicine"]}]}}]
    (tmp_path / "w.json").write_text(json.dumps(rows))
    record = convert("wikibio", tmp_path / "w.json").records[0]
    assert (record.target, record.locality_prompt, record.locality_answer) == (
        "X was born in 1900.", "The field of work of x is", "medicine")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside this checkout")
def test_real_files_convert_without_losses():
    zsre = convert("zsre", SHARED_DATA / "zsre-mend-eval-subsets/zsre_mend_eval_portability_gpt4.json")
    cf = convert("counterfact", SHARED_DATA / "counterfact-mend-splits/counterfact-edit.json")
    nq = convert("nq", SHARED_DATA / "nq-open/NQ-open.dev.jsonl")
    recent = convert("knowedit", SHARED_DATA / "knowedit/benchmark_wiki_recent_recent_train.json")
    assert len(zsre.records) + len(zsre.skipped) == 1037 and len(zsre.records) > 1000
    assert len(cf.records) + len(cf.skipped) == 10000 and len(nq.records) == 3610 - len(nq.skipped)
    assert len(recent.records) == 570 and recent.counts()["locality_subject"] == 403
