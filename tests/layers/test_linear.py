"""Linear layers: each rank's shard, loaded from the full checkpoint tensor, computes its part
of the full layer's output (column-parallel: a slice; row-parallel: a summand)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from pagoda.layers.activation import SiluAndMul
from pagoda.layers.embedding import LMHead, VocabEmbedding
from pagoda.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from pagoda.layers.parallel import ParallelGroup


def ranks(size: int) -> list[ParallelGroup]:
    return [ParallelGroup(rank, size) for rank in range(size)]


def test_replicated_linear_is_f_linear():
    weight, bias, x = torch.randn(6, 4), torch.randn(6), torch.randn(3, 4)
    layer = ReplicatedLinear(4, 6, bias=True)
    layer.weight.weight_loader(layer.weight, weight)
    layer.bias.weight_loader(layer.bias, bias)
    torch.testing.assert_close(layer(x), F.linear(x, weight, bias))


@pytest.mark.parametrize("size", [1, 2, 4])
def test_column_parallel_shards_concatenate_to_the_full_output(size):
    weight, bias, x = torch.randn(8, 5), torch.randn(8), torch.randn(3, 5)
    outs = []
    for group in ranks(size):
        layer = ColumnParallelLinear(5, 8, bias=True, group=group)
        layer.weight.weight_loader(layer.weight, weight)
        layer.bias.weight_loader(layer.bias, bias)
        outs.append(layer(x))
    torch.testing.assert_close(torch.cat(outs, dim=-1), F.linear(x, weight, bias))


@pytest.mark.parametrize("size", [1, 2])
def test_row_parallel_partial_products_sum_to_the_full_output(size):
    weight, bias, x = torch.randn(6, 8), torch.randn(6), torch.randn(3, 8)
    total = torch.zeros(3, 6)
    for group in ranks(size):
        layer = RowParallelLinear(8, 6, bias=True, group=group)
        layer.weight.weight_loader(layer.weight, weight)
        layer.bias.weight_loader(layer.bias, bias)
        start, part = group.split(8)
        total += layer.method.apply(layer, x[:, start:start + part])
        torch.testing.assert_close(layer.bias.data, bias)  # added once, after the sum
    torch.testing.assert_close(total + bias, F.linear(x, weight, bias))


class _GatedInOneCall(UnquantizedLinearMethod):
    """A method with a product that applies the gated activation (as the quantized ones'
    few-token kernels do), counting its calls."""

    calls = 0

    def apply_gated(self, layer, x, activation, bias=None):
        self.calls += 1
        return activation.forward_native(F.linear(x, layer.weight, bias))


@pytest.mark.parametrize("fused", [False, True])
def test_merged_gate_up_takes_the_gated_activation_of_its_output(fused):
    gate, up, x = torch.randn(4, 5), torch.randn(4, 5), torch.randn(3, 5)
    method = _GatedInOneCall() if fused else None
    layer = MergedColumnParallelLinear(5, [4, 4], method=method)
    layer.weight.weight_loader(layer.weight, gate, 0)
    layer.weight.weight_loader(layer.weight, up, 1)
    torch.testing.assert_close(layer(x, activation=SiluAndMul()),
                               F.silu(F.linear(x, gate)) * F.linear(x, up))
    assert not fused or method.calls == 1
    with pytest.raises(ValueError, match=r"not pieces of \[4, 3\]"):
        MergedColumnParallelLinear(5, [4, 3], method=method)(x, activation=SiluAndMul())


@pytest.mark.parametrize("size", [1, 2])
def test_merged_gate_up_pieces_load_into_each_ranks_slices(size):
    gate, up, x = torch.randn(8, 4), torch.randn(8, 4), torch.randn(2, 4)
    for group in ranks(size):
        layer = MergedColumnParallelLinear(4, [8, 8], group=group)
        layer.weight.weight_loader(layer.weight, gate, 0)
        layer.weight.weight_loader(layer.weight, up, 1)
        g, u = layer.split(layer(x))
        start, part = group.split(8)
        torch.testing.assert_close(g, F.linear(x, gate[start:start + part]))
        torch.testing.assert_close(u, F.linear(x, up[start:start + part]))


@pytest.mark.parametrize("size, kv_heads", [(1, 2), (2, 2), (4, 2)])
def test_qkv_splits_query_heads_and_splits_or_replicates_kv_heads(size, kv_heads):
    heads, dim, hidden = 4, 3, 6
    wq, wk, wv = torch.randn(heads * dim, hidden), torch.randn(kv_heads * dim, hidden), \
        torch.randn(kv_heads * dim, hidden)
    x = torch.randn(2, hidden)
    for group in ranks(size):
        layer = QKVParallelLinear(hidden, dim, heads, kv_heads, group=group)
        for piece, tensor in enumerate((wq, wk, wv)):
            layer.weight.weight_loader(layer.weight, tensor, piece)
        q, k, v = layer.split(layer(x))
        local_q, local_kv = heads // size, max(1, kv_heads // size)
        kv_head = group.rank * kv_heads // size  # replicated ranks share a KV head
        torch.testing.assert_close(q, F.linear(x, wq[group.rank * local_q * dim:][:local_q * dim]))
        torch.testing.assert_close(k, F.linear(x, wk[kv_head * dim:][:local_kv * dim]))
        torch.testing.assert_close(v, F.linear(x, wv[kv_head * dim:][:local_kv * dim]))


def test_qkv_refuses_heads_that_do_not_split():
    with pytest.raises(ValueError, match="do not split"):
        QKVParallelLinear(8, 2, 6, 3, group=ParallelGroup(0, 4))


def test_fused_piece_without_index_is_refused():
    layer = MergedColumnParallelLinear(4, [2, 2])
    with pytest.raises(ValueError, match="one by one"):
        layer.weight.weight_loader(layer.weight, torch.randn(4, 4))


@pytest.mark.parametrize("size", [1, 2, 3])
def test_vocab_shards_cover_the_vocabulary_with_zero_padding(size):
    table, hidden = torch.randn(10, 4), torch.randn(3, 4)
    rows = []
    for group in ranks(size):
        head = LMHead(10, 4, group=group)
        head.weight.weight_loader(head.weight, table)
        rows.append(head.weight.data)
    full = torch.cat(rows)
    torch.testing.assert_close(full[:10], table)
    assert not full[10:].any()
    single = LMHead(10, 4)
    single.weight.weight_loader(single.weight, table)
    torch.testing.assert_close(single(hidden), F.linear(hidden, table).float())


def test_tied_head_uses_the_embedding_parameter():
    embedding = VocabEmbedding(10, 4)
    head = LMHead(10, 4, tied_to=embedding)
    assert head.tied and head.weight is embedding.weight


def test_wrong_shape_names_both_shapes():
    layer = ColumnParallelLinear(4, 6)
    with pytest.raises(ValueError, match=r"\(6, 5\).*\(6, 4\)"):
        layer.weight.weight_loader(layer.weight, torch.randn(6, 5))
