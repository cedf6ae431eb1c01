"""MELO editor on tiny models: the properties of lifelong editing, snapshots, all-or-nothing edits."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import UNRELATED, fact_records, tiny_config
from melo_ray.backbones import load_backbone
from melo_ray.editors.layers import weights_checksum
from melo_ray.editors.loading import load_editor, restore_editor
from melo_ray.editors.melo.editor import MeloEditor
from melo_ray.metrics import starts_with_target as edit_success
from melo_ray.records import RecordError, parse_records
from melo_ray.snapshots import SnapshotError


def _successes(editor: MeloEditor, records: list[dict]) -> int:
    outputs = editor.generate([r["prompt"] for r in records])
    return sum(edit_success(o.output, r["target"]) for o, r in zip(outputs, records))


@pytest.fixture(scope="module")
def edited():
    """One tiny Llama with 5 sequential batches of 10 edits (shared by the read-only tests)."""
    editor = MeloEditor(tiny_config("tiny-llama"))
    batches = [fact_records(0, 10, t) for t in (
        "Where does the {w} live?", "Who owns the {w} now?", "What colour is the {w} today?",
        "Which town made the {w}?", "Name the {w} keeper.",
    )]
    results = [editor.edit(b) for b in batches]
    return editor, batches, results


def test_property1_every_edited_prompt_yields_its_target(edited):
    editor, batches, _ = edited
    last = batches[-1]
    assert _successes(editor, last) == len(last)


def test_property4_first_batch_still_holds_after_five_batches(edited):
    editor, batches, results = edited
    assert [r.block for r in results] == [0, 1, 2, 3, 4]
    assert _successes(editor, batches[0]) == len(batches[0])


def test_property2_prompts_outside_every_cluster_give_bit_identical_base_logits(edited):
    editor, batches, _ = edited
    blocks = editor.route(UNRELATED).ids
    assert (blocks == -1).all()
    fresh = load_backbone(editor.config.backbone)  # a never-edited model with the same weights
    inputs = fresh.tokenizer(UNRELATED, return_tensors="pt", padding=True, padding_side="right")
    with torch.no_grad():
        base_logits = fresh.model(**inputs).logits
        edited_logits = editor.backbone.model(**inputs).logits  # routing off: the base path
    assert torch.equal(base_logits, edited_logits)
    last = inputs["attention_mask"].sum(1) - 1
    routed = editor.next_token_logits(UNRELATED)
    assert torch.equal(routed, base_logits[torch.arange(len(UNRELATED)), last])
    # mixed batch: edited rows take their block, unrelated rows stay exactly on the base model
    mixed = [batches[0][0]["prompt"]] + UNRELATED
    mixed_logits = editor.next_token_logits(mixed)
    assert torch.equal(mixed_logits[1:], editor.next_token_logits(UNRELATED, base=True))


def test_base_weights_never_change(edited):
    editor, _, _ = edited
    fresh = load_backbone(editor.config.backbone)
    assert weights_checksum(editor.backbone.model) == weights_checksum(fresh.model) == editor.base_checksum


def test_unrelated_outputs_equal_the_base_model(edited):
    editor, _, _ = edited
    routed = [g.output for g in editor.generate(UNRELATED)]
    base = [g.output for g in editor.generate(UNRELATED, base=True)]
    assert routed == base


def test_snapshot_round_trip_gives_identical_outputs(edited, tmp_path):
    editor, batches, _ = edited
    manifest = editor.save(tmp_path / "snap")
    assert manifest["version"] == 5 and manifest["stats"]["blocks"] == 5
    loaded = load_editor(tmp_path / "snap")
    prompts = [r["prompt"] for b in batches for r in b] + UNRELATED
    assert [g.output for g in loaded.generate(prompts)] == [g.output for g in editor.generate(prompts)]
    assert torch.equal(loaded.next_token_logits(prompts), editor.next_token_logits(prompts))
    assert loaded.stats() == editor.stats() and loaded.version == editor.version


def test_corrupted_snapshot_is_refused(edited, tmp_path):
    editor, _, _ = edited
    editor.save(tmp_path / "snap")
    blob = bytearray((tmp_path / "snap" / "adapters-00000.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (tmp_path / "snap" / "adapters-00000.safetensors").write_bytes(bytes(blob))
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        load_editor(tmp_path / "snap")
    manifest = json.loads((tmp_path / "snap" / "manifest.json").read_text())
    manifest["version"] = 99
    (tmp_path / "snap" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match="manifest checksum"):
        load_editor(tmp_path / "snap")


def test_snapshot_on_other_base_weights_is_refused(edited, tmp_path):
    editor, _, _ = edited
    editor.save(tmp_path / "snap")
    other = MeloEditor(tiny_config("tiny-llama", backbone={"seed": 1}))
    with pytest.raises(SnapshotError, match="other base weights"):
        restore_editor(other, tmp_path / "snap")


def test_a_failed_batch_leaves_blocks_and_index_untouched(monkeypatch):
    editor = MeloEditor(tiny_config("tiny-llama"))
    editor.edit(fact_records(0, 5))
    before = (editor.stats(), editor.version, [l.lora_bank_A.clone() for l in editor.layers.values()])

    def explode(*args, **kwargs):
        raise RuntimeError("trainer died")

    monkeypatch.setattr("melo_ray.editors.melo.editor.train_block", explode)
    with pytest.raises(RuntimeError, match="trainer died"):
        editor.edit(fact_records(5, 5))
    assert editor.stats() == before[0] and editor.version == before[1]
    assert all(torch.equal(a, l.lora_bank_A) for a, l in zip(before[2], editor.layers.values()))
    assert all(l.lora_staging_A is None for l in editor.layers.values())


def test_bad_records_are_refused_before_anything_changes():
    editor = MeloEditor(tiny_config("tiny-llama"))
    with pytest.raises(RecordError, match=r"row 1: field 'target': is empty"):
        editor.edit([{"prompt": "a", "target": "b"}, {"prompt": "c", "target": "  "}])
    with pytest.raises(RecordError, match=r"row 0: field 'prompt': must be a string"):
        editor.edit([{"prompt": 3, "target": "b"}])
    assert editor.stats()["blocks"] == 0 and editor.version == 0


def test_re_editing_a_prompt_later_the_latest_target_wins():
    editor = MeloEditor(tiny_config("tiny-llama"))
    first = fact_records(0, 6)
    editor.edit(first)
    changed = [{**first[0], "target": "Zurich"}]
    editor.edit(changed)
    out = editor.generate([first[0]["prompt"]])[0]
    assert out.block == 1 and edit_success(out.output, "Zurich")
    assert _successes(editor, first[1:]) == 5  # the other facts of batch 1 still hold


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-t5", "tiny-bert"])
def test_other_families_learn_their_edits(name):
    editor = MeloEditor(tiny_config(name))
    records = fact_records(0, 10)
    if name == "tiny-bert":
        labels = editor.backbone.labels
        records = [{**r, "target": labels[i % len(labels)]} for i, r in enumerate(records)]
    editor.edit(records)
    assert _successes(editor, records) == len(records)
    assert [g.output for g in editor.generate(UNRELATED)] == [g.output for g in editor.generate(UNRELATED, base=True)]


def test_cached_prefix_training_matches_the_full_forward():
    """The fast path is an optimisation only: same first loss, same learned block."""
    results = {}
    for cached in (True, False):
        editor = MeloEditor(tiny_config("tiny-llama", train={"cache_frozen_prefix": cached, "early_stop": False,
                                                             "num_iter": 5, "compute_dtype": "float32"}))
        results[cached] = (editor.edit(fact_records(0, 8)), editor.layers)
    fast, full = results[True][0], results[False][0]
    assert fast.steps == full.steps == 5
    assert fast.final_loss == pytest.approx(full.final_loss, rel=1e-4)
    for a, b in zip(results[True][1].values(), results[False][1].values()):
        torch.testing.assert_close(a.lora_bank_B, b.lora_bank_B, rtol=1e-3, atol=1e-5)


def test_bfloat16_steps_end_with_every_target_learned_in_float32():
    """Mixed precision trains in bfloat16 but an edit is done only when float32 (serving) agrees."""
    editor = MeloEditor(tiny_config("tiny-llama", train={"compute_dtype": "bfloat16"}))
    records = fact_records(0, 10)
    result = editor.edit(records)
    assert result.learned == 1.0
    hits = editor.target_token_hits(parse_records(records))  # float32 forward
    assert all(all(row) for row in hits)
    assert _successes(editor, records) == len(records)


def test_low_precision_copies_give_what_autocast_gives():
    """The cached bf16 copies of the frozen top are only a saving: the same logits as autocast's casts."""
    from melo_ray.training import _CachedPrefix, build_batch

    backbone = load_backbone(tiny_config("tiny-llama").backbone)
    batch = build_batch(backbone, parse_records(fact_records(0, 4)), append_eos=True)
    names = ["model.layers.1.mlp.down_proj"]
    plain = _CachedPrefix(backbone, names, batch)
    copied = _CachedPrefix(backbone, names, batch, torch.bfloat16)
    assert copied.copies and all(t.dtype == torch.bfloat16 for c in copied.copies.values() for t in c.values())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(copied.logits(), plain.logits(), rtol=0, atol=0)
    with torch.no_grad():  # outside autocast the copies are not used: exact float32
        full = copied.logits()
        assert full.dtype == torch.float32
        torch.testing.assert_close(full, plain.logits(), rtol=0, atol=0)


def test_training_dtype_lowers_only_float32_and_only_where_native(tmp_path):
    from melo_ray.precision import cpu_has_native_bf16, training_dtype

    cpu = torch.device("cpu")
    assert training_dtype("float32", cpu, torch.float32) is None
    assert training_dtype("bfloat16", cpu, torch.float32) is torch.bfloat16
    assert training_dtype("bfloat16", cpu, torch.bfloat16) is None  # already 16-bit: trains as it is
    cuda = torch.device("cuda")  # auto keeps float32 on a GPU (measured faster there); asked for, bf16
    assert training_dtype("auto", cuda, torch.float32) is None
    assert training_dtype("bfloat16", cuda, torch.float32) is torch.bfloat16
    with_flag, without = tmp_path / "with", tmp_path / "without"
    with_flag.write_text("processor : 0\nflags : fpu avx2 avx512f avx512_bf16\n")
    without.write_text("processor : 0\nflags : fpu avx2 avx512f\n")
    assert cpu_has_native_bf16(with_flag) and not cpu_has_native_bf16(without)
    assert not cpu_has_native_bf16(tmp_path / "missing")


def test_key_layer_after_a_lora_layer_is_a_config_error():
    with pytest.raises(ValueError, match="must run before every LoRA layer"):
        MeloEditor(tiny_config("tiny-llama", index={"key_module": "model.layers.3"}))


def test_teacher_forced_target_tokens_are_all_hit_after_editing(edited):
    editor, batches, _ = edited
    from melo_ray.records import parse_records

    hits = editor.target_token_hits(parse_records(batches[-1]))
    assert all(all(row) for row in hits) and all(len(row) > 0 for row in hits)
    unrelated = parse_records([{"prompt": p, "target": "Oslo"} for p in UNRELATED])
    assert not all(all(row) for row in editor.target_token_hits(unrelated))


def test_block_per_edit_trains_each_edit_its_own_block_in_one_batch_and_the_writer_agrees():
    from melo_ray.editors.melo.writer import MeloWriter
    from melo_ray.records import parse_records

    config = tiny_config("tiny-llama", lora={"block_per_edit": True})
    editor = MeloEditor(config)
    records = fact_records(0, 6)
    detached = editor.train_detached(parse_records(records), 0)
    writer = MeloWriter.create(config, editor.writer_layout())
    writer.commit(detached)
    result = editor.edit(records)
    assert result.block == 0 and editor.stats()["blocks"] == 6 and writer.num_blocks == 6
    assert [editor.edit_log[r["id"]].block for r in records] == list(range(6))
    assert editor.route([r["prompt"] for r in records]).ids.tolist() == list(range(6))
    assert _successes(editor, records) == len(records)
    # blocks of one batch train together, yet each learns only from its own edit's rows
    slots = {name: layer.lora_bank_B for name, layer in editor.layers.items()}
    assert all(not torch.equal(bank[i], bank[j]) for bank in slots.values() for i in range(6) for j in range(i))
    # the single writer commits the same blocks, labels and log as the editor itself
    written = writer.files()
    for name, content in {**editor.state_files(), **editor.log_files(), **editor.index.files()}.items():
        assert written[name] == content, name
    assert [writer.edit_log[r["id"]].block for r in records] == list(range(6))
    # a second batch's blocks follow the first's
    more = fact_records(6, 4, "Who owns the {w} now?")
    assert editor.edit(more).block == 6 and editor.stats()["blocks"] == 10
    assert _successes(editor, records + more) == 10


def test_a_learned_edit_leaves_the_training_forward_and_its_block_stops_moving():
    from melo_ray.records import parse_records

    # float32: a bfloat16 run ends with one more forward over every row, the float32 confirmation
    editor = MeloEditor(tiny_config("tiny-llama", lora={"block_per_edit": True},
                                    train={"retire_learned": True, "compute_dtype": "float32"}))
    records = parse_records(fact_records(0, 6))
    name, layer = next(iter(editor.layers.items()))
    staging = editor.router.staging
    calls: list[tuple[list[int], torch.Tensor]] = []  # (live slots, that layer's B before the forward)

    def recording(slots):
        calls.append((list(slots), layer.lora_staging_B.detach().clone()))
        return staging(slots)

    editor.router.staging = recording
    trained = editor.train_detached(records, 0)
    editor.router.staging = staging
    assert trained.learned == 1.0
    widths = [len(slots) for slots, _ in calls]
    assert widths[0] == 6 and widths[-1] < 6 and widths == sorted(widths, reverse=True)  # learned edits left
    final = trained.weights[f"{name}.B"]
    retired = 0
    for slot in range(6):
        last_seen = max(i for i, (slots, _) in enumerate(calls) if slot in slots)
        if last_seen + 1 < len(calls):  # retired before the end: no later step moved its block
            retired += 1
            assert all(torch.equal(b[slot], final[slot]) for _, b in calls[last_seen:])
    assert retired >= 1
    editor.edit(fact_records(0, 6))
    assert _successes(editor, fact_records(0, 6)) == 6


def test_target_logits_of_a_subset_of_rows_equal_those_rows_of_the_whole_batch():
    from melo_ray.records import parse_records
    from melo_ray.training import _CachedPrefix, _WholeModel, build_batch, in_formats

    editor = MeloEditor(tiny_config("tiny-llama"))
    rows = in_formats(editor.backbone, parse_records(fact_records(0, 5)), ["raw"])
    batch = build_batch(editor.backbone, rows, True, rendered=True)
    keep = torch.tensor([0, 2, 3])
    with torch.no_grad():
        for forward in (_CachedPrefix(editor.backbone, list(editor.layers), batch), _WholeModel(editor.backbone, batch)):
            mask, _ = forward.selection(keep)
            assert 0 < int(mask.sum()) < len(forward.targets)
            torch.testing.assert_close(forward.logits(keep), forward.logits()[mask], rtol=1e-4, atol=1e-5)


def test_cutting_the_batch_after_its_last_predicting_position_changes_no_target_logit():
    from melo_ray.records import parse_records
    from melo_ray.training import _CachedPrefix, _through_last_target, build_batch, in_formats

    editor = MeloEditor(tiny_config("tiny-llama"))
    rows = in_formats(editor.backbone, parse_records(fact_records(0, 5)), ["raw"])
    batch = build_batch(editor.backbone, rows, True, rendered=True)
    cut = _through_last_target(batch)
    assert cut.inputs["input_ids"].shape[1] == batch.inputs["input_ids"].shape[1] - 1  # the final EOS input
    with torch.no_grad():
        whole = _CachedPrefix(editor.backbone, list(editor.layers), batch)
        short = _CachedPrefix(editor.backbone, list(editor.layers), cut)
        assert torch.equal(whole.targets, short.targets)
        torch.testing.assert_close(short.logits(), whole.logits(), rtol=1e-4, atol=1e-5)
