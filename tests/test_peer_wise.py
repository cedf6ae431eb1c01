"""WISE on the tiny Llama: a side memory that learns a batch of edits while the router keeps unrelated
prompts on the main weight, knowledge shards set aside and Ties-merged, and a snapshot round trip."""
from __future__ import annotations

import pytest
import torch

from conftest import UNRELATED, fact_records, tiny_config
from melo_ray.config import load_config
from melo_ray.editors.registry import build_editor, load_editor
from melo_ray.editors.wise.editor import ties_merge

# The tiny model's random weights need bigger steps, a looser norm constraint and margins on the scale of
# its activation scores (hundreds, where a real model's are tens).
SETTINGS = {"lr": 10.0, "num_iter": 100, "mask_ratio": 0.5, "norm_constraint": 10.0, "negatives": 1,
            "alpha": 150.0, "beta": 250.0, "gamma": 50.0}


def _editor(**settings):
    return build_editor("wise", load_config({**tiny_config().model_dump(), "editor": "wise",
                                              "wise": {**SETTINGS, **settings}}))


def test_wise_side_memory_learns_edits_and_the_router_keeps_others_on_the_main_weight(tmp_path):
    editor = _editor()
    records = fact_records(0, 6)
    prompts = [r["prompt"] for r in records]
    before = [g.output for g in editor.generate(UNRELATED)]
    editor.edit(records)

    outputs = editor.generate(prompts, 6)
    assert all(g.block == 0 for g in outputs)  # every edited prompt scores above the memory's threshold
    assert sum(g.output.startswith(r["target"]) for g, r in zip(outputs, records)) >= 5
    unrelated = editor.generate(UNRELATED)
    assert [g.block for g in unrelated] == [None] * len(UNRELATED)
    assert [g.output for g in unrelated] == before

    editor.save(tmp_path / "snap")
    restored = load_editor(tmp_path / "snap")
    assert [g.output for g in restored.generate(prompts, 6)] == [g.output for g in outputs]
    with pytest.raises(NotImplementedError):  # a memory holds many edits: no single-edit revert
        restored.revert([records[0]["id"]])


def test_full_shards_are_set_aside_and_merged():
    editor = _editor(num_iter=3, save_freq=2, merge_freq=4)  # two edits a shard, two shards a merge
    records = fact_records(0, 6)
    for start in range(0, 6, 2):
        editor.edit(records[start : start + 2])
    assert editor.stats()["merged_memories"] == 1 and editor.stats()["memories"] == 2  # merged + set-aside
    assert torch.equal(editor.layer.side, editor.main)  # the open shard starts again from the main weight

    base = torch.zeros(2, 3)
    a, b, c = (torch.tensor(t, dtype=torch.float) for t in ([[1, 0, 0], [0, 0, 2]], [[0, 3, 0], [0, 0, 2]],
                                                              [[0, 0, 0], [0, 0, -1]]))
    merged = ties_merge(base, [a, b, c], density=1.0)
    # disjoint changes survive whole; where signs conflict the majority sign wins and its entries average
    assert torch.equal(merged, torch.tensor([[1.0, 3.0, 0.0], [0.0, 0.0, 2.0]]))
