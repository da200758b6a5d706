"""Linear layers. Each owns its parameters through a *linear method* (how weights are stored
and multiplied: 16-bit today; quantized formats and adapters add methods) and knows its
shard of a tensor-parallel group: column-parallel layers keep a slice of the outputs,
row-parallel ones a slice of the inputs and sum over the group. Every parameter carries a
`weight_loader` that copies a checkpoint tensor (or one piece of a fused one) into it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from pagoda.layers.float8_rows import Float8Rows
from pagoda.layers.normed_rows import NormedRows
from pagoda.layers.parallel import SINGLE, ParallelGroup

if TYPE_CHECKING:
    from pagoda.layers.activation import GatedActivation

WeightLoader = Callable[[nn.Parameter, torch.Tensor, "int | None"], None]

# set while a model is built whose linear methods are chosen afterwards, by layer name
_METHODS_DEFERRED: ContextVar[bool] = ContextVar("linear_methods_deferred", default=False)


@contextmanager
def deferred_linear_methods() -> Iterator[None]:
    """Layers built inside create no weights until `bind_method` gives them a method (a
    quantization format picks one per layer by its name, known only once the model is
    built); nothing is allocated for weights that would be replaced."""
    token = _METHODS_DEFERRED.set(True)
    try:
        yield
    finally:
        _METHODS_DEFERRED.reset(token)


def linear_methods_deferred() -> bool:
    """Whether layers built now wait for `bind_method` (inside deferred_linear_methods)."""
    return _METHODS_DEFERRED.get()


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy `src` into `dst` of the same shape; a checkpoint slice not read yet is read now
    (only the part that `dst` takes)."""
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(src.shape)} does not fit "
                         f"parameter of shape {tuple(dst.shape)}")
    materialize = getattr(src, "materialize", None)
    dst.data.copy_(materialize() if materialize is not None else src)


def default_weight_loader(param: nn.Parameter, tensor: torch.Tensor,
                          shard: int | None = None) -> None:
    """Copy a whole checkpoint tensor into a parameter of the same shape."""
    copy_checked(param, tensor)


def new_parameter(*shape: int, loader: WeightLoader | None = None,
                  output_dim: int | None = None, input_dim: int | None = None) -> nn.Parameter:
    """An uninitialised parameter; `output_dim`/`input_dim` name the dims a shard slices."""
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.weight_loader = loader or default_weight_loader
    param.output_dim, param.input_dim = output_dim, input_dim
    return param


class LinearMethod(ABC):
    """How a linear layer stores its weights and computes x W^T."""

    @abstractmethod
    def create_weights(self, layer: LinearBase, loader: WeightLoader) -> None:
        """Register the layer's weight parameters (local shard shape) with `loader`."""

    @abstractmethod
    def apply(self, layer: LinearBase, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T (+ bias) with the layer's local weights."""

    def apply_gated(self, layer: LinearBase, x: torch.Tensor, activation: nn.Module,
                    bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """activation(x W^T (+ bias)) for a layer whose outputs are [gate | up] halves, in
        one kernel where the method has one for the call; None where it has none (the layer
        then launches the activation after the product)."""
        return None

    def apply_then_norm(self, layer: LinearBase, x: torch.Tensor, norm_weight: torch.Tensor,
                        eps: float, residual: torch.Tensor
                        ) -> tuple[NormedRows, torch.Tensor] | None:
        """The RMSNorm (weight, eps) of x W^T plus `residual`, left for the next product to
        finish (NormedRows), and the new residual, in one kernel where the method has one
        for the call; None where it has none."""
        return None

    def finishes_norm(self, layer: LinearBase, tokens: int) -> bool:
        """Whether a call of `tokens` takes NormedRows (apply_normed) in one kernel."""
        return False

    def apply_normed(self, layer: LinearBase, rows: NormedRows,
                     activation: nn.Module | None = None) -> torch.Tensor | None:
        """rows (finished) W^T, and with `activation` (a gated one) activation of it, in one
        kernel where `finishes_norm`; None where the method has none."""
        return None

    def takes_float8_rows(self, layer: LinearBase, rows: torch.Tensor) -> bool:
        """Whether a call on rows like `rows` (their tokens, type and device) multiplies
        them as float8 on tensor cores, and so takes them as Float8Rows (the kernel that
        writes them quantizing them: apply_float8_rows)."""
        return False

    def apply_float8_rows(self, layer: LinearBase, rows: Float8Rows,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
        """rows W^T (+ bias), where `takes_float8_rows`."""
        return self.apply(layer, rows.materialize(), bias)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        """Turn the loaded checkpoint tensors into the form `apply` reads (repacking)."""

    def kernel(self, layer: LinearBase) -> str:
        """What computes the layer's product, for the startup log."""
        return "dense matmul"

    def init_dummy(self, layer: LinearBase, generator: torch.Generator, std: float) -> bool:
        """Give the layer random weights of about `std` in the method's own form, as if a
        checkpoint had loaded (before process_weights_after_loading); False: the method has
        no such form and its parameters are filled like any other."""
        return False


class UnquantizedLinearMethod(LinearMethod):
    """Weights in the model's dtype, one [out, in] matrix."""

    def create_weights(self, layer: LinearBase, loader: WeightLoader) -> None:
        layer.weight = new_parameter(layer.local_out, layer.local_in, loader=loader,
                                     output_dim=0, input_dim=1)

    def apply(self, layer: LinearBase, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


class LinearBase(nn.Module):
    """Common state: full and local feature counts, the method, the group, the bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 method: LinearMethod | None, group: ParallelGroup,
                 local_in: int, local_out: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.local_in, self.local_out = local_in, local_out
        self.group = group
        self.method: LinearMethod | None = None
        if method is not None or not _METHODS_DEFERRED.get():
            self.bind_method(method or UnquantizedLinearMethod())
        self.bias = new_parameter(self.bias_size, loader=self.weight_loader,
                                  output_dim=0) if bias else None

    @property
    def bias_size(self) -> int:
        return self.local_out

    def bind_method(self, method: LinearMethod) -> None:
        """Give a layer built without one its method, which creates its weights."""
        if self.method is not None:
            raise RuntimeError("the linear layer already has a method")
        self.method = method
        method.create_weights(self, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor,
                      shard: int | None = None) -> None:
        copy_checked(param, tensor)

    def rank_outputs(self, shard: int | None = None) -> tuple[int, int] | None:
        """(start, size) of the output rows of checkpoint piece `shard` (None: the whole
        tensor) this rank keeps; None when it keeps them all."""
        return None

    def rank_inputs(self) -> tuple[int, int] | None:
        """(start, size) of the input columns this rank keeps; None when it keeps them all."""
        return None

    def forward(self, x: torch.Tensor | Float8Rows) -> torch.Tensor:
        return self.product(x, self.bias)

    def product(self, x: torch.Tensor | Float8Rows,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T (+ bias) by the method, x in its own type or as Float8Rows."""
        if isinstance(x, Float8Rows):
            return self.method.apply_float8_rows(self, x, bias)
        return self.method.apply(self, x, bias)

    def takes_float8_rows(self, rows: torch.Tensor) -> bool:
        """Whether a call on rows like `rows` (any leading dims, then the inputs) would
        multiply them as float8 on tensor cores: the kernel that writes them may then hand
        them over as Float8Rows."""
        return self.method.takes_float8_rows(self, rows)

    def finishes_norm(self, tokens: int) -> bool:
        """Whether a call of `tokens` takes an RMSNorm's NormedRows and finishes the norm in
        its product (no bias: the method's kernel adds none)."""
        return self.bias is None and self.method.finishes_norm(self, tokens)


class ReplicatedLinear(LinearBase):
    """The whole matrix on every rank."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 method: LinearMethod | None = None) -> None:
        super().__init__(in_features, out_features, bias, method, SINGLE,
                         in_features, out_features)


def _narrow(tensor: torch.Tensor, dim: int | None, start: int, size: int) -> torch.Tensor:
    return tensor if dim is None else tensor.narrow(dim, start, size)


class ColumnParallelLinear(LinearBase):
    """Each rank holds a contiguous slice of the outputs (no gather: the next layer is
    row-parallel or consumes per-rank heads)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 method: LinearMethod | None = None, group: ParallelGroup = SINGLE) -> None:
        super().__init__(in_features, out_features, bias, method, group, in_features,
                         group.split(out_features)[1])

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor,
                      shard: int | None = None) -> None:
        start, size = self.group.split(tensor.shape[param.output_dim])
        copy_checked(param, _narrow(tensor, param.output_dim, start, size))

    def rank_outputs(self, shard: int | None = None) -> tuple[int, int] | None:
        return self.group.split(self.out_features) if self.group.size > 1 else None


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input stacked on the output dim (gate and
    up); checkpoint piece i loads into its rank-local slice."""

    def __init__(self, in_features: int, out_sizes: Sequence[int], bias: bool = False,
                 method: LinearMethod | None = None, group: ParallelGroup = SINGLE) -> None:
        self.out_sizes = list(out_sizes)  # each checkpoint piece's whole output count
        self.local_sizes = [group.split(size)[1] for size in out_sizes]
        super().__init__(in_features, sum(out_sizes), bias, method, group)

    @property
    def num_shards(self) -> int:
        return len(self.local_sizes)

    def piece_start(self, shard: int) -> int:
        """Where this rank's outputs begin within checkpoint piece `shard`'s."""
        return self.group.rank * self.local_sizes[shard]

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor,
                      shard: int | None = None) -> None:
        if shard is None:
            raise ValueError("a merged projection loads its pieces one by one")
        dim = param.output_dim
        offset, size = sum(self.local_sizes[:shard]), self.local_sizes[shard]
        piece = _narrow(tensor, dim, self.piece_start(shard), size)
        copy_checked(param.data.narrow(dim, offset, size), piece)

    def rank_outputs(self, shard: int | None = None) -> tuple[int, int] | None:
        if self.group.size == 1:
            return None
        if shard is None:
            raise ValueError("a merged projection loads its pieces one by one")
        return self.piece_start(shard), self.local_sizes[shard]

    def forward(self, x: torch.Tensor | NormedRows | Float8Rows,
                activation: GatedActivation | None = None,
                float8_for: LinearBase | None = None) -> torch.Tensor | Float8Rows:
        """x W^T; with `activation` (a gated one, of gate and up pieces), activation of it,
        computed by the product where the method can (else after it: as Float8Rows where
        `float8_for`, the product the activations feed, takes them). x may be an RMSNorm's
        NormedRows, finished in the product where `finishes_norm` (else first), or
        Float8Rows."""
        if activation is not None and (len(self.local_sizes) != 2
                                       or self.local_sizes[0] != self.local_sizes[1]):
            raise ValueError(f"a gated activation takes a gate and an up of one size, not "
                             f"pieces of {self.local_sizes}")
        if isinstance(x, NormedRows):
            if self.finishes_norm(x.values.numel() // x.shape[-1]):
                y = self.method.apply_normed(self, x, activation)
                if y is not None:
                    return y
            x = x.materialize()
        if activation is None:
            return self.product(x, self.bias)
        if not isinstance(x, Float8Rows):
            y = self.method.apply_gated(self, x, activation, self.bias)
            if y is not None:
                return y
        y = self.product(x, self.bias)
        if float8_for is not None and float8_for.takes_float8_rows(y):
            return activation.float8_rows(y)
        return activation(y)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(y.split(self.local_sizes, dim=-1))


class QKVParallelLinear(MergedColumnParallelLinear):
    """The q, k and v projections as one matrix; query heads split over the group, KV heads
    split too, or replicated when the group is larger than the KV head count."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, method: LinearMethod | None = None,
                 group: ParallelGroup = SINGLE) -> None:
        if num_heads % group.size or (num_kv_heads % group.size and group.size % num_kv_heads):
            raise ValueError(f"{num_heads} query / {num_kv_heads} KV heads do not split over "
                             f"{group.size} ranks")
        self.head_dim = head_dim
        self.local_heads = num_heads // group.size
        self.local_kv_heads = max(1, num_kv_heads // group.size)
        self.kv_replicas = max(1, group.size // num_kv_heads)
        q, kv = self.local_heads * head_dim, self.local_kv_heads * head_dim
        self.out_sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        self.local_sizes = [q, kv, kv]
        LinearBase.__init__(self, hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias,
                            method, group, hidden_size, q + 2 * kv)

    def piece_start(self, shard: int) -> int:
        """q: this rank's query heads; k and v: its KV heads (shared by `kv_replicas`
        ranks when there are fewer KV heads than ranks)."""
        rank_part = self.group.rank if shard == 0 else self.group.rank // self.kv_replicas
        return rank_part * self.local_sizes[shard]


class RowParallelLinear(LinearBase):
    """Each rank holds a slice of the inputs; partial products are summed over the group and
    the bias is added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 method: LinearMethod | None = None, group: ParallelGroup = SINGLE) -> None:
        super().__init__(in_features, out_features, bias, method, group,
                         group.split(in_features)[1], out_features)

    def weight_loader(self, param: nn.Parameter, tensor: torch.Tensor,
                      shard: int | None = None) -> None:
        dim = param.input_dim
        if dim is None:  # the bias: whole on every rank
            copy_checked(param, tensor)
            return
        start, size = self.group.split(tensor.shape[dim])
        copy_checked(param, tensor.narrow(dim, start, size))

    def rank_inputs(self) -> tuple[int, int] | None:
        return self.group.split(self.in_features) if self.group.size > 1 else None

    def forward(self, x: torch.Tensor | Float8Rows) -> torch.Tensor:
        if self.group.size == 1:
            return self.product(x, self.bias)
        y = self.group.all_reduce(self.product(x))
        return y if self.bias is None else y + self.bias

    def then_norm(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                  residual: torch.Tensor) -> tuple[NormedRows, torch.Tensor] | None:
        """The RMSNorm (weight, eps) of x W^T plus `residual` left for the next product to
        finish, and the new residual, from the product's kernel; None where it has none (a
        group of ranks, whose sum comes after the kernel; a bias; a method without one)."""
        if self.group.size != 1 or self.bias is not None:
            return None
        return self.method.apply_then_norm(self, x, norm_weight, eps, residual)
