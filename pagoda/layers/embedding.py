"""Token embedding and the LM head, split over a tensor-parallel group by vocabulary rows
(the LM head may share the embedding's weight). An embedding's table may be held in another
form (quantized rows, `decode_rows` decoding only the rows looked up), and a table an LM head
shares by a kernel (`quantized`: it multiplies, and its `rows` are a lookup)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from pagoda.layers.linear import copy_checked, new_parameter
from pagoda.layers.parallel import SINGLE, ParallelGroup


class VocabShard(nn.Module):
    """A [vocab, hidden] table of which this rank holds rows [start, start + rows); the
    vocabulary is padded so that every rank holds the same number of rows. `shared` makes it
    use another table's parameter instead of its own (tied embeddings)."""

    def __init__(self, vocab_size: int, hidden_size: int, group: ParallelGroup,
                 shared: nn.Parameter | None = None) -> None:
        super().__init__()
        self.vocab_size, self.group, self.hidden_size = vocab_size, group, hidden_size
        self.rows = -(-vocab_size // group.size)
        self.start = group.rank * self.rows
        self.weight = shared if shared is not None else new_parameter(
            self.rows, hidden_size, loader=self.weight_loader, output_dim=0)
        # set: the table is held by this module instead (`quantized(x)` is x W^T,
        # `quantized.rows(index, scale, dtype)` the rows at `index` times scale, in dtype)
        self.quantized: nn.Module | None = None

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor,
                      shard: int | None = None) -> None:
        if tensor.shape[1:] != param.shape[1:] or tensor.shape[0] != self.vocab_size:
            raise ValueError(f"checkpoint tensor of shape {tuple(tensor.shape)} does not fit "
                             f"a [{self.vocab_size}, {param.shape[1]}] vocabulary table")
        end = min(self.start + self.rows, self.vocab_size)
        copy_checked(param.data[:end - self.start], tensor[self.start:end])
        param.data[end - self.start:].zero_()  # padding rows


class VocabEmbedding(VocabShard):
    """Looks up token ids; with a group, each rank looks up its rows and the sum is taken."""

    def __init__(self, vocab_size: int, hidden_size: int, group: ParallelGroup = SINGLE,
                 scale: float | None = None) -> None:
        """`scale`: a factor every row looked up is multiplied by (Gemma's sqrt(hidden)),
        in the rows' dtype."""
        super().__init__(vocab_size, hidden_size, group)
        # set: `weight` holds rows in another form, which this turns into [n, hidden] floats
        self.decode_rows: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.dtype = torch.get_default_dtype()  # of the rows a quantized table looks up
        self.scale = scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return self.lookup(ids)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = self.lookup(local.masked_fill(outside, 0))
        return self.group.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))

    def lookup(self, local_ids: torch.Tensor) -> torch.Tensor:
        """The rows of this rank's table at `local_ids` (times the scale)."""
        if self.quantized is not None:  # scaled by the kernel as it decodes
            rows = self.quantized.rows(local_ids.reshape(-1), self.scale, self.dtype)
            return rows.reshape(*local_ids.shape, rows.shape[-1])
        if self.decode_rows is None:
            rows = F.embedding(local_ids, self.weight)
        else:
            rows = self.decode_rows(self.weight.index_select(0, local_ids.reshape(-1)))
            rows = rows.reshape(*local_ids.shape, rows.shape[-1])
        return rows if self.scale is None else rows * self.scale


class LMHead(VocabShard):
    """Projects hidden states to float32 vocabulary logits (each rank its rows, gathered);
    tied to the embedding, it uses the embedding's parameter."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabEmbedding | None = None,
                 group: ParallelGroup = SINGLE) -> None:
        super().__init__(vocab_size, hidden_size, group,
                         shared=tied_to.weight if tied_to is not None else None)
        self.tied = tied_to is not None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = (F.linear(hidden, self.weight) if self.quantized is None
                 else self.quantized(hidden))
        logits = self.group.all_gather(local)
        return logits[..., :self.vocab_size].float()
