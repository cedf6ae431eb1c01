"""UltraEdit on the tiny Llama: one closed-form step writes a batch of edits, with no training; the base
model stays a switch away, the lifelong normaliser carries across batches and snapshots round-trip."""
from __future__ import annotations

import pytest
import torch

from conftest import UNRELATED, fact_records, tiny_config
from melo_ray.config import load_config
from melo_ray.editors.loading import load_editor
from melo_ray.editors.registry import build_editor


def _records(start: int, n: int) -> list[dict]:
    # One-token targets after a trailing space: a single linearised step on the tiny byte-level model reaches the next token.
    return [{**r, "prompt": r["prompt"] + " ", "target": r["target"][0]} for r in fact_records(start, n)]


def test_ultraedit_writes_a_batch_in_closed_form_and_round_trips(tmp_path):
    config = load_config({**tiny_config().model_dump(), "editor": "ultraedit", "ultraedit": {"lr": 0.3, "layers": [2]}})
    editor = build_editor("ultraedit", config)
    records = _records(0, 6)
    prompts = [r["prompt"] for r in records]
    before = [g.output for g in editor.generate(UNRELATED)]
    result = editor.edit(records)
    assert result.steps == 1  # training-free: one pass of the edits, one solve

    outputs = editor.generate(prompts, 4)
    assert sum(g.output.startswith(r["target"]) for g, r in zip(outputs, records)) >= 5
    # no router: every prompt runs on the changed weights, and routing -1 is the exact base model
    assert [g.output for g in editor.generate(UNRELATED, base=True)] == before
    moments = next(iter(editor.normalisers[0].values()))
    seen = float(moments.count)
    editor.edit(_records(6, 4))
    assert float(moments.count) > seen  # running statistics over every edit so far

    editor.save(tmp_path / "snap")
    restored = load_editor(tmp_path / "snap")
    assert [g.output for g in restored.generate(prompts, 4)] == [g.output for g in editor.generate(prompts, 4)]
    restored_moments = next(iter(restored.normalisers[0].values()))
    assert torch.equal(restored_moments.mean, moments.mean) and float(restored_moments.count) == float(moments.count)
    with pytest.raises(NotImplementedError):  # dense weight changes: no single-edit revert
        restored.revert([records[0]["id"]])


def test_ultraedit_steps_a_batch_several_times_with_a_normaliser_each(tmp_path):
    config = load_config({**tiny_config().model_dump(), "editor": "ultraedit",
                          "ultraedit": {"lr": 0.1, "layers": [2], "iters": 2}})
    editor = build_editor("ultraedit", config)
    records = _records(0, 4)
    assert editor.edit(records).steps == 2
    first, second = (next(iter(n.values())) for n in editor.normalisers)
    assert float(first.count) == float(second.count) > 0  # each step saw the batch once
    assert not torch.equal(first.mean, second.mean)  # the second on the weights the first left

    editor.save(tmp_path / "snap")
    restored = load_editor(tmp_path / "snap")
    prompts = [r["prompt"] for r in records]
    assert [g.output for g in restored.generate(prompts, 4)] == [g.output for g in editor.generate(prompts, 4)]
    assert all(torch.equal(a[k].m2, b[k].m2) for a, b in zip(restored.normalisers, editor.normalisers) for k in a)


def test_ultraedit_chunks_the_forward_passes_into_one_solve():
    """As the reference: edits pass forward in chunks (each loss its own token mean), one normaliser update and
    one solve take every chunk's rows, and the package defaults are the reference's (one step, lr 1e-6)."""
    defaults = load_config({**tiny_config().model_dump(), "editor": "ultraedit"}).section("ultraedit")
    assert (defaults.iters, defaults.lr, defaults.forward_batch) == (1, 1e-6, 10)
    records = _records(0, 5)
    counts = []
    for chunk in (2, 5):
        config = load_config({**tiny_config().model_dump(), "editor": "ultraedit",
                              "ultraedit": {"lr": 0.3, "layers": [2], "forward_batch": chunk}})
        editor = build_editor("ultraedit", config)
        assert editor.edit(records).steps == 1
        counts.append(float(next(iter(editor.normalisers[0].values())).count))
    assert counts[0] == counts[1] == len(records)  # one row per target token: one-token targets


def test_ultraedit_clip_bounds_the_normalised_features():
    """Our safeguard, off by default as in the reference: with `clip` every normalised key and gradient entry
    is clamped, so the value shifts (and the weight change) can only shrink; the normaliser still sees the raw rows."""
    assert load_config({**tiny_config().model_dump(), "editor": "ultraedit"}).section("ultraedit").clip is None
    records = _records(0, 6)
    norms, counts = [], []
    for clip in (None, 0.1):
        config = load_config({**tiny_config().model_dump(), "editor": "ultraedit",
                              "ultraedit": {"lr": 0.3, "layers": [2], "clip": clip}})
        editor = build_editor("ultraedit", config)
        editor.edit(records)
        norms.append(float(next(iter(editor.layers.values())).delta.norm()))
        counts.append(float(next(iter(editor.normalisers[0].values())).m2.sum()))
    assert counts[0] == counts[1]
    assert 0 < norms[1] < norms[0]
