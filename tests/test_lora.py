"""Dynamic LoRA banks: per-row gather, exact base rows, staging isolation, the block cap."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from melo_ray.config import LoraConfig
from melo_ray.editors.melo.layer import NO_BLOCK, BlockBankFull, BlockRouter, DynamicLoraLinear, inject_dynamic_lora


def _layer(blocks: int = 3, max_blocks: int = 10) -> DynamicLoraLinear:
    torch.manual_seed(0)
    layer = DynamicLoraLinear(nn.Linear(6, 5), block_rank=2, alpha=4.0, max_blocks=max_blocks)
    gen = torch.Generator().manual_seed(1)
    for _ in range(blocks):
        layer.start_block(gen)
        with torch.no_grad():
            layer.lora_staging_B.normal_()  # non-zero so every block changes the output
        layer.commit_block()
    return layer


def test_rows_without_a_block_are_bit_identical_to_the_base_layer():
    layer = _layer()
    x = torch.randn(4, 7, 6)
    base = layer.base_layer(x)
    layer.block_ids = torch.tensor([NO_BLOCK, 2, NO_BLOCK, 0])
    out = layer(x)
    assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2])
    assert not torch.allclose(out[1], base[1]) and not torch.allclose(out[3], base[3])


def test_gather_matches_a_per_row_reference():
    layer = _layer()
    x = torch.randn(5, 3, 6)
    ids = torch.tensor([1, 0, NO_BLOCK, 2, 1])
    layer.block_ids = ids
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
    layer.block_ids = torch.full((2,), -2)
    for _ in range(5):
        loss = layer(torch.randn(2, 6)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.commit_block()
    assert torch.equal(layer.lora_bank_A[:3], frozen_a) and torch.equal(layer.lora_bank_B[:3], frozen_b)
    assert layer.num_blocks == 4 and not torch.equal(layer.lora_bank_B[3], torch.zeros_like(layer.lora_bank_B[3]))


def test_block_cap_is_a_clear_error_and_nothing_is_committed():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    layers = inject_dynamic_lora(model, LoraConfig(target_modules=["0", "1"], block_rank=1, max_blocks=1))
    router = BlockRouter(layers)
    router.start_block(0)
    router.commit_block()
    router.start_block(1)
    with pytest.raises(BlockBankFull, match="max_blocks=1"):
        router.commit_block()
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
