"""Dynamic LoRA banks: per-row gather, exact base rows, staging isolation, the block cap."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from melo_ray.editors.melo.bank import SEGMENT_BLOCKS, GrowingRows, bank_files, read_bank
from melo_ray.editors.melo.config import LoraConfig
from melo_ray.editors.melo.layer import (
    NO_BLOCK,
    BlockBankFull,
    BlockRouter,
    DynamicLoraLinear,
    RoutePlan,
    inject_dynamic_lora,
)
from melo_ray.snapshots import SnapshotError


def commit_staging(layer: DynamicLoraLinear | BlockRouter) -> int:
    """Move trained staging blocks into the bank (the editor does this through its writer, from
    `staging_weights`); returns the first block's id."""
    if isinstance(layer, BlockRouter):
        first = layer.append_blocks(layer.staging_weights())
    else:
        first = layer.append_blocks(layer.lora_staging_A.detach(), layer.lora_staging_B.detach())
    layer.discard_block()
    return first


def _layer(blocks: int = 3, max_blocks: int = 10) -> DynamicLoraLinear:
    torch.manual_seed(0)
    layer = DynamicLoraLinear(nn.Linear(6, 5), block_rank=2, alpha=4.0, max_blocks=max_blocks)
    gen = torch.Generator().manual_seed(1)
    for _ in range(blocks):
        layer.start_block(gen)
        with torch.no_grad():
            layer.lora_staging_B.normal_()  # non-zero so every block changes the output
        commit_staging(layer)
    return layer


def test_rows_without_a_block_are_bit_identical_to_the_base_layer():
    layer = _layer()
    x = torch.randn(4, 7, 6)
    base = layer.base_layer(x)
    layer.plan = RoutePlan.build(torch.tensor([NO_BLOCK, 2, NO_BLOCK, 0]), x.device)
    out = layer(x)
    assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2])
    assert not torch.allclose(out[1], base[1]) and not torch.allclose(out[3], base[3])


def test_gather_matches_a_per_row_reference():
    layer = _layer()
    x = torch.randn(5, 3, 6)
    ids = torch.tensor([1, 0, NO_BLOCK, 2, 1])
    layer.plan = RoutePlan.build(ids, x.device)
    out = layer(x)
    for row, block in enumerate(ids.tolist()):
        expected = layer.base_layer(x[row])
        if block >= 0:
            a, b = layer.lora_bank_A[block], layer.lora_bank_B[block]
            expected = expected + layer.scale * (x[row] @ a.T) @ b.T
        torch.testing.assert_close(out[row], expected)


def test_training_the_staging_block_leaves_committed_blocks_bit_identical():
    layer = _layer()
    frozen_a, frozen_b = layer.lora_bank_A.clone(), layer.lora_bank_B.clone()
    layer.start_block(torch.Generator().manual_seed(5))
    opt = torch.optim.Adam([layer.lora_staging_A, layer.lora_staging_B], lr=0.1)
    layer.plan = RoutePlan(2, staging=True)
    for _ in range(5):
        loss = layer(torch.randn(2, 6)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    commit_staging(layer)
    assert torch.equal(layer.lora_bank_A[:3], frozen_a) and torch.equal(layer.lora_bank_B[:3], frozen_b)
    assert layer.num_blocks == 4 and not torch.equal(layer.lora_bank_B[3], torch.zeros_like(layer.lora_bank_B[3]))


def test_block_cap_is_a_clear_error_and_nothing_is_committed():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    layers = inject_dynamic_lora(model, LoraConfig(target_modules=["0", "1"], block_rank=1, max_blocks=1))
    router = BlockRouter(layers)
    router.start_block(0)
    commit_staging(router)
    router.start_block(1)
    with pytest.raises(BlockBankFull, match="max_blocks=1"):
        commit_staging(router)
    assert router.num_blocks == 1


def test_injection_names_a_missing_module():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(KeyError, match="no module named 'mlp.down_proj'"):
        inject_dynamic_lora(model, LoraConfig(target_modules=["mlp.down_proj"]))


def test_editor_wrappers_come_off_a_shared_backbone():
    from melo_ray.editors.layers import remove_edit_layers

    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)))
    originals = [model[0], model[1][0]]
    inject_dynamic_lora(model, LoraConfig(target_modules=["0", "1.0"]))
    assert isinstance(model[0], DynamicLoraLinear)
    remove_edit_layers(model)
    assert [model[0], model[1][0]] == originals


def test_the_bank_grows_without_copying_itself_on_every_commit():
    layer = _layer(blocks=0, max_blocks=1000)
    grown, pointer, committed = 0, None, []
    for i in range(40):
        layer.start_block(torch.Generator().manual_seed(i))
        committed.append(layer.lora_staging_A.detach().clone())
        commit_staging(layer)
        if layer.lora_bank_A.data_ptr() != pointer:
            grown += 1
            pointer = layer.lora_bank_A.data_ptr()
    assert layer.num_blocks == 40
    assert grown <= 3  # capacity 16, 34, 70: three buffers for 40 blocks, not 40 copies
    assert torch.equal(layer.lora_bank_A, torch.cat(committed))  # every block, in commit order


def test_growing_rows_rebuilds_from_any_other_start():
    rows = GrowingRows()
    a = rows.append(torch.zeros(0, 2), torch.ones(1, 2))
    b = rows.append(a, torch.full((1, 2), 2.0))
    assert b.tolist() == [[1, 1], [2, 2]] and a.tolist() == [[1, 1]]  # an earlier view is unchanged
    loaded = torch.full((3, 2), 7.0)  # e.g. a bank loaded from a snapshot
    c = rows.append(loaded, torch.zeros(1, 2))
    assert c.tolist() == [[7, 7]] * 3 + [[0, 0]] and loaded.shape[0] == 3
    reset = rows.append(c[:0], torch.full((1, 2), 5.0))  # a bank reset to none of its rows, then one more
    assert reset.tolist() == [[5, 5]] and c.tolist() == [[7, 7]] * 3 + [[0, 0]]  # the old view is intact


def test_a_bank_round_trips_through_segments_and_new_blocks_change_only_the_last():
    torch.manual_seed(0)
    n = SEGMENT_BLOCKS + 5
    banks = {"l0": (torch.randn(n, 2, 6), torch.randn(n, 5, 2)), "l1": (torch.randn(n, 2, 3), torch.randn(n, 4, 2))}
    files = bank_files(banks)
    assert sorted(files) == ["adapters-00000.safetensors", "adapters-00001.safetensors"]
    back = read_bank(files, ["l0", "l1"], "test")
    for name in banks:
        assert torch.equal(back[name][0], banks[name][0]) and torch.equal(back[name][1], banks[name][1])
    more = {k: (torch.cat([a, a[:1]]), torch.cat([b, b[:1]])) for k, (a, b) in banks.items()}
    files2 = bank_files(more)
    assert files2["adapters-00000.safetensors"] == files["adapters-00000.safetensors"]
    assert files2["adapters-00001.safetensors"] != files["adapters-00001.safetensors"]
    with pytest.raises(SnapshotError, match="numbered"):
        read_bank({"adapters-00001.safetensors": files["adapters-00001.safetensors"]}, ["l0"], "test")
    empty = bank_files({"l0": (torch.zeros(0, 2, 6), torch.zeros(0, 5, 2))})
    assert read_bank(empty, ["l0"], "test")["l0"][0].shape == (0, 2, 6)


def test_a_growing_bank_serialises_each_full_segment_once_and_writes_the_same_bytes(monkeypatch):
    import melo_ray.editors.melo.bank as bank_module

    torch.manual_seed(0)
    full_segments: list[bytes] = []
    bank = (torch.zeros(0, 2, 6), torch.zeros(0, 5, 2))
    serialised: list[int] = []
    plain = bank_module._segment_bytes
    monkeypatch.setattr(bank_module, "_segment_bytes", lambda banks, start: serialised.append(start) or plain(banks, start))
    for _ in range(4):  # 0, 50, 100, 150 blocks: across the first and second segment boundaries
        serialised.clear()
        cached = bank_files({"l0": bank}, full_segments)
        cached_calls = list(serialised)
        assert cached == bank_files({"l0": bank})  # the cache never changes what is written
        assert len(full_segments) == len(bank[0]) // SEGMENT_BLOCKS
        # only the segment still filling (or one that just filled) is serialised
        assert all(start >= (len(full_segments) - 1) * SEGMENT_BLOCKS for start in cached_calls)
        bank = (torch.cat([bank[0], torch.randn(50, 2, 6)]), torch.cat([bank[1], torch.randn(50, 5, 2)]))
    serialised.clear()
    bank_files({"l0": bank}, full_segments)  # 200 blocks: segments 0-2 full, 0 and 1 already cached
    assert serialised == [2 * SEGMENT_BLOCKS, 3 * SEGMENT_BLOCKS] and len(full_segments) == 3
    with pytest.raises(ValueError, match="shrank"):
        bank_files({"l0": (bank[0][:10], bank[1][:10])}, full_segments)


def test_staging_slots_route_each_row_to_its_own_block_and_train_only_it():
    torch.manual_seed(0)
    layer = DynamicLoraLinear(nn.Linear(6, 5), block_rank=2, alpha=4.0, max_blocks=10)
    layer.start_block(torch.Generator().manual_seed(3), slots=3)
    with torch.no_grad():
        layer.lora_staging_B.normal_()
    slots = torch.tensor([2, 0, 2, 0])  # slot 1 has no rows
    layer.plan = RoutePlan(4, staging=True, slots=slots)
    x = torch.randn(4, 3, 6)
    out = layer(x)
    for row, slot in enumerate(slots.tolist()):
        a, b = layer.lora_staging_A[slot], layer.lora_staging_B[slot]
        torch.testing.assert_close(out[row], layer.base_layer(x[row]) + layer.scale * (x[row] @ a.T) @ b.T)
    out.pow(2).sum().backward()
    grads = layer.lora_staging_B.grad
    assert grads[1].abs().max() == 0 and grads[0].abs().max() > 0 and grads[2].abs().max() > 0
    first = commit_staging(layer)
    assert first == 0 and layer.num_blocks == 3
    with pytest.raises(BlockBankFull):  # 3 more would pass the cap of 5: nothing is appended
        layer.max_blocks = 5
        layer.append_blocks(layer.lora_bank_A[:3].clone(), layer.lora_bank_B[:3].clone())
    assert layer.num_blocks == 3
