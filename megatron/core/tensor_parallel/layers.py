"""Column-parallel and row-parallel linear layers and the vocab-parallel embedding.

T is the tensor-parallel size (the size of `group`; None means T = 1), r this rank's index in it.
Each layer is built from the full single-device tensors with `from_full`, which keeps this
rank's slice, so tests (and checkpoint conversion) compare against the unsharded module.

Shapes: B batch, S sequence, s = S / T the sequence shard under sequence parallelism,
D hidden (input features), O output features, o = O / T, I input features, i = I / T,
V vocab, v = V / T.

Sequence parallelism (`sequence_parallel=True`) keeps activations outside the TP region
sharded along the sequence (x_BsD, see `mappings.SEQUENCE_DIM`): the column-parallel layer
all-gathers its input (reduce-scatter in backward), the row-parallel layer and the embedding
reduce-scatter their output (all-gather in backward). Parameters that then see only a shard of
the tokens while being replicated over TP (the row-parallel bias, norms) are tagged
`param.sequence_parallel = True`; their gradients must be summed over the TP group
(`all_reduce_sequence_parallel_grads`) before the optimizer step, as in Megatron-LM.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel.mappings import group_rank, group_size

Split = Callable[[torch.Tensor, Optional[dist.ProcessGroup]], torch.Tensor]


def split_rows(w: torch.Tensor, group) -> torch.Tensor:
    """w_O... -> this rank's contiguous chunk r of T along dim 0, w_o... (a copy)."""
    return mappings.split_along_dim(w, group, 0)


def split_columns(w_OI: torch.Tensor, group) -> torch.Tensor:
    """w_OI -> this rank's contiguous chunk r of T along dim 1, w_Oi (a copy)."""
    return mappings.split_along_dim(w_OI, group, 1)


def split_swiglu_fc1(w_2FD: torch.Tensor, group) -> torch.Tensor:
    """SwiGLU fc1 weight (or bias) [gate_FD; up_FD] -> [gate slice_fD; up slice_fD], f = F / T.

    Each rank then computes swiglu on its own [gate | up] halves: the activation needs no
    communication and its output is this rank's slice f of the F features (fc2's input split).
    """
    gate, up = w_2FD.chunk(2, dim=0)
    return torch.cat([split_rows(gate, group), split_rows(up, group)], dim=0)


def split_qkv(num_query_groups: int) -> Split:
    """A split of the fused QKV weight (or bias) by query groups, for `from_full`.

    attention.py's layout groups the QKV output features by key/value group (each group's H/G
    query heads, its key head, its value head), so rank r's G/T groups are one contiguous block
    of rows; its output projection input is then heads r*H/T .. (r+1)*H/T, the contiguous
    column block that `split_columns` gives. Requires T to divide G.
    """

    def split(w_XD: torch.Tensor, group) -> torch.Tensor:
        if num_query_groups % group_size(group):
            raise ValueError(f"{num_query_groups} query groups do not divide by TP size {group_size(group)}")
        return split_rows(w_XD, group)

    return split


def _param(t: Optional[torch.Tensor], sequence_parallel: bool = False, split: bool = False) -> Optional[nn.Parameter]:
    """A parameter copy of t. `split`: it is this rank's slice of a larger tensor (tagged
    `tensor_model_parallel`, as in Megatron-LM, so norms count every slice once); otherwise it is
    replicated over the group, and `sequence_parallel` tags it for the gradient all-reduce."""
    if t is None:
        return None
    p = nn.Parameter(t.detach().clone())
    if split:
        p.tensor_model_parallel = True
    if sequence_parallel:
        p.sequence_parallel = True
    return p


class ColumnParallelLinear(nn.Module):
    """x_BSI (x_BsI with sequence parallelism) -> y_BSo: this rank's o = O / T output features.

    weight_oI is rank r's rows of the full W_OI, bias_o its slice of the bias (added locally).
    Backward: the input gradient is all-reduced over the group (reduce-scattered along the
    sequence with sequence parallelism), since every rank's slice contributes to it.
    """

    def __init__(self, weight_oI: torch.Tensor, bias_o: Optional[torch.Tensor], group,
                 sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = _param(weight_oI, split=True)
        self.bias = _param(bias_o, split=True)

    @classmethod
    def from_full(cls, weight_OI: torch.Tensor, bias_O: Optional[torch.Tensor], group,
                  sequence_parallel: bool = False, split: Split = split_rows) -> "ColumnParallelLinear":
        """This rank's slice of a full weight/bias; `split` picks the rows (default: contiguous chunk r)."""
        bias = None if bias_O is None else split(bias_O, group)
        return cls(split(weight_OI, group), bias, group, sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel and group_size(self.group) > 1:
            return _GatheredLinear.apply(x, self.weight, self.bias, self.group)
        x = mappings.copy_to_tensor_parallel_region(x, self.group)
        return F.linear(x, self.weight, self.bias)


class _GatheredLinear(torch.autograd.Function):
    """y_BSo = all_gather_seq(x_BsI) @ weight_oI^T + bias_o, keeping only the shard x_BsI for
    backward (Megatron-LM's choice): backward gathers it again for the weight gradient and
    reduce-scatters the input gradient. Saves (T-1)/T of the input's activation memory for one
    more all-gather in backward."""

    @staticmethod
    def forward(ctx, x_BsI, weight_oI, bias_o, group):
        ctx.group, ctx.has_bias = group, bias_o is not None
        ctx.save_for_backward(x_BsI, weight_oI)
        return F.linear(mappings.all_gather(x_BsI, group, mappings.SEQUENCE_DIM), weight_oI, bias_o)

    @staticmethod
    def backward(ctx, grad_BSo):
        x_BsI, weight_oI = ctx.saved_tensors
        x_NI = mappings.all_gather(x_BsI, ctx.group, mappings.SEQUENCE_DIM).flatten(0, -2)
        grad_x = mappings.reduce_scatter(grad_BSo @ weight_oI, ctx.group, mappings.SEQUENCE_DIM)
        grad_No = grad_BSo.flatten(0, -2)
        grad_w = grad_No.t() @ x_NI
        grad_b = grad_No.sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


class RowParallelLinear(nn.Module):
    """x_BSi (this rank's i = I / T input features) -> y_BSO (y_BsO with sequence parallelism).

    weight_Oi is rank r's columns of the full W_OI; the partial products are summed over the
    group (all-reduce, or reduce-scatter along the sequence), then the full bias_O is added once.
    """

    def __init__(self, weight_Oi: torch.Tensor, bias_O: Optional[torch.Tensor], group,
                 sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = _param(weight_Oi, split=True)
        self.bias = _param(bias_O, sequence_parallel and group_size(group) > 1)

    @classmethod
    def from_full(cls, weight_OI: torch.Tensor, bias_O: Optional[torch.Tensor], group,
                  sequence_parallel: bool = False, split: Split = split_columns) -> "RowParallelLinear":
        """This rank's columns of a full weight (default: contiguous chunk r); the bias is kept whole."""
        return cls(split(weight_OI, group), bias_O, group, sequence_parallel)

    def forward(self, x_BSi: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x_BSi, self.weight)
        if self.sequence_parallel:
            y = mappings.reduce_scatter_to_sequence_parallel_region(partial, self.group)
        else:
            y = mappings.reduce_from_tensor_parallel_region(partial, self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """tokens_BS -> x_BSD (x_BsD with sequence parallelism) from this rank's vocab rows.

    Rank r holds rows [r*v, (r+1)*v) of the full table W_VD (v = V / T, V must divide by T;
    Megatron pads the vocabulary for this). Ids outside the slice give zero rows; the sum over
    the group (all-reduce, or reduce-scatter along the sequence) yields every row once.
    """

    def __init__(self, weight_vD: torch.Tensor, vocab_start: int, group, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = _param(weight_vD, split=True)
        self.vocab_start, self.vocab_end = vocab_start, vocab_start + weight_vD.shape[0]

    @classmethod
    def from_full(cls, weight_VD: torch.Tensor, group, sequence_parallel: bool = False) -> "VocabParallelEmbedding":
        v = weight_VD.shape[0] // group_size(group)
        return cls(split_rows(weight_VD, group), group_rank(group) * v, group, sequence_parallel)

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        outside = (tokens_BS < self.vocab_start) | (tokens_BS >= self.vocab_end)
        local = (tokens_BS - self.vocab_start).masked_fill(outside, 0)
        x_BSD = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_parallel_region(x_BSD, self.group)
        return mappings.reduce_from_tensor_parallel_region(x_BSD, self.group)


def all_reduce_sequence_parallel_grads(params: Iterable[nn.Parameter], group) -> None:
    """Sum over the TP group the .grad of parameters tagged `sequence_parallel` (one flat all-reduce)."""
    mappings.all_reduce_in_place([p.grad for p in params if getattr(p, "sequence_parallel", False)
                                  and p.grad is not None], group)
