"""Edit records: the new fields round-trip through dicts, JSONL and Parquet; bad fields are named."""
from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from melo_ray.records import (
    EditRecord, LocalityProbe, PortabilityProbe, RecordError, parse_record, read_edit_records, write_parquet,
)

FULL = EditRecord(
    prompt="The gender of Tom Ash is", target="female", subject="Tom Ash",
    rephrases=("Tom Ash's gender is",), train_rephrases=("What is the gender of Tom Ash?",),
    alias_rephrases=("The gender of T. Ash is",),
    locality=(LocalityProbe("The place of birth of Tom Ash is", "Cesis", "subject"),
              LocalityProbe("The occupation of Tom Ash is", None, "subject"),
              LocalityProbe("The gender of Kim Poe is", "male", "neighbour"),
              LocalityProbe("who wrote hamlet", "Shakespeare", "nq")),
    portability=(PortabilityProbe("Tom Ash identifies as", "female"),),
)


def test_new_fields_round_trip_through_dict_jsonl_and_parquet(tmp_path):
    plain = EditRecord(prompt="Where does the apple live?", target="Oslo")
    assert parse_record(FULL.to_dict(), "x", 0) == FULL and EditRecord(**FULL.to_dict()) == FULL
    assert json.loads(json.dumps(FULL.to_dict())) == FULL.to_dict()
    # the single-probe columns mirror the first probe, for readers that only know them
    assert (FULL.locality_prompt, FULL.locality_answer) == ("The place of birth of Tom Ash is", "Cesis")
    assert [p.prompt for p in FULL.probes("subject")] == ["The place of birth of Tom Ash is", "The occupation of Tom Ash is"]
    write_parquet([FULL, plain], tmp_path / "e.parquet")
    assert read_edit_records(tmp_path / "e.parquet") == [FULL, plain]
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in (FULL, plain)))
    assert read_edit_records(tmp_path / "e.jsonl") == [FULL, plain]
    assert pq.read_schema(tmp_path / "e.parquet").field("locality").type == pa.list_(
        pa.struct([("prompt", pa.string()), ("answer", pa.string()), ("kind", pa.string())]))


def test_older_single_probe_columns_still_parse_as_one_neighbour_probe(tmp_path):
    old = pa.table({"prompt": ["p"], "target": ["t"], "rephrases": [["r"]],
                    "locality_prompt": ["Y is a native speaker of"], "locality_answer": ["French"]})
    pq.write_table(old, tmp_path / "old.parquet")
    record = read_edit_records(tmp_path / "old.parquet")[0]
    assert record.locality == (LocalityProbe("Y is a native speaker of", "French", "neighbour"),)
    assert record.id == EditRecord(prompt="p", target="t").id  # derived from the content, as before
    assert record.subject is None and record.train_rephrases == () and record.portability == ()


@pytest.mark.parametrize(("change", "field", "reason"), [
    ({"locality": [{"prompt": "a", "kind": "subject"}, {"prompt": "b", "kind": "same-subject"}]},
     "locality[1].kind", "must be one of"),
    ({"locality": [{"answer": "x", "kind": "nq"}]}, "locality[0].prompt", "is missing"),
    ({"locality": [{"prompt": "a", "answer": 3}]}, "locality[0].answer", "must be a string"),
    ({"locality": "The place of birth of X is"}, "locality", "must be a list of objects"),
    ({"locality": ["The place of birth of X is"]}, "locality[0]", "must be an object"),
    ({"portability": [{"prompt": "q", "answer": " "}]}, "portability[0].answer", "is empty"),
    ({"subject": ["Tom Ash"]}, "subject", "must be a string"),
    ({"train_rephrases": "one"}, "train_rephrases", "must be a list of strings"),
    ({"alias_rephrases": ["a", 2]}, "alias_rephrases", "must be a list of strings"),
])
def test_bad_new_fields_name_row_and_field(tmp_path, change, field, reason):
    rows = [FULL.to_dict(), {**FULL.to_dict(), **change}]
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecordError, match=re.escape(f"e.jsonl: row 1: field '{field}': {reason}")) as err:
        read_edit_records(tmp_path / "e.jsonl")
    assert (err.value.row, err.value.field) == (1, field)
