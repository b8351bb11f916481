"""Routers: which experts each token goes to, with what weight, and the balancing losses.

A router is a strategy behind one interface, `Router.forward(hidden_TD, seq_length) ->
RouterOutput`, so that other routing schemes (sinkhorn, expert choice, group-limited, ...) can
be added as subclasses without touching the dispatcher or the experts. `TopKRouter` implements
Megatron-Core's top-k routing (DESIGN.md 5.1): softmax or sigmoid scores, optional pre-softmax,
scaling factor, aux/seq/global load-balancing loss, z-loss, input jitter, expert capacity with
token dropping, and the aux-loss-free expert bias.

The router computes in fp32 regardless of autocast: routing decisions are discrete and
sensitive to rounding, and its matmul is tiny.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron.core.config import ModelConfig, MoEConfig
from megatron.core.transformer import init
from megatron.core.transformer.moe import load_balancing


@dataclass
class RouterOutput:
    """What the dispatcher and the loop need from routing T tokens to K experts each.

    probs_TK: combine weights of the chosen experts (0 where the assignment was dropped).
    expert_idx_TK: chosen expert ids (int64).
    keep_TK: bool mask of assignments within capacity; None when dropless.
    capacity: per-expert capacity (tokens) when a capacity factor is set, else None.
    aux_loss: scalar, the sum of every coefficient-scaled auxiliary loss; add it to the
        loss that is backpropagated, never to the reported LM loss.
    stats: detached numbers for logging (see `RouterStats`).
    """

    probs_TK: torch.Tensor
    expert_idx_TK: torch.Tensor
    keep_TK: Optional[torch.Tensor]
    capacity: Optional[int]
    aux_loss: torch.Tensor
    stats: "RouterStats"


@dataclass
class RouterStats:
    """Detached per-layer numbers for logging; summed over micro-batches by the loop.

    tokens_per_expert_E: assignments chosen by top-k per expert, before dropping (float).
    dropped: assignments dropped for capacity. assignments: T*K.
    load_balancing_loss, z_loss: coefficient-scaled loss values (0 when disabled).
    """

    tokens_per_expert_E: torch.Tensor
    dropped: torch.Tensor
    assignments: torch.Tensor
    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor

    def __add__(self, other: "RouterStats") -> "RouterStats":
        return RouterStats(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple())))

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return (self.tokens_per_expert_E, self.dropped, self.assignments, self.load_balancing_loss, self.z_loss)


def expert_capacity(num_tokens: int, num_experts: int, topk: int, capacity_factor: float) -> int:
    """ceil(T * K / E * capacity_factor): the most assignments one expert accepts."""
    return int(math.ceil(num_tokens * topk / num_experts * capacity_factor))


def capacity_keep_mask(probs_TK: torch.Tensor, expert_idx_TK: torch.Tensor, num_experts: int,
                       capacity: int, policy: str) -> torch.Tensor:
    """keep_TK: for each expert, at most `capacity` of its assignments survive.

    policy `probs` keeps each expert's highest-probability assignments, `position` its earliest
    tokens. Ties keep the earlier token.
    """
    T, K = expert_idx_TK.shape
    expert_flat = expert_idx_TK.reshape(-1)
    if policy == "probs":
        order = torch.argsort(probs_TK.reshape(-1), descending=True, stable=True)
    else:
        order = torch.arange(T * K, device=expert_flat.device)
    # Stable sort by expert keeps the priority order within each expert.
    by_expert = order[torch.argsort(expert_flat[order], stable=True)]
    counts_E = torch.bincount(expert_flat, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_in_expert = torch.arange(T * K, device=expert_flat.device) - starts_E[expert_flat[by_expert]]
    keep_flat = torch.empty(T * K, dtype=torch.bool, device=expert_flat.device)
    keep_flat[by_expert] = rank_in_expert < capacity
    return keep_flat.view(T, K)


class Router(nn.Module):
    """Base of all routing strategies: hidden_TD -> RouterOutput."""

    def forward(self, hidden_TD: torch.Tensor, seq_length: int) -> RouterOutput:  # pragma: no cover
        raise NotImplementedError

    def update_expert_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """Called once per optimizer step with the step's global per-expert counts."""


class TopKRouter(Router):
    """Top-k routing with softmax or sigmoid scores (Megatron-Core semantics).

    `dp_group` is used only by `global_aux_loss`, to sum expert counts over the data-parallel
    ranks; it is None in a single process.
    """

    def __init__(self, config: ModelConfig, dp_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        moe: MoEConfig = config.moe
        self.moe = moe
        self.dp_group = dp_group
        self.weight = nn.Parameter(init.normal_(torch.empty(moe.num_experts, config.hidden_size), init.init_std(config)))
        if moe.enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(moe.num_experts))
        else:
            self.expert_bias = None

    def forward(self, hidden_TD: torch.Tensor, seq_length: int) -> RouterOutput:
        moe = self.moe
        x_TD = self.jitter(hidden_TD)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        probs_TK, expert_idx_TK, scores_TE = self.topk(logits_TE)
        counts_E = torch.bincount(expert_idx_TK.reshape(-1), minlength=moe.num_experts)

        lb_loss = self.load_balancing_loss(scores_TE, expert_idx_TK, counts_E, seq_length)
        zl = load_balancing.z_loss(logits_TE, moe.z_loss_coeff) if moe.z_loss_coeff else logits_TE.new_zeros(())

        keep_TK, capacity = None, None
        T, K = expert_idx_TK.shape
        if moe.capacity_factor is not None:
            capacity = expert_capacity(T, moe.num_experts, K, moe.capacity_factor)
            keep_TK = capacity_keep_mask(probs_TK, expert_idx_TK, moe.num_experts, capacity, moe.token_drop_policy)
            probs_TK = probs_TK * keep_TK
        stats = RouterStats(
            tokens_per_expert_E=counts_E.detach().float(),
            dropped=(T * K - keep_TK.sum()).float() if keep_TK is not None else logits_TE.new_zeros(()),
            assignments=logits_TE.new_tensor(float(T * K)),
            load_balancing_loss=lb_loss.detach(),
            z_loss=zl.detach(),
        )
        return RouterOutput(probs_TK, expert_idx_TK, keep_TK, capacity, lb_loss + zl, stats)

    def jitter(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Multiply by uniform noise in [1-eps, 1+eps] while training (Switch Transformer)."""
        eps = self.moe.input_jitter_eps
        if not self.training or not eps:
            return x_TD
        noise = torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        return x_TD * noise

    def topk(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """logits_TE -> probs_TK, expert_idx_TK, and the full scores_TE used by the aux loss."""
        moe, K = self.moe, self.moe.router_topk
        if moe.score_function == "softmax":
            scores_TE = torch.softmax(logits_TE, dim=-1)
            select_TE = scores_TE if moe.pre_softmax else logits_TE
        else:
            sigmoid_TE = torch.sigmoid(logits_TE)
            scores_TE = sigmoid_TE / (sigmoid_TE.sum(dim=-1, keepdim=True) + 1e-20)
            select_TE = sigmoid_TE
        biased_TE = select_TE if self.expert_bias is None else select_TE + self.expert_bias
        expert_idx_TK = torch.topk(biased_TE, K, dim=-1).indices
        chosen_TK = torch.gather(select_TE, 1, expert_idx_TK)
        if moe.score_function == "softmax":
            probs_TK = chosen_TK if moe.pre_softmax else torch.softmax(chosen_TK, dim=-1)
        else:
            probs_TK = chosen_TK / (chosen_TK.sum(dim=-1, keepdim=True) + 1e-20) if K > 1 else chosen_TK
        if moe.topk_scaling_factor is not None:
            probs_TK = probs_TK * moe.topk_scaling_factor
        return probs_TK, expert_idx_TK, scores_TE

    def load_balancing_loss(self, scores_TE: torch.Tensor, expert_idx_TK: torch.Tensor,
                            counts_E: torch.Tensor, seq_length: int) -> torch.Tensor:
        moe = self.moe
        kind, coeff = moe.load_balancing_type, moe.aux_loss_coeff
        if kind == "none" or coeff == 0 or not self.training:
            return scores_TE.new_zeros(())
        if kind == "seq_aux_loss":
            T, E = scores_TE.shape
            B = T // seq_length
            return load_balancing.sequence_aux_loss(
                scores_TE.view(B, seq_length, E), expert_idx_TK.view(B, seq_length, -1), coeff)
        num_tokens = scores_TE.shape[0]
        if kind == "global_aux_loss" and self.dp_group is not None and dist.get_world_size(self.dp_group) > 1:
            counts_E = counts_E.clone()
            dist.all_reduce(counts_E, group=self.dp_group)
            num_tokens *= dist.get_world_size(self.dp_group)
        return load_balancing.switch_aux_loss(scores_TE, counts_E, moe.router_topk, coeff, num_tokens)

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """Aux-loss-free balancing: bias_e += rate * sign(mean(c) - c_e)."""
        if self.expert_bias is None:
            return
        c = tokens_per_expert_E.float().to(self.expert_bias.device)
        self.expert_bias += self.moe.bias_update_rate * torch.sign(c.mean() - c)


def build_router(config: ModelConfig, dp_group: Optional[dist.ProcessGroup] = None) -> Router:
    """The routing strategy for `config` (only top-k for now)."""
    return TopKRouter(config, dp_group)
