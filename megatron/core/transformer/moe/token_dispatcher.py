"""Token dispatchers: move routed tokens to the ranks that own their experts, and back.

This is the only module that knows the expert-parallel (EP) and expert-tensor-parallel (ETP)
groups. The model calls

    x_ND, tokens_per_local_expert_L, state = dispatcher.dispatch(hidden_TD, routing)
    y_ND = experts(x_ND, tokens_per_local_expert_L)
    out_TD = dispatcher.combine(y_ND, state)

where rows of x_ND are grouped by local expert (L = E / EP experts on this rank), and out_TD is
the probability-weighted sum over each token's K experts (dropped assignments contribute 0).
K is the width of the router's assignment table, nothing assumes a token has K experts: expert
choice routing passes K = E columns, keep_TK marking the experts that picked the token (zero,
one or several; `router.ExpertChoiceRouter`).

* `LocalDispatcher` (EP = 1): sort the T*K assignments by expert, compute, unsort.
* `AllToAllDispatcher`: sort by global expert, exchange counts, `all_to_all_single` with uneven
  splits (differentiable), regroup received rows from [source rank, local expert] to
  [local expert, source rank] order, and the mirror path back.
* `AllGatherDispatcher`: all-gather every EP rank's tokens and routing, compute this rank's
  experts on all of them, and reduce-scatter the weighted outputs back.

Expert tensor parallelism (ETP > 1): the ETP ranks hold the same experts, each a slice of
their FFN width, so each must see the rows of all of them and its outputs are partial sums.
After the EP exchange, the local and all-to-all dispatchers all-gather the received rows (and
their counts) over the ETP group, uneven sizes, regroup all of them by local expert (sources
[ETP rank][EP rank]), and in combine reduce-scatter the partial outputs back to each rank's
own rows before the reverse exchange (Megatron-Core's all-to-all dispatcher does the same).
The all-gather dispatcher gathers the tokens over EP and then over ETP, and reduce-scatters
over ETP and then EP.

All three give the single-process result. A rank or an expert with zero tokens is fine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron.core.config import MoEConfig
from megatron.core.tensor_parallel import mappings
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
    etp_rows: Optional[list[int]] = None
    """Rows each ETP rank put into the gathered block (None when ETP = 1)."""
    regroup_idx: Optional[torch.Tensor] = None


class LocalDispatcher:
    """All experts live on this rank (EP = 1). With ETP > 1 the ETP ranks gather each other's
    routed rows, so that each computes its slice of every expert on all of them."""

    def __init__(self, moe: MoEConfig, ep_group=None, etp_group=None):
        self.moe = moe
        self.ep_group, self.etp_group = ep_group, etp_group
        self.ep_size, self.ep_rank = mappings.group_size(ep_group), mappings.group_rank(ep_group)
        self.etp_size = mappings.group_size(etp_group)
        self.num_local_experts = moe.num_experts // self.ep_size
        self.local_expert_offset = self.ep_rank * self.num_local_experts

    def dispatch(self, hidden_TD: torch.Tensor, routing: RouterOutput):
        sort_idx, counts_E = sort_assignments(routing.expert_idx_TK, routing.keep_TK, self.moe.num_experts)
        x_ND = permute(hidden_TD, sort_idx, routing.expert_idx_TK.shape[1])
        state = _State(sort_idx, routing.probs_TK)
        counts_SL = counts_E.view(1, -1)
        if self.etp_size > 1:
            counts_SL = self._counts_over_etp(counts_SL)
            x_ND = self._gather_over_etp(x_ND, self._rows_per_etp_rank(counts_SL).tolist(), state)
        x_ND, counts_L = self._to_experts(x_ND, counts_SL, routing.capacity, state)
        return x_ND, counts_L, state

    def combine(self, y_ND: torch.Tensor, state: _State) -> torch.Tensor:
        return unpermute(self._from_experts(y_ND, state), state.sort_idx_N, state.probs_TK)

    # -- the expert-tensor-parallel stage, shared by the local and all-to-all dispatchers

    def _counts_over_etp(self, counts_SL: torch.Tensor) -> torch.Tensor:
        """Every ETP rank's counts_SL (rows it holds from source S for local expert L), stacked
        in ETP rank order: counts of the gathered block, sources [ETP rank][S]."""
        return mappings.all_gather(counts_SL, self.etp_group, 0)

    def _rows_per_etp_rank(self, counts_SL: torch.Tensor) -> torch.Tensor:
        """rows_R: how many rows each ETP rank contributes, from the stacked counts."""
        return counts_SL.view(self.etp_size, -1).sum(1)

    def _gather_over_etp(self, x_nD: torch.Tensor, etp_rows: list[int], state: _State) -> torch.Tensor:
        """x_nD (this rank's rows) -> x_ND, the rows of every ETP rank in rank order."""
        state.etp_rows = etp_rows
        return mappings.gather_rows_uneven(x_nD, self.etp_group, etp_rows)

    def _to_experts(self, x_ND: torch.Tensor, counts_SL: torch.Tensor, capacity: Optional[int], state: _State):
        """Rows laid out [source][local expert] -> [local expert][source] (padded to capacity
        with --moe-pad-expert-input-to-capacity) and tokens_per_expert_L."""
        if counts_SL.shape[0] > 1:
            state.regroup_idx = _source_major_to_expert_major(counts_SL, x_ND.shape[0])
            x_ND = x_ND.index_select(0, state.regroup_idx)
        return self._pad(x_ND, counts_SL.sum(0), capacity, state)

    def _from_experts(self, y_ND: torch.Tensor, state: _State) -> torch.Tensor:
        """The mirror of `_to_experts` and `_gather_over_etp`: unpad, back to [source][local
        expert] order, and sum the ETP ranks' partial outputs into this rank's rows."""
        y_ND = self._unpad(y_ND, state)
        if state.regroup_idx is not None:
            y_ND = y_ND.new_zeros(y_ND.shape).index_copy(0, state.regroup_idx, y_ND)
        if state.etp_rows is not None:
            y_ND = mappings.reduce_scatter_rows_uneven(y_ND, self.etp_group, state.etp_rows)
        return y_ND

    def _pad(self, x_ND, counts_L, capacity, state: _State):
        """With --moe-pad-expert-input-to-capacity, give every expert exactly `capacity` rows per
        source rank (EP x ETP sources, each sending at most `capacity` rows an expert)."""
        if not self.moe.pad_to_capacity:
            return x_ND, counts_L
        per_expert = capacity * self.ep_size * self.etp_size
        state.pad_slot_N = pad_slots(counts_L, per_expert, x_ND.shape[0])
        padded = x_ND.new_zeros(counts_L.numel() * per_expert, x_ND.shape[1]).index_copy(0, state.pad_slot_N, x_ND)
        return padded, torch.full_like(counts_L, per_expert)

    @staticmethod
    def _unpad(y_ND, state: _State):
        return y_ND if state.pad_slot_N is None else y_ND.index_select(0, state.pad_slot_N)


class AllToAllDispatcher(LocalDispatcher):
    """Experts split over the EP group; tokens travel by all-to-all with uneven splits, then
    (ETP > 1) are gathered over the ETP group."""

    def dispatch(self, hidden_TD: torch.Tensor, routing: RouterOutput):
        EP, L = self.ep_size, self.num_local_experts
        sort_idx, counts_E = sort_assignments(routing.expert_idx_TK, routing.keep_TK, self.moe.num_experts)
        x_ND = permute(hidden_TD, sort_idx, routing.expert_idx_TK.shape[1])
        # counts_recv[r, l]: rows source rank r sends to our local expert l.
        counts_recv = torch.empty_like(counts_E)
        dist.all_to_all_single(counts_recv, counts_E, group=self.ep_group)
        counts_recv_RL = counts_recv.view(EP, L)
        counts_SL = self._counts_over_etp(counts_recv_RL) if self.etp_size > 1 else counts_recv_RL
        # The one host sync of the dispatch: the collectives take their splits as Python ints.
        splits = torch.cat([counts_E.view(EP, L).sum(1), counts_recv_RL.sum(1), self._rows_per_etp_rank(counts_SL)])
        splits = splits.tolist()
        send_splits, recv_splits, etp_rows = splits[:EP], splits[EP:2 * EP], splits[2 * EP:]
        x_recv = all_to_all(x_ND, recv_splits, send_splits, self.ep_group)
        state = _State(sort_idx, routing.probs_TK, send_splits=send_splits, recv_splits=recv_splits)
        if self.etp_size > 1:
            x_recv = self._gather_over_etp(x_recv, etp_rows, state)
        x_local, counts_L = self._to_experts(x_recv, counts_SL, routing.capacity, state)
        return x_local, counts_L, state

    def combine(self, y_ND: torch.Tensor, state: _State) -> torch.Tensor:
        y_recv = self._from_experts(y_ND, state)
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
    """Experts split over the EP group; every rank sees every token of the EP x ETP group
    (gathered over EP, then over ETP) and computes its local experts (its slice of them) on
    their assignments; the outputs are reduce-scattered back over ETP, then over EP."""

    def dispatch(self, hidden_TD: torch.Tensor, routing: RouterOutput):
        L, offset = self.num_local_experts, self.local_expert_offset
        hidden_all = self._gather_tokens(hidden_TD)
        probs_all = self._gather_tokens(routing.probs_TK)
        idx_all = self._gather_tokens(routing.expert_idx_TK)
        local = (idx_all >= offset) & (idx_all < offset + L)
        if routing.keep_TK is not None:
            local &= self._gather_tokens(routing.keep_TK)
        sort_idx, counts_L = sort_assignments(idx_all - offset, local, L)
        x_ND = permute(hidden_all, sort_idx, idx_all.shape[1])
        state = _State(sort_idx, probs_all)
        x_ND, counts_L = self._pad(x_ND, counts_L, routing.capacity, state)
        return x_ND, counts_L, state

    def combine(self, y_ND: torch.Tensor, state: _State) -> torch.Tensor:
        out_all = unpermute(self._unpad(y_ND, state), state.sort_idx_N, state.probs_TK)
        for group in reversed(self._token_groups()):
            out_all = _ReduceScatter.apply(out_all, group)
        return out_all

    def _token_groups(self) -> list:
        """The groups the tokens are gathered over, in order: EP, then ETP (when > 1)."""
        return [self.ep_group] + ([self.etp_group] if self.etp_size > 1 else [])

    def _gather_tokens(self, t_T: torch.Tensor) -> torch.Tensor:
        """Rows of every rank of the EP x ETP group: [ETP rank][EP rank][token] (differentiable
        for floating-point tensors)."""
        for group in self._token_groups():
            t_T = _AllGather.apply(t_T, group) if t_T.is_floating_point() else _gather_rows(t_T, group)
        return t_T


def build_dispatcher(moe: MoEConfig, ep_group=None, etp_group=None) -> LocalDispatcher:
    """The dispatcher for `--moe-token-dispatcher-type` over `ep_group` (None or size 1: local)
    and `etp_group`, the ranks splitting each local expert's FFN width (None or size 1: none)."""
    if mappings.group_size(ep_group) == 1:
        return LocalDispatcher(moe, ep_group, etp_group)
    if moe.token_dispatcher_type == "alltoall":
        return AllToAllDispatcher(moe, ep_group, etp_group)
    return AllGatherDispatcher(moe, ep_group, etp_group)
