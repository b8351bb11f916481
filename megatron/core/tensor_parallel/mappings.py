"""Differentiable tensor-parallel collectives (Megatron's four "region" mappings).

Every function takes its process group explicitly; with `group` None or of size 1 it is the
identity (forward and backward), so the layers built on it run unchanged in one process.

Sequence dimension convention: this codebase keeps activations as x_BSD (batch first), so
sequence parallelism shards dimension 1, `SEQUENCE_DIM`. Megatron-LM keeps x_SBD and shards
dimension 0, where the gathered chunks are contiguous; here the collectives run on a
dim-0-first copy (`movedim`) and move the result back, one extra copy per exchange. The
`dim` argument lets a caller with [S, B, D] (or flattened [T, D]) tensors pass 0.

    copy_to_tensor_parallel_region:      forward identity          backward all-reduce
    reduce_from_tensor_parallel_region:  forward all-reduce        backward identity
    gather_from_sequence_parallel_region: forward all-gather(dim)  backward reduce-scatter(dim)
    reduce_scatter_to_sequence_parallel_region:
                                          forward reduce-scatter(dim) backward all-gather(dim)

Gathers concatenate in group-rank order; reduce-scatters give rank r the r-th equal chunk, so
the size along `dim` must divide by the group size. `gather_rows_uneven` and
`reduce_scatter_rows_uneven` are the same pair along dim 0 for blocks of different sizes (routed
tokens over the expert-tensor-parallel group).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

SEQUENCE_DIM = 1
"""Sequence dimension of x_BSD, the dimension sequence parallelism shards."""


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Optional[dist.ProcessGroup]) -> int:
    return 0 if group is None else dist.get_rank(group)


def _trivial(group) -> bool:
    return group_size(group) == 1


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum of x over the group (a new tensor; x is not modified)."""
    if _trivial(group):
        return x
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def all_reduce_in_place(tensors: list[torch.Tensor], group) -> None:
    """Sum each tensor over the group, in place, with one all-reduce of their flat concatenation."""
    if not tensors or _trivial(group):
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Concatenation along `dim` of every rank's x (same shape on all ranks), in rank order."""
    if _trivial(group):
        return x
    n = group_size(group)
    x0 = x.movedim(dim, 0).contiguous()
    out = torch.empty((n * x0.shape[0],) + tuple(x0.shape[1:]), dtype=x.dtype, device=x.device)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x0, group=group)
    return out.movedim(0, dim).contiguous()


def reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Rank r's chunk r (of group-size equal chunks along `dim`) of the sum of x over the group."""
    if _trivial(group):
        return x
    n = group_size(group)
    if x.shape[dim] % n:
        raise ValueError(f"size {x.shape[dim]} along dim {dim} does not divide by the group size {n}")
    x0 = x.movedim(dim, 0).contiguous()
    out = torch.empty((x0.shape[0] // n,) + tuple(x0.shape[1:]), dtype=x.dtype, device=x.device)
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, x0, group=group)
    return out.movedim(0, dim).contiguous()


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromSequence(torch.autograd.Function):
    """All-gather; backward reduce-scatters the gradient, or keeps this rank's slice of it when
    the gradient is the same on every rank (`grad_replicated`)."""

    @staticmethod
    def forward(ctx, x, group, dim, grad_replicated=False):
        ctx.group, ctx.dim, ctx.grad_replicated = group, dim, grad_replicated
        return all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        if ctx.grad_replicated:
            return split_along_dim(grad, ctx.group, ctx.dim), None, None, None
        return reduce_scatter(grad, ctx.group, ctx.dim), None, None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.group, ctx.dim), None, None


def copy_to_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; backward all-reduces the gradient (x feeds every rank's shard)."""
    return x if _trivial(group) else _CopyToRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Forward sums the partial results of the group; backward passes the gradient through."""
    return x if _trivial(group) else _ReduceFromRegion.apply(x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group, dim: int = SEQUENCE_DIM) -> torch.Tensor:
    """x_BsD (this rank's sequence shard, s = S / T) -> x_BSD; backward reduce-scatters."""
    return x if _trivial(group) else _GatherFromSequence.apply(x, group, dim)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group, dim: int = SEQUENCE_DIM) -> torch.Tensor:
    """Partial sums x_BSD -> this rank's sequence shard of their sum, x_BsD; backward all-gathers."""
    return x if _trivial(group) else _ReduceScatterToSequence.apply(x, group, dim)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group, dim: int = SEQUENCE_DIM) -> torch.Tensor:
    """Replicated x_BSD -> this rank's slice x_BsD (no communication); backward all-gathers."""
    return x if _trivial(group) else _ScatterToSequence.apply(x, group, dim)


def gather_replicated(x: torch.Tensor, group, dim: int = SEQUENCE_DIM) -> torch.Tensor:
    """Shards x_BsD -> x_BSD whose consumers are replicated over the group (so is their
    gradient): forward all-gathers, backward keeps this rank's slice of the gradient."""
    return x if _trivial(group) else _GatherFromSequence.apply(x, group, dim, True)


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return split_along_dim(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.group, ctx.dim), None, None


def split_along_dim(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's equal chunk of x along `dim` (contiguous copy)."""
    n = group_size(group)
    if x.shape[dim] % n:
        raise ValueError(f"size {x.shape[dim]} along dim {dim} does not divide by the group size {n}")
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()


# ---------------------------------------------------------------- uneven row blocks (expert tensor parallelism)
#
# Expert-tensor-parallel ranks exchange routed tokens, whose number differs from rank to rank.
# `sizes_R[r]` is rank r's number of rows, known on every rank. The collectives pad every block
# to the largest and use the equal-size ones (gloo has no uneven all-gather), then drop the padding.

def all_gather_uneven(x_nD: torch.Tensor, group, sizes_R: list[int]) -> torch.Tensor:
    """Every rank's rows x_nD (n = sizes_R[rank]) concatenated in rank order: x_ND, N = sum(sizes_R)."""
    if _trivial(group):
        return x_nD
    most = max(sizes_R)
    if most == 0:
        return x_nD.new_empty((0,) + tuple(x_nD.shape[1:]))
    padded = x_nD.new_zeros((most,) + tuple(x_nD.shape[1:]))
    padded[: x_nD.shape[0]] = x_nD
    blocks = all_gather(padded, group, 0).split(most)
    return torch.cat([block[:n] for block, n in zip(blocks, sizes_R)])


def reduce_scatter_uneven(x_ND: torch.Tensor, group, sizes_R: list[int]) -> torch.Tensor:
    """Sum of x_ND (rows in blocks of sizes_R, rank order) over the group; this rank keeps its block x_nD."""
    if _trivial(group):
        return x_ND
    most, rank = max(sizes_R), group_rank(group)
    if most == 0:
        return x_ND.new_empty((0,) + tuple(x_ND.shape[1:]))
    padded = x_ND.new_zeros((len(sizes_R), most) + tuple(x_ND.shape[1:]))
    for r, block in enumerate(x_ND.split(sizes_R)):
        padded[r, : block.shape[0]] = block
    return reduce_scatter(padded.flatten(0, 1), group, 0)[: sizes_R[rank]]


class _GatherUneven(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, sizes_R):
        ctx.group, ctx.sizes_R = group, sizes_R
        return all_gather_uneven(x, group, sizes_R)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_uneven(grad, ctx.group, ctx.sizes_R), None, None


class _ReduceScatterUneven(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, sizes_R):
        ctx.group, ctx.sizes_R = group, sizes_R
        return reduce_scatter_uneven(x, group, sizes_R)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_uneven(grad, ctx.group, ctx.sizes_R), None, None


def gather_rows_uneven(x_nD: torch.Tensor, group, sizes_R: list[int]) -> torch.Tensor:
    """x_nD -> x_ND, every rank's rows in rank order (`all_gather_uneven`); backward sums the
    gradient over the group and keeps this rank's rows (every rank's result feeds on x)."""
    return x_nD if _trivial(group) else _GatherUneven.apply(x_nD, group, list(sizes_R))


def reduce_scatter_rows_uneven(x_ND: torch.Tensor, group, sizes_R: list[int]) -> torch.Tensor:
    """Partial sums x_ND -> this rank's block x_nD of their sum (`reduce_scatter_uneven`);
    backward all-gathers the blocks' gradients."""
    return x_ND if _trivial(group) else _ReduceScatterUneven.apply(x_ND, group, list(sizes_R))
