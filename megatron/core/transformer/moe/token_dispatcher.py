"""Token dispatchers: move routed tokens to the ranks that own their experts, and back.

This is the only module that knows the expert-parallel (EP) group. The model calls

    x_ND, tokens_per_local_expert_L, state = dispatcher.dispatch(hidden_TD, routing)
    y_ND = experts(x_ND, tokens_per_local_expert_L)
    out_TD = dispatcher.combine(y_ND, state)

where rows of x_ND are grouped by local expert (L = E / EP experts on this rank), and out_TD is
the probability-weighted sum over each token's K experts (dropped assignments contribute 0).

* `LocalDispatcher` (EP = 1): sort the T*K assignments by expert, compute, unsort.
* `AllToAllDispatcher`: sort by global expert, exchange counts, `all_to_all_single` with uneven
  splits (differentiable), regroup received rows from [source rank, local expert] to
  [local expert, source rank] order, and the mirror path back.
* `AllGatherDispatcher`: all-gather every EP rank's tokens and routing, compute this rank's
  experts on all of them, and reduce-scatter the weighted outputs back.

All three give the single-process result. A rank or an expert with zero tokens is fine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron.core.config import MoEConfig
from megatron.core.transformer.moe.router import RouterOutput


# ---------------------------------------------------------------- local permutation helpers

def sort_assignments(expert_idx_TK: torch.Tensor, keep_TK: Optional[torch.Tensor], num_experts: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the kept (token, k) assignments by expert.

    Returns sort_idx_N (indices into the flattened T*K assignments, grouped by expert, token
    order within an expert) and tokens_per_expert_E. Dropped assignments are left out.
    """
    expert_flat = expert_idx_TK.reshape(-1)
    if keep_TK is not None:  # dropped assignments sort last, behind a sentinel expert
        expert_flat = torch.where(keep_TK.reshape(-1), expert_flat, num_experts)
    counts = torch.bincount(expert_flat, minlength=num_experts + 1)
    sort_idx = torch.argsort(expert_flat, stable=True)
    if keep_TK is not None:
        sort_idx = sort_idx[: expert_flat.numel() - int(counts[num_experts])]
    return sort_idx, counts[:num_experts]


def permute(hidden_TD: torch.Tensor, sort_idx_N: torch.Tensor, topk: int) -> torch.Tensor:
    """Rows of hidden_TD in assignment order: x_ND[n] = hidden_TD[sort_idx_N[n] // K]."""
    return hidden_TD.index_select(0, sort_idx_N // topk)


def unpermute(y_ND: torch.Tensor, sort_idx_N: torch.Tensor, probs_TK: torch.Tensor) -> torch.Tensor:
    """out_TD = sum_k probs_TK[t, k] * y of assignment (t, k); missing assignments count 0.

    Scatter with unique indices then a weighted sum over K: deterministic on every device.
    """
    T, K = probs_TK.shape
    y_flat = y_ND.new_zeros(T * K, y_ND.shape[-1]).index_copy(0, sort_idx_N, y_ND)
    probs_T1K = probs_TK.unsqueeze(1).to(y_flat.dtype)
    return torch.bmm(probs_T1K, y_flat.view(T, K, -1)).squeeze(1)


def pad_slots(tokens_per_expert_E: torch.Tensor, capacity: int, N: int) -> torch.Tensor:
    """slot_N: where each of the N grouped rows goes when every expert is padded to `capacity` rows."""
    E = tokens_per_expert_E.numel()
    expert_of_row = torch.repeat_interleave(torch.arange(E, device=tokens_per_expert_E.device),
                                            tokens_per_expert_E, output_size=N)
    starts = torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E
    return expert_of_row * capacity + torch.arange(N, device=expert_of_row.device) - starts[expert_of_row]


# ---------------------------------------------------------------- differentiable collectives

class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (input_splits, output_splits), group
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        input_splits, output_splits = ctx.splits
        return _AllToAll.apply(grad, input_splits, output_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, output_splits, input_splits, group)


def _gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


def _reduce_scatter_rows(x: torch.Tensor, group) -> torch.Tensor:
    """Sum x over the group and keep this rank's equal share of rows."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.device.type == "cuda":
        out = x.new_empty((x.shape[0] // world,) + tuple(x.shape[1:]))
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        reduce_scatter(out, x.contiguous(), group=group)
        return out
    total = x.contiguous().clone()  # gloo has no reduce-scatter: all-reduce, keep our slice
    dist.all_reduce(total, group=group)
    return total.chunk(world)[rank].contiguous()


class _AllGather(torch.autograd.Function):
    """Concatenate equal-sized row blocks from every rank; gradient is reduce-scatter."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _gather_rows(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter_rows(grad, ctx.group), None


class _ReduceScatter(torch.autograd.Function):
    """Sum over ranks and keep this rank's row block; gradient is all-gather."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter_rows(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gather_rows(grad, ctx.group), None


# ---------------------------------------------------------------- dispatchers

@dataclass
class _State:
    """What combine needs to undo dispatch."""

    sort_idx_N: torch.Tensor
    probs_TK: torch.Tensor
    pad_slot_N: Optional[torch.Tensor] = None
    send_splits: Optional[list[int]] = None
    recv_splits: Optional[list[int]] = None
    regroup_idx: Optional[torch.Tensor] = None


class LocalDispatcher:
    """All experts live on this rank (EP = 1)."""

    def __init__(self, moe: MoEConfig, ep_group=None):
        self.moe = moe
        self.ep_group = ep_group
        self.ep_size = 1 if ep_group is None else dist.get_world_size(ep_group)
        self.ep_rank = 0 if ep_group is None else dist.get_rank(ep_group)
        self.num_local_experts = moe.num_experts // self.ep_size
        self.local_expert_offset = self.ep_rank * self.num_local_experts

    def dispatch(self, hidden_TD: torch.Tensor, routing: RouterOutput):
        sort_idx, counts_E = sort_assignments(routing.expert_idx_TK, routing.keep_TK, self.moe.num_experts)
        x_ND = permute(hidden_TD, sort_idx, routing.expert_idx_TK.shape[1])
        state = _State(sort_idx, routing.probs_TK)
        x_ND, counts_E = self._pad(x_ND, counts_E, routing.capacity, state)
        return x_ND, counts_E, state

    def combine(self, y_ND: torch.Tensor, state: _State) -> torch.Tensor:
        y_ND = self._unpad(y_ND, state)
        return unpermute(y_ND, state.sort_idx_N, state.probs_TK)

    def _pad(self, x_ND, counts_L, capacity, state: _State):
        """With --moe-pad-expert-input-to-capacity, give every expert exactly `capacity` rows per source."""
        if not self.moe.pad_to_capacity:
            return x_ND, counts_L
        per_expert = capacity * self.ep_size
        state.pad_slot_N = pad_slots(counts_L, per_expert, x_ND.shape[0])
        padded = x_ND.new_zeros(counts_L.numel() * per_expert, x_ND.shape[1]).index_copy(0, state.pad_slot_N, x_ND)
        return padded, torch.full_like(counts_L, per_expert)

    @staticmethod
    def _unpad(y_ND, state: _State):
        return y_ND if state.pad_slot_N is None else y_ND.index_select(0, state.pad_slot_N)


class AllToAllDispatcher(LocalDispatcher):
    """Experts split over the EP group; tokens travel by all-to-all with uneven splits."""

    def dispatch(self, hidden_TD: torch.Tensor, routing: RouterOutput):
        EP, L = self.ep_size, self.num_local_experts
        sort_idx, counts_E = sort_assignments(routing.expert_idx_TK, routing.keep_TK, self.moe.num_experts)
        x_ND = permute(hidden_TD, sort_idx, routing.expert_idx_TK.shape[1])
        # counts_recv[r, l]: rows source rank r sends to our local expert l.
        counts_recv = torch.empty_like(counts_E)
        dist.all_to_all_single(counts_recv, counts_E, group=self.ep_group)
        counts_recv_RL = counts_recv.view(EP, L)
        # The one host sync of the dispatch: all_to_all_single takes its splits as Python ints.
        send_splits, recv_splits = torch.stack([counts_E.view(EP, L).sum(1), counts_recv_RL.sum(1)]).tolist()
        x_recv = all_to_all(x_ND, recv_splits, send_splits, self.ep_group)
        regroup_idx = _source_major_to_expert_major(counts_recv_RL, sum(recv_splits))
        x_local = x_recv.index_select(0, regroup_idx)
        state = _State(sort_idx, routing.probs_TK, send_splits=send_splits, recv_splits=recv_splits,
                       regroup_idx=regroup_idx)
        counts_L = counts_recv_RL.sum(0)
        x_local, counts_L = self._pad(x_local, counts_L, routing.capacity, state)
        return x_local, counts_L, state

    def combine(self, y_ND: torch.Tensor, state: _State) -> torch.Tensor:
        y_local = self._unpad(y_ND, state)
        y_recv = y_local.new_zeros(y_local.shape).index_copy(0, state.regroup_idx, y_local)
        y_sent = all_to_all(y_recv, state.send_splits, state.recv_splits, self.ep_group)
        return unpermute(y_sent, state.sort_idx_N, state.probs_TK)


def _source_major_to_expert_major(counts_RL: torch.Tensor, N: int) -> torch.Tensor:
    """Index that reorders N rows laid out [source rank][local expert] into [local expert][source rank]."""
    R, L = counts_RL.shape
    flat = counts_RL.reshape(-1)
    starts = (torch.cumsum(flat, 0) - flat).view(R, L)
    blocks_start = starts.t().reshape(-1)  # expert-major order of the (r, l) blocks
    blocks_len = counts_RL.t().reshape(-1)
    block_of_row = torch.repeat_interleave(torch.arange(R * L, device=flat.device), blocks_len, output_size=N)
    offset_in_block = torch.arange(N, device=flat.device) - (torch.cumsum(blocks_len, 0) - blocks_len)[block_of_row]
    return blocks_start[block_of_row] + offset_in_block


class AllGatherDispatcher(LocalDispatcher):
    """Experts split over the EP group; every rank sees every token of the group."""

    def dispatch(self, hidden_TD: torch.Tensor, routing: RouterOutput):
        group, L, offset = self.ep_group, self.num_local_experts, self.local_expert_offset
        hidden_all = _AllGather.apply(hidden_TD, group)
        probs_all = _AllGather.apply(routing.probs_TK, group)
        idx_all = _gather_rows(routing.expert_idx_TK, group)
        local = (idx_all >= offset) & (idx_all < offset + L)
        if routing.keep_TK is not None:
            local &= _gather_rows(routing.keep_TK, group)
        sort_idx, counts_L = sort_assignments(idx_all - offset, local, L)
        x_ND = permute(hidden_all, sort_idx, idx_all.shape[1])
        state = _State(sort_idx, probs_all)
        x_ND, counts_L = self._pad(x_ND, counts_L, routing.capacity, state)
        return x_ND, counts_L, state

    def combine(self, y_ND: torch.Tensor, state: _State) -> torch.Tensor:
        out_all = unpermute(self._unpad(y_ND, state), state.sort_idx_N, state.probs_TK)
        return _ReduceScatter.apply(out_all, self.ep_group)


def build_dispatcher(moe: MoEConfig, ep_group=None) -> LocalDispatcher:
    """The dispatcher for `--moe-token-dispatcher-type` over `ep_group` (None or size 1: local)."""
    if ep_group is None or dist.get_world_size(ep_group) == 1:
        return LocalDispatcher(moe, ep_group)
    if moe.token_dispatcher_type == "alltoall":
        return AllToAllDispatcher(moe, ep_group)
    return AllGatherDispatcher(moe, ep_group)
