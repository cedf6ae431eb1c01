"""Converters from the public data formats into edit records."""
from __future__ import annotations

import json

import pytest

from conftest import SHARED_DATA
from melo_ray.cli import main
from melo_ray.data import convert
from melo_ray.records import read_edit_records


def test_zsre_conversion_and_skipped_records_are_reported(tmp_path, capsys):
    rows = [
        {"src": "Which family does Ramalinaceae belong to?", "alt": "Lamiinae", "rephrase": "What family are Ramalinaceae?",
         "loc": "nq question: who sings ain't nothing but a good time", "loc_ans": "Poison"},
        {"src": "Broken record", "alt": ""},
        "not an object",
    ]
    (tmp_path / "z.json").write_text(json.dumps(rows))
    result = convert("zsre", tmp_path / "z.json")
    assert len(result.records) == 1
    record = result.records[0]
    assert record.target == "Lamiinae" and record.rephrases == ("What family are Ramalinaceae?",)
    assert record.locality_prompt == "who sings ain't nothing but a good time"
    assert [i for i, _ in result.skipped] == [1, 2] and "alt" in result.skipped[0][1]
    assert main(["data", "convert", "--format", "zsre", "--in", str(tmp_path / "z.json"), "--out", str(tmp_path / "z.parquet")]) == 0
    captured = capsys.readouterr()
    assert "converted=1 skipped=2" in captured.out and "skipped record 1" in captured.err
    assert read_edit_records(tmp_path / "z.parquet")[0].prompt == record.prompt


def test_counterfact_conversion(tmp_path):
    rows = [{"case_id": 7, "prompt": "The mother tongue of X is", "target_new": "English", "ground_truth": "French",
             "rephrase_prompt": "X speaks", "locality_prompt": "Y is a native speaker of", "locality_ground_truth": "French"}]
    (tmp_path / "c.json").write_text(json.dumps(rows))
    record = convert("counterfact", tmp_path / "c.json").records[0]
    assert (record.id, record.target, record.locality_prompt) == ("counterfact-7", "English", "Y is a native speaker of")


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
    assert len(zsre.records) + len(zsre.skipped) == 1037 and len(zsre.records) > 1000
    assert len(cf.records) + len(cf.skipped) == 10000 and len(nq.records) == 3610 - len(nq.skipped)
