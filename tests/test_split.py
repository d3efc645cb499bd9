"""Rank-r products split along the positions (functional.split): equal to the plain products in float64, and
the 1x1 nodes (fused; folded, with and without DoRA) keep their closed forms when they take the split path."""
import pytest
import torch
import torch.nn.functional as F

from lorakit.adapters.functional import lora as F_lora
from lorakit.adapters.functional import split
from test_folded import test_folded_node_matches_the_float64_closed_form as folded_closed_form
from test_functional import check_fused_lora_node


@pytest.fixture
def splits(monkeypatch):
    """Two threads, blocks down to one position (the test tensors are small); records every split decision."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(split, "MIN_BLOCK", 1)
    decisions, real = [], split.blocks
    monkeypatch.setattr(split, "blocks", lambda *a: decisions.append(real(*a)) or decisions[-1])
    yield decisions
    torch.set_num_threads(threads)


def test_each_split_product_equals_the_plain_one(splits):
    g = torch.Generator().manual_seed(0)
    r, c, length = 3, 7, 10

    def randn(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g)

    w, t, a = randn(r, c), randn(c, length), randn(r, length)
    got = split.rank_times(w, t)
    torch.testing.assert_close(got, w @ t, rtol=1e-13, atol=1e-13)
    assert got.is_contiguous()
    torch.testing.assert_close(split.times_positions(a, t), a @ t.T, rtol=1e-13, atol=1e-13)
    assert splits == [2, 2]


def test_no_split_where_it_cannot_or_should_not():
    t = torch.zeros(8, 2 * split.MIN_BLOCK * torch.get_num_threads())
    assert split.blocks(t.shape[1], t) == torch.get_num_threads()
    assert split.blocks(t.shape[1] - 1, t) == 1  # blocks would not divide evenly
    assert split.blocks(split.MIN_BLOCK, t) == 1  # too few positions for every thread
    assert split.blocks(t.shape[1], t.T) == 1  # blocks are views: a transposed operand takes the plain product
    assert split.blocks(t.shape[1], t.to("meta")) == 1  # not a CPU tensor


@pytest.mark.parametrize("variant", ["lora", "dora_output", "dora_input"])
def test_the_folded_1x1_node_split_keeps_its_closed_form(variant, splits, monkeypatch):
    folded_closed_form("conv1x1_batch1", variant, monkeypatch)
    assert 2 in splits


def test_the_fused_conv1x1_node_split_keeps_its_closed_form(splits):
    check_fused_lora_node(F_lora.fused_conv1x1, F.conv2d, torch.Generator().manual_seed(2), (1, 12, 4, 6),
                          (10, 12, 1, 1), (1, 10, 4, 6), bias=False)
    assert 2 in splits
