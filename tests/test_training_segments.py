"""Rows of each prompt format replayed at their own width give the logits of the padded batch, and a
batch trained that way learns every edit in both formats."""
import torch

from conftest import fact_records, tiny_config
from melo_ray.editors.melo.editor import MeloEditor
from melo_ray.records import parse_records
from melo_ray.training import _CachedPrefix, _rows_of_batch, _Segments, _through_last_target, build_batch, in_formats


def test_segments_give_the_padded_batchs_logits_at_their_own_width():
    editor = MeloEditor(tiny_config("tiny-llama"))
    backbone, names = editor.backbone, list(editor.layers)
    records = parse_records(fact_records(0, 4))
    rows = in_formats(backbone, records, ["raw", "chat"])  # 4 short rows, then 4 long ones
    batch = build_batch(backbone, rows, False, rendered=True)
    whole = _CachedPrefix(backbone, names, _through_last_target(batch))
    parts = _Segments([(0, _CachedPrefix(backbone, names, _through_last_target(_rows_of_batch(batch, 0, 4)))),
                       (4, _CachedPrefix(backbone, names, _through_last_target(_rows_of_batch(batch, 4, 8))))], 8)
    assert parts.parts[0][1].hidden.shape[1] < whole.hidden.shape[1]  # raw rows no longer padded to chat width
    torch.testing.assert_close(parts.targets, whole.targets)
    torch.testing.assert_close(parts.rows, whole.rows)
    with torch.no_grad():
        torch.testing.assert_close(parts.logits(), whole.logits(), atol=1e-4, rtol=1e-4)
        keep = torch.tensor([1, 2, 5, 7])
        torch.testing.assert_close(parts.logits(keep), whole.logits(keep), atol=1e-4, rtol=1e-4)
        assert torch.equal(parts.selection(keep)[0], whole.selection(keep)[0])


def test_an_edit_trained_in_both_formats_holds_raw_and_through_chat():
    editor = MeloEditor(tiny_config("tiny-llama", lora={"block_per_edit": True}, train={"formats": ["raw", "chat"]}))
    records = fact_records(0, 6)
    editor.edit(records)
    prompts = [r["prompt"] for r in records]
    for view in ("raw", "chat"):
        editor.backbone.prompt_view = view
        outputs = [g.output for g in editor.generate(prompts, 6)]
        assert all(o.startswith(r["target"]) for o, r in zip(outputs, records)), (view, outputs)
    editor.backbone.prompt_view = "raw"


def test_unset_formats_train_every_format_the_backbone_can_be_served_in():
    from melo_ray.backbones import load_backbone
    from melo_ray.training import training_formats

    llama = load_backbone(tiny_config("tiny-llama").backbone)  # a causal LM with a chat template
    assert training_formats(llama, None) == ["raw", "chat"]
    assert training_formats(llama, ["raw"]) == ["raw"]  # an explicit choice is kept
    t5 = load_backbone(tiny_config("tiny-t5").backbone)  # no chat route for an encoder-decoder
    assert training_formats(t5, None) == ["raw"]
