"""The evaluation harness end to end on a tiny model, and the two baselines."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import CONFIGS, UNRELATED, fact_records, tiny_config
from melo_ray.cli import main
from melo_ray.editors.grace import GraceEditor
from melo_ray.editors.lora_ft import SequentialLoraEditor
from melo_ray.metrics import success_rate


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_cli_writes_results_for_every_editor(tmp_path, capsys):
    records = [{**r, "rephrases": [r["prompt"].replace("Where", "where")], "locality_prompt": UNRELATED[i % 3],
                "locality_answer": "Nothing"}
               for i, r in enumerate(fact_records(0, 20))]
    edits = _jsonl(tmp_path / "edits.jsonl", records)
    nq = _jsonl(tmp_path / "nq.jsonl", [{"question": q, "answer": ["x"]} for q in UNRELATED])
    code = main(["eval", "--config", str(CONFIGS / "tiny-llama.yaml"), "--edits", str(edits), "--n-edits", "20",
                 "--editors", "melo,lora", "--batch-size", "10", "--every", "10", "--locality", str(nq),
                 "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    by_name = {r["editor"]: r for r in results["editors"]}
    assert set(by_name) == {"melo", "lora"}
    melo, lora = by_name["melo"], by_name["lora"]
    assert melo["reliability"] == 1.0 and melo["locality_nq"] == 1.0 and melo["token_accuracy"] == 1.0
    # sequential fine-tuning forgets the first batch and moves unrelated outputs; MELO does neither
    assert lora["reliability"] < melo["reliability"] and lora["locality_nq"] < 1.0
    assert [p["edits"] for p in melo["curve"]] == [10, 20]
    # edited targets become likely; MELO leaves the locality answers' perplexity exactly as the base model's
    assert melo["ppl_edited"] < 1.5 and melo["ppl_locality"] == melo["ppl_locality_base"]
    assert lora["ppl_locality"] != lora["ppl_locality_base"]
    assert melo["edits_per_min"] > 0 and melo["extra_parameters"] > 0
    assert (tmp_path / "out" / "curves.png").stat().st_size > 1000
    assert "| melo | 20 |" in (tmp_path / "out" / "results.md").read_text()
    assert "| melo | 20 |" in capsys.readouterr().out


def test_sequential_lora_forgets_and_its_base_mode_is_exact():
    editor = SequentialLoraEditor(tiny_config("tiny-llama"))
    base = [g.output for g in editor.generate(UNRELATED, base=True)]
    first = fact_records(0, 10)
    editor.edit(first)
    assert success_rate([g.output for g in editor.generate([r["prompt"] for r in first])], [r["target"] for r in first]) == 1.0
    editor.edit(fact_records(10, 10, "Name the {w} keeper."))
    assert success_rate([g.output for g in editor.generate([r["prompt"] for r in first])], [r["target"] for r in first]) < 0.5
    assert [g.output for g in editor.generate(UNRELATED, base=True)] == base


def _grace_with_keys(monkeypatch, keys: dict[str, list[float]]) -> GraceEditor:
    editor = GraceEditor(tiny_config("tiny-llama", grace={"eps_init": 1.0, "num_iter": 1}))
    dim = editor.layer.in_features

    def fake_keys(prompts):
        return torch.tensor([keys[p] + [0.0] * (dim - len(keys[p])) for p in prompts]).numpy()

    monkeypatch.setattr(editor.keys, "keys", fake_keys)
    return editor


def test_grace_codebook_adds_expands_and_splits(monkeypatch):
    editor = _grace_with_keys(monkeypatch, {"a": [0.0], "b": [1.5], "c": [2.2], "far": [9.0]})
    editor.edit([{"prompt": "a", "target": "X"}])
    editor.edit([{"prompt": "b", "target": "X"}])  # same label within eps_init + eps: expand
    assert editor.layer.eps.tolist() == [1.5] and len(editor.layer.labels) == 1
    editor.edit([{"prompt": "c", "target": "Y"}])  # another label within range: split
    assert editor.layer.eps.tolist() == pytest.approx([1.1, 1.1]) and editor.splits == 1
    editor.edit([{"prompt": "far", "target": "Z"}])  # out of range: new entry of radius eps_init
    assert editor.layer.eps.tolist() == pytest.approx([1.1, 1.1, 1.0])
    assert editor.route(["a", "c", "far"])[0].tolist() == [0, 1, 2]


def test_grace_leaves_inputs_outside_every_entry_bit_identical():
    editor = GraceEditor(tiny_config("tiny-llama", grace={"num_iter": 5}))
    before = editor.backbone.model(**editor.backbone.tokenizer(UNRELATED, return_tensors="pt", padding=True)).logits
    editor.edit(fact_records(0, 3))
    assert (editor.route(UNRELATED)[0] == -1).all()
    generations = editor.generate(UNRELATED)
    assert [g.output for g in generations] == [g.output for g in editor.generate(UNRELATED, base=True)]
    after = editor.backbone.model(**editor.backbone.tokenizer(UNRELATED, return_tensors="pt", padding=True)).logits
    assert torch.equal(before, after)
