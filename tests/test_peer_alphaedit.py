"""AlphaEdit on the tiny Llama: a batch of edits is written into the MLPs, the preserved text's own inputs
see no change (the null-space projection), and snapshots round-trip."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import UNRELATED, fact_records, tiny_config
from melo_ray.config import load_config
from melo_ray.editors.loading import load_editor
from melo_ray.editors.registry import build_editor


def _records(n: int) -> list[dict]:
    # One-token targets after a trailing space: the tiny model reads bytes, and a locate-then-edit change at one token decides
    # the next token only (a real tokenizer's answer is a token or two).
    return [{**r, "prompt": r["prompt"] + " ", "target": r["target"][0]} for r in fact_records(0, n)]


def test_alphaedit_writes_edits_and_leaves_preserved_inputs_untouched(tmp_path):
    preserved = tmp_path / "preserved.jsonl"  # the preserved text: the unrelated prompts themselves
    preserved.write_text("".join(json.dumps({"text": t}) + "\n" for t in UNRELATED))
    settings = {"covariance_text": str(preserved), "v_num_grad_steps": 40, "v_lr": 0.5}
    config = load_config({**tiny_config().model_dump(), "editor": "alphaedit", "alphaedit": settings})
    editor = build_editor("alphaedit", config)
    records = _records(6)
    prompts = [r["prompt"] for r in records]
    editor.edit(records)

    outputs = editor.generate(prompts, 4)
    assert sum(g.output.startswith(r["target"]) for g, r in zip(outputs, records)) >= 5
    # their keys see no weight change: the next token after each preserved prompt is the base model's
    assert torch.allclose(editor.next_token_logits(UNRELATED), editor.next_token_logits(UNRELATED, base=True),
                          atol=1e-3)  # float32 round-off of a zero change
    null_space = sum(round(float(p.trace())) for p in editor.projections.values())
    assert 0 < null_space < 2 * 128  # two edited MLPs of 128 units

    editor.save(tmp_path / "snap")
    restored = load_editor(tmp_path / "snap")
    assert [g.output for g in restored.generate(prompts, 4)] == [g.output for g in outputs]
    assert [g.output for g in restored.generate(prompts, 4, base=True)] != [g.output for g in outputs]
    with pytest.raises(NotImplementedError):  # dense weight changes: no single-edit revert
        restored.revert([records[0]["id"]])
