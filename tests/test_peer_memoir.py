"""MEMOIR on the tiny Llama: a batch of edits is emitted, unrelated prompts run on the exact base model,
snapshots round-trip; single edits cannot be reverted."""
from __future__ import annotations

import pytest

from conftest import UNRELATED, fact_records, tiny_config
from melo_ray.config import load_config
from melo_ray.editors.registry import build_editor, load_editor

SETTINGS = {"num_iter": 100, "lr": 30.0, "top_k": 64, "threshold": 0.6, "background_samples": 20}


def test_memoir_edits_route_by_mask_overlap_and_round_trip(tmp_path):
    config = load_config({**tiny_config().model_dump(), "editor": "memoir", "memoir": SETTINGS})
    editor = build_editor("memoir", config)
    records = fact_records(0, 6)
    prompts = [r["prompt"] for r in records]
    before = [g.output for g in editor.generate(UNRELATED)]
    editor.edit(records)

    outputs = editor.generate(prompts, 6)
    assert sum(g.output.startswith(r["target"]) for g, r in zip(outputs, records)) >= 5
    assert all(g.block is not None for g in outputs)  # each edited prompt matches a stored mask
    unrelated = editor.generate(UNRELATED)
    assert [g.block for g in unrelated] == [None] * len(UNRELATED)  # no mask overlap: the base model
    assert [g.output for g in unrelated] == before
    assert editor.explain(prompts[0])["edit_id"] == records[0]["id"]

    editor.save(tmp_path / "snap")
    restored = load_editor(tmp_path / "snap")
    assert [g.output for g in restored.generate(prompts, 6)] == [g.output for g in outputs]

    with pytest.raises(NotImplementedError):  # edits share memory columns: no single-edit revert
        restored.revert([records[0]["id"]])
