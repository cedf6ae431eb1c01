"""The CLI contract: edit / generate / data convert, and clear errors for bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import CONFIGS, UNRELATED, fact_records
from melo_ray.cli.main import main
from melo_ray.editors.loading import load_editor
from melo_ray.metrics import starts_with_target as edit_success

TINY = str(CONFIGS / "tiny-llama.yaml")


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_edit_then_generate_from_parquet(tmp_path, capsys):
    records = fact_records(0, 10)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "edits.parquet")
    assert main(["edit", "--config", TINY, "--edits", str(tmp_path / "edits.parquet"),
                 "--out", str(tmp_path / "snap"), "--batch-size", "5", "--quiet"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "edits=10 blocks=2" in summary and "edits_per_min=" in summary and "forgotten=" in summary
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in records] + [{"prompt": p} for p in UNRELATED])
    assert main(["generate", "--snapshot", str(tmp_path / "snap"), "--prompts", str(prompts), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert set(rows[0]) == {"prompt", "output", "block", "snapshot_version"}
    assert all(edit_success(row["output"], r["target"]) for row, r in zip(rows, records))
    assert [row["block"] for row in rows[:10]] == [0] * 5 + [1] * 5
    assert all(row["block"] is None for row in rows[10:]) and rows[0]["snapshot_version"] == 2
    assert main(["generate", "--base", "--config", TINY, "--prompts", str(prompts), "--json"]) == 0
    base_rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["output"] for r in base_rows[10:]] == [r["output"] for r in rows[10:]]
    assert all(r["block"] is None and r["snapshot_version"] is None for r in base_rows)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"prompt": "a", "target": "b"}, {"prompt": "c"}], "row 1: field 'target': is missing"),
        ([{"prompt": "a", "target": "b"}, {"prompt": "", "target": "x"}], "row 1: field 'prompt': is empty"),
        ([{"prompt": "a", "target": 5}], "row 0: field 'target': must be a string"),
        ([{"prompt": "a", "target": "b", "rephrases": "not a list"}], "row 0: field 'rephrases': must be a list"),
        ([{"target": "b"}], "field 'prompt': column is missing"),
    ],
)
def test_bad_input_exits_non_zero_naming_row_and_field(tmp_path, capsys, rows, message):
    edits = _jsonl(tmp_path / "edits.jsonl", rows)
    code = main(["edit", "--config", TINY, "--edits", str(edits), "--out", str(tmp_path / "snap"), "--quiet"])
    assert code != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "snap").exists()


def test_unreadable_files_are_clear_errors(tmp_path, capsys):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    assert main(["edit", "--config", TINY, "--edits", str(tmp_path / "bad.parquet"), "--out", str(tmp_path / "s")]) == 2
    assert "cannot read Parquet" in capsys.readouterr().err
    assert main(["edit", "--config", TINY, "--edits", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "s")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "target": "b"}\n{oops\n')
    assert main(["edit", "--config", TINY, "--edits", str(tmp_path / "broken.jsonl"), "--out", str(tmp_path / "s")]) == 2
    assert "row 1" in capsys.readouterr().err


def test_a_failed_edit_does_not_touch_an_existing_snapshot(tmp_path, capsys):
    good = _jsonl(tmp_path / "good.jsonl", fact_records(0, 4))
    assert main(["edit", "--config", TINY, "--edits", str(good), "--out", str(tmp_path / "snap"), "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "snap").iterdir()}
    bad = _jsonl(tmp_path / "bad.jsonl", fact_records(4, 3) + [{"prompt": "x", "target": ""}])
    assert main(["edit", "--config", TINY, "--edits", str(bad), "--out", str(tmp_path / "snap"),
                 "--resume-from", str(tmp_path / "snap"), "--quiet"]) == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "snap").iterdir()} == before


def test_config_errors_name_the_file_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(TINY).read_text().replace("block_rank: 4", "block_rank: -1"))
    edits = _jsonl(tmp_path / "e.jsonl", fact_records(0, 2))
    assert main(["edit", "--config", str(bad), "--edits", str(edits), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "lora.block_rank" in err


def test_an_interrupted_edit_resumes_without_losing_or_repeating_edits(tmp_path, capsys, monkeypatch):
    from melo_ray.editors.melo.editor import MeloEditor

    edits = _jsonl(tmp_path / "edits.jsonl", fact_records(0, 12))
    args = ["edit", "--config", TINY, "--edits", str(edits), "--batch-size", "4", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "whole")]) == 0

    real_edit, calls = MeloEditor.edit, []

    def dies_on_third_batch(self, batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the process were killed mid-job
        return real_edit(self, batch)

    monkeypatch.setattr(MeloEditor, "edit", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        main(args + ["--out", str(tmp_path / "resumed")])
    monkeypatch.setattr(MeloEditor, "edit", real_edit)
    assert load_editor(tmp_path / "resumed").stats()["edits"] == 8
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "resumed"), "--resume"]) == 0
    assert "8 of 12 edits already applied" in capsys.readouterr().err

    whole, resumed = load_editor(tmp_path / "whole"), load_editor(tmp_path / "resumed")
    assert resumed.stats() == whole.stats() and resumed.version == whole.version == 3
    prompts = [r["prompt"] for r in fact_records(0, 12)] + UNRELATED
    assert [g.output for g in resumed.generate(prompts)] == [g.output for g in whole.generate(prompts)]


def test_set_overrides_reach_the_snapshot_and_bad_ones_name_the_field(tmp_path, capsys):
    edits = _jsonl(tmp_path / "e.jsonl", fact_records(0, 4))
    assert main(["edit", "--config", TINY, "--editor", "elder", "--set", "elder.guide_stored=true",
                 "--set", "elder.replay=2", "--edits", str(edits), "--out", str(tmp_path / "s"), "--quiet"]) == 0
    elder = json.loads((tmp_path / "s" / "manifest.json").read_text())["config"]["elder"]
    assert (elder["guide_stored"], elder["replay"]) == (True, 2)
    assert main(["edit", "--config", TINY, "--set", "elder.replay=-1", "--edits", str(edits),
                 "--out", str(tmp_path / "t"), "--quiet"]) == 2
    assert "elder.replay" in capsys.readouterr().err and not (tmp_path / "t").exists()
    # a resumed snapshot keeps its own config: an override there is refused, not silently dropped
    assert main(["edit", "--config", TINY, "--editor", "elder", "--set", "elder.replay=5", "--edits", str(edits),
                 "--out", str(tmp_path / "u"), "--resume-from", str(tmp_path / "s"), "--quiet"]) == 2
    assert "--set applies to a fresh run" in capsys.readouterr().err and not (tmp_path / "u").exists()


def test_edit_and_generate_with_the_elder_editor(tmp_path, capsys):
    records = fact_records(0, 10)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "edits.parquet")
    assert main(["edit", "--config", TINY, "--editor", "elder", "--edits", str(tmp_path / "edits.parquet"),
                 "--out", str(tmp_path / "snap"), "--batch-size", "5", "--quiet"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "editor=elder edits=10" in summary and "facts=10" in summary
    assert json.loads((tmp_path / "snap" / "manifest.json").read_text())["editor"] == "elder"
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in records])
    assert main(["generate", "--snapshot", str(tmp_path / "snap"), "--prompts", str(prompts), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert all(row["block"] == 0 for row in rows)  # every edited prompt uses the expert mixture
    # the last batch holds (the tiny default config has no replay, so ELDER may forget the first one)
    assert all(edit_success(row["output"], r["target"]) for row, r in zip(rows[5:], records[5:]))
    # resuming an ELDER snapshot as a MELO run is refused, and the snapshot stays as it was
    before = (tmp_path / "snap" / "manifest.json").read_bytes()
    assert main(["edit", "--config", TINY, "--edits", str(tmp_path / "edits.parquet"), "--out",
                 str(tmp_path / "other"), "--resume-from", str(tmp_path / "snap"), "--quiet"]) != 0
    assert "snapshot is for editor 'elder', not 'melo'" in capsys.readouterr().err
    assert (tmp_path / "snap" / "manifest.json").read_bytes() == before
