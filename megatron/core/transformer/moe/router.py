"""Routers: which experts each token goes to, with what weight, and the balancing losses.

A router is a strategy behind one interface, `Router.forward(hidden_TD, seq_length) ->
RouterOutput`, so that other routing schemes (sinkhorn, expert choice, group-limited, ...) can
be added as subclasses without touching the dispatcher or the experts. `TopKRouter` implements
Megatron-Core's top-k routing, number for number:

    logits_TE = hidden_TD @ W_router^T (+ bias with linear biases)   (fp32)
    selection:  softmax   top-k of logits_TE, probs = softmax over the k chosen logits
                softmax + pre-softmax   top-k of softmax(logits_TE), probs = those scores
                sigmoid   top-k of sigmoid(logits_TE) + expert_bias, probs = the chosen
                          (unbiased) sigmoids, renormalised over the k when k > 1
                probs *= topk_scaling_factor (when set and non-zero)
    capacity:   at most ceil(T*K/E * c) assignments an expert, the rest dropped
    aux losses: from a plain top-k of the scores WITHOUT the expert bias (softmax, or sigmoid
                normalised over all E), so the bias changes routing but not the loss
    z-loss:     coeff * mean_t logsumexp_e(logits_te)^2

Aux and z-losses exist only while training with gradients on. They are returned in
`RouterOutput.aux_loss` (coefficient-scaled; the MoE layer makes its gradient part of the
backward pass, see `moe_layer.AuxLossGradient`) and in `RouterStats` without the coefficient,
which is what Megatron-LM logs. A training forward also adds its `RouterStats` to the router's
`step_stats`, so that the training loop reads a step's numbers from the routers, whatever ran
the forwards (a pipeline schedule returns no side outputs).

The router computes in fp32 (or fp64 with `--moe-router-dtype fp64`) whatever the parameters'
dtype: routing decisions are discrete and sensitive to rounding, and its matmul is tiny.

The strategies (`build_router` picks one from the config):

    TopKRouter            the above (`--moe-router-type topk`, the default)
    GroupLimitedRouter    top-k inside the best g of G expert groups (`--moe-router-num-groups G
                          --moe-router-group-topk g`, Megatron-Core's group-limited routing)
    SinkhornRouter        selection on Sinkhorn-balanced scores while training
                          (`--moe-router-load-balancing-type sinkhorn`, Megatron-Core's semantics)
    NoisyTopKRouter       Shazeer et al. 2017: top-k of logits plus learned Gaussian noise, with
                          importance and load losses (`--moe-router-type noisy_topk`)
    ExpertChoiceRouter    Zhou et al. 2022: every expert takes its top-C tokens of the micro-batch
                          (`--moe-router-type expert_choice --moe-expert-capacity-factor c`); a
                          token gets zero, one or several experts

`--moe-router-force-load-balancing` (top-k routers) replaces the logits by N(0, 1) draws with the
gradient passed straight through, as Megatron-Core does for performance work: routing is then
uniform in expectation and the model learns nothing useful.
Switch Transformer routing (top-1) is the recipe `--moe-router-topk 1 --moe-router-pre-softmax
--moe-expert-capacity-factor c`: the combine weight is the full softmax's probability of the
chosen expert, so the LM loss reaches the router, and each expert takes at most ceil(T/E * c)
tokens.

Under tensor parallelism each rank routes its own shard of every sequence (`token_group`, the
T ranks holding the shards of the same micro-batches). The numbers then equal one process's:
the balancing losses use expert counts summed over the group and each rank's loss is its share
(the shares, and their gradients through the router weight, sum to the whole); the z-loss is
the shard's mean divided by T; capacity is decided over the whole micro-batch (each rank
gathers the group's choices, which are small) and each rank keeps its shard of the mask. Every
count in `RouterStats` is this rank's share, so sums over ranks are the totals.
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
from megatron.core.tensor_parallel import mappings
from megatron.core.transformer import init
from megatron.core.transformer.moe import health, load_balancing


@dataclass
class RouterOutput:
    """What the dispatcher and the loop need from routing T tokens: a table of K assignments a
    token (K = --moe-router-topk; `ExpertChoiceRouter`: K = E, one column an expert, keep_TK
    marking the experts that picked the token, so a token has zero, one or several).

    probs_TK: combine weights of the chosen experts (0 where the assignment was dropped).
    expert_idx_TK: chosen expert ids (int64).
    keep_TK: bool mask of assignments within capacity; None when dropless.
    capacity: per-expert capacity (tokens) when a capacity factor is set, else None.
    aux_loss: scalar, the sum of every coefficient-scaled auxiliary loss; add it to the
        loss that is backpropagated, never to the reported LM loss.
    stats: detached numbers for logging and the expert-bias update (see `RouterStats`).
    """

    probs_TK: torch.Tensor
    expert_idx_TK: torch.Tensor
    keep_TK: Optional[torch.Tensor]
    capacity: Optional[int]
    aux_loss: torch.Tensor
    stats: "RouterStats"


@dataclass
class RouterStats:
    """Detached per-layer numbers; summed over micro-batches by the loop.

    tokens_per_expert_E: assignments chosen per expert, before dropping (float).
    routed_per_expert_E: assignments per expert after capacity dropping (with padding to
        capacity: the padded slots), the counts the expert-bias update balances, as in
        Megatron-Core.
    dropped: assignments dropped for capacity. assignments: T*K.
        (`ExpertChoiceRouter`: dropped counts the tokens that no expert picked and assignments
        the tokens T, so dropped / assignments is the fraction of tokens that skip the routed
        experts; tokens_per_expert_E = routed_per_expert_E = the picks, C per expert.)
    load_balancing_loss, z_loss: the loss values WITHOUT their coefficients (0 when off),
        the numbers Megatron-LM logs.
    token_entropy: [sum over tokens of the normalised entropy of the token's routing
        distribution over all E, number of tokens] (`health.token_entropy_stat`), or None from a
        router that does not report it.
    """

    tokens_per_expert_E: torch.Tensor
    routed_per_expert_E: torch.Tensor
    dropped: torch.Tensor
    assignments: torch.Tensor
    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor
    token_entropy: Optional[torch.Tensor] = None

    def __add__(self, other: "RouterStats") -> "RouterStats":
        return RouterStats(*(None if a is None or b is None else a + b
                             for a, b in zip(self.as_tuple(), other.as_tuple())))

    def as_tuple(self) -> tuple[Optional[torch.Tensor], ...]:
        return (self.tokens_per_expert_E, self.routed_per_expert_E, self.dropped, self.assignments,
                self.load_balancing_loss, self.z_loss, self.token_entropy)


LOAD_BALANCING_LOSS_NAMES = {
    "aux_loss": "load_balancing_loss",
    "seq_aux_loss": "seq_load_balancing_loss",
    "global_aux_loss": "global_load_balancing_loss",
}
"""The name Megatron-LM logs each balancing loss under."""


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


def aux_loss_scores(logits_TE: torch.Tensor, score_function: str) -> torch.Tensor:
    """scores_TE the balancing losses use: softmax over all E, or sigmoid normalised over all E."""
    if score_function == "softmax":
        return torch.softmax(logits_TE, dim=-1)
    sigmoid_TE = torch.sigmoid(logits_TE)
    return sigmoid_TE / (sigmoid_TE.sum(dim=-1, keepdim=True) + 1e-20)


class Router(nn.Module):
    """Base of all routing strategies: hidden_TD -> RouterOutput."""

    def forward(self, hidden_TD: torch.Tensor, seq_length: int) -> RouterOutput:  # pragma: no cover
        raise NotImplementedError

    recomputing: bool = False
    """True while activation recompute re-runs this router's forward (set by the layer)."""
    step_stats: Optional[RouterStats] = None
    """This step's RouterStats, summed over its training micro-batches (None before the first)."""
    aux_loss_grad_scale: float = 1.0
    """What the aux loss's gradient is multiplied by in backward: 1 / micro-batches per step
    (times the loss scale under fp16), set by the training loop every step."""

    replayed_state: object = None
    """While recomputing: what `replay_state` returned before the forward being recomputed."""

    def replay_state(self) -> object:
        """Called before a forward that may be recomputed; a recompute of it finds the value in
        `replayed_state` (torch may recompute a forward more than once, in any order)."""
        return None

    def start_step(self, iteration: Optional[int] = None) -> None:
        """Called before the first micro-batch of every optimizer step; `iteration` is the number
        of steps completed so far (the training loop's, so that it continues across a resume)."""
        self.step_stats = None

    def record(self, stats: RouterStats) -> None:
        """Add one training micro-batch's stats to `step_stats` (not again when recomputing)."""
        if not self.recomputing:
            self.step_stats = stats if self.step_stats is None else self.step_stats + stats

    def update_expert_bias(self, routed_per_expert_E: torch.Tensor) -> None:
        """Called once per optimizer step with the step's global `routed_per_expert_E`."""


class TopKRouter(Router):
    """Top-k routing with softmax or sigmoid scores (Megatron-Core semantics, module docstring).

    `dp_group` is used only by `global_aux_loss`, to sum expert counts over the ranks that hold
    different tokens of the step (data-parallel, times tensor-parallel when T > 1); None in a
    single process. `token_group`: the tensor-parallel group (None without TP). `global_aux_loss` balances the running average of
    the step's global counts over its micro-batches so far, kept in two buffers that
    `start_step` clears (and that a recomputed forward does not advance: see `recomputing`).
    """

    def __init__(self, config: ModelConfig, dp_group: Optional[dist.ProcessGroup] = None,
                 token_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        moe: MoEConfig = config.moe
        self.moe = moe
        self.dp_group = dp_group
        self.token_group = token_group
        self.token_shards = mappings.group_size(token_group)
        self.weight = nn.Parameter(init.normal_(torch.empty(moe.num_experts, config.hidden_size), init.init_std(config)))
        # Megatron-Core gives the router a bias whenever linear layers have biases, drawn like the weight.
        self.bias = (nn.Parameter(init.normal_(torch.empty(moe.num_experts), init.init_std(config)))
                     if config.add_bias_linear else None)
        if moe.enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(moe.num_experts))
        else:
            self.expert_bias = None
        self.compute_dtype = torch.float64 if moe.router_dtype == "fp64" else torch.float32
        self.register_buffer("step_counts_E", torch.zeros(moe.num_experts), persistent=False)
        self.register_buffer("step_micro_batches", torch.zeros(()), persistent=False)
        self.recomputing = False
        """True while activation recompute re-runs this router's forward (set by the layer)."""

    def forward(self, hidden_TD: torch.Tensor, seq_length: int) -> RouterOutput:
        logits_TE = self.gating(self.jitter(hidden_TD))
        probs_TK, expert_idx_TK = self.route(logits_TE, seq_length)
        with_losses = self.training and torch.is_grad_enabled()
        lb_raw = self.load_balancing_loss(logits_TE, seq_length) if with_losses else logits_TE.new_zeros(())
        return self.finish(logits_TE, probs_TK, expert_idx_TK, lb_raw, seq_length)

    def gating(self, x_TD: torch.Tensor) -> torch.Tensor:
        """logits_TE = x_TD @ W^T (+ b) in the router dtype; with --moe-router-force-load-balancing
        the values are N(0, 1) draws and the gradient passes straight through to the real logits."""
        dtype = self.compute_dtype
        logits_TE = F.linear(x_TD.to(dtype), self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype))
        if self.moe.force_load_balancing:
            logits_TE = logits_TE + (torch.randn_like(logits_TE) - logits_TE).detach()
        return logits_TE

    def route(self, logits_TE: torch.Tensor, seq_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """logits_TE -> probs_TK (combine weights) and expert_idx_TK (the chosen experts)."""
        return self.topk(logits_TE)

    def finish(self, logits_TE: torch.Tensor, probs_TK: torch.Tensor, expert_idx_TK: torch.Tensor,
               lb_raw: torch.Tensor, seq_length: int) -> RouterOutput:
        """Capacity, the z-loss, the coefficient-scaled aux loss and the stats, shared by every
        top-k strategy. `lb_raw` is the balancing loss without its coefficient."""
        moe = self.moe
        T, K = expert_idx_TK.shape
        keep_TK, capacity = None, None
        routed_E = torch.bincount(expert_idx_TK.reshape(-1), minlength=moe.num_experts).float()
        tokens_per_expert_E = routed_E
        if moe.capacity_factor is not None:
            keep_TK, capacity = self.capacity_mask(probs_TK, expert_idx_TK, seq_length)
            probs_TK = probs_TK * keep_TK
            if moe.pad_to_capacity:
                whole_T = T * self.token_shards
                routed_E = torch.full_like(routed_E, min(capacity, whole_T) / self.token_shards)
            else:
                routed_E = torch.bincount(expert_idx_TK[keep_TK], minlength=moe.num_experts).float()

        with_losses = self.training and torch.is_grad_enabled()
        z_raw = (load_balancing.z_loss(logits_TE) / self.token_shards if with_losses and moe.z_loss_coeff is not None
                 else logits_TE.new_zeros(()))
        aux_loss = lb_raw * moe.aux_loss_coeff + z_raw * (moe.z_loss_coeff or 0.0)
        stats = RouterStats(
            tokens_per_expert_E=tokens_per_expert_E.detach(),
            routed_per_expert_E=routed_E.detach(),
            dropped=(T * K - keep_TK.sum()).float() if keep_TK is not None else routed_E.new_zeros(()),
            assignments=routed_E.new_tensor(float(T * K)),
            load_balancing_loss=lb_raw.detach().float(),
            z_loss=z_raw.detach().float(),
            token_entropy=health.token_entropy_stat(aux_loss_scores(logits_TE.detach().float(), moe.score_function)),
        )
        if with_losses:
            self.record(stats)
        return RouterOutput(probs_TK, expert_idx_TK, keep_TK, capacity, aux_loss, stats)

    def whole_micro_batch(self, t_TX: torch.Tensor, seq_length: int) -> torch.Tensor:
        """A per-token tensor of this rank's positions (T = B * s rows) -> the whole micro-batch's
        (B * S rows, in (batch, position) order): all-gathered over the tensor-parallel group.
        Not differentiable; the identity without tensor parallelism."""
        if self.token_shards == 1:
            return t_TX
        B = t_TX.shape[0] // seq_length
        return mappings.all_gather(t_TX.reshape(B, seq_length, -1), self.token_group, 1).reshape(-1, t_TX.shape[1])

    def own_positions(self, t_TX: torch.Tensor, seq_length: int) -> torch.Tensor:
        """Inverse of `whole_micro_batch`: this rank's rows of a whole-micro-batch tensor."""
        n = self.token_shards
        if n == 1:
            return t_TX
        B = t_TX.shape[0] // (n * seq_length)
        return mappings.split_along_dim(t_TX.reshape(B, n * seq_length, -1), self.token_group, 1).reshape(-1, t_TX.shape[1])

    def capacity_mask(self, probs_TK: torch.Tensor, expert_idx_TK: torch.Tensor, seq_length: int
                      ) -> tuple[torch.Tensor, int]:
        """keep_TK and the capacity, decided over the whole micro-batch: under tensor parallelism
        the group's choices are gathered in (batch, position) order, the mask is computed on all
        of them, and this rank keeps its positions."""
        moe, (T, K) = self.moe, expert_idx_TK.shape
        probs_TK = self.whole_micro_batch(probs_TK.detach(), seq_length)
        expert_idx_TK = self.whole_micro_batch(expert_idx_TK, seq_length)
        capacity = expert_capacity(T * self.token_shards, moe.num_experts, K, moe.capacity_factor)
        keep_TK = capacity_keep_mask(probs_TK, expert_idx_TK, moe.num_experts, capacity, moe.token_drop_policy)
        return self.own_positions(keep_TK, seq_length), capacity

    def jitter(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Multiply by uniform noise in [1-eps, 1+eps] while training (Switch Transformer)."""
        eps = self.moe.input_jitter_eps
        if not self.training or not eps:
            return x_TD
        noise = torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        return x_TD * noise

    def topk(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits_TE -> probs_TK (combine weights) and expert_idx_TK (the chosen experts)."""
        moe, K = self.moe, self.moe.router_topk
        if moe.score_function == "softmax":
            if moe.pre_softmax:
                probs_TK, expert_idx_TK = self.select(torch.softmax(logits_TE, dim=-1), K)
            else:
                chosen_TK, expert_idx_TK = self.select(logits_TE, K)
                probs_TK = torch.softmax(chosen_TK, dim=-1)
        else:
            sigmoid_TE = torch.sigmoid(logits_TE)
            biased_TE = sigmoid_TE if self.expert_bias is None else sigmoid_TE + self.expert_bias
            expert_idx_TK = self.select(biased_TE, K)[1]
            chosen_TK = torch.gather(sigmoid_TE, 1, expert_idx_TK)
            probs_TK = chosen_TK / (chosen_TK.sum(dim=-1, keepdim=True) + 1e-20) if K > 1 else chosen_TK
        if moe.topk_scaling_factor:
            probs_TK = probs_TK * moe.topk_scaling_factor
        return probs_TK, expert_idx_TK

    def select(self, scores_TE: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The K best experts of every token: (their scores_TK, expert_idx_TK), best first."""
        return torch.topk(scores_TE, K, dim=-1)

    def load_balancing_loss(self, logits_TE: torch.Tensor, seq_length: int) -> torch.Tensor:
        """The configured balancing loss WITHOUT its coefficient (0 when off)."""
        moe = self.moe
        kind = moe.load_balancing_type
        if kind == "none" or moe.aux_loss_coeff == 0:
            return logits_TE.new_zeros(())
        scores_TE = aux_loss_scores(logits_TE, moe.score_function)
        expert_idx_TK = torch.topk(scores_TE, moe.router_topk, dim=-1).indices  # no expert bias
        if kind == "seq_aux_loss":
            T, E = scores_TE.shape
            B = T // seq_length
            return load_balancing.sequence_aux_loss(
                scores_TE.view(B, seq_length, E), expert_idx_TK.view(B, seq_length, -1), self.token_group)
        counts_E = torch.bincount(expert_idx_TK.reshape(-1), minlength=moe.num_experts).float()
        num_tokens = scores_TE.shape[0]
        if kind == "global_aux_loss":
            counts_E, num_tokens = self.step_average_global_counts(counts_E, num_tokens)
        elif self.token_shards > 1:  # the micro-batch's counts; this rank's share of the loss
            counts_E, num_tokens = mappings.all_reduce(counts_E, self.token_group), num_tokens * self.token_shards
        return load_balancing.switch_aux_loss(scores_TE, counts_E, moe.router_topk, num_tokens)

    def step_average_global_counts(self, counts_E: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, int]:
        """Counts summed over data-parallel ranks, averaged over this step's micro-batches so far
        (Megatron-Core's global aux loss), and the global token count of one micro-batch."""
        if self.dp_group is not None and dist.get_world_size(self.dp_group) > 1:
            counts_E = counts_E.clone()
            dist.all_reduce(counts_E, group=self.dp_group)
            num_tokens *= dist.get_world_size(self.dp_group)
        if not self.recomputing:  # a recomputed forward's micro-batch was counted by the first one
            self.step_counts_E += counts_E
            self.step_micro_batches += 1
        return self.step_counts_E / self.step_micro_batches, num_tokens

    def start_step(self, iteration: Optional[int] = None) -> None:
        super().start_step(iteration)
        self.step_counts_E.zero_()
        self.step_micro_batches.zero_()

    @torch.no_grad()
    def update_expert_bias(self, routed_per_expert_E: torch.Tensor) -> None:
        """Aux-loss-free balancing: bias_e += rate * sign(mean(c) - c_e)."""
        if self.expert_bias is None:
            return
        c = routed_per_expert_E.float().to(self.expert_bias.device)
        self.expert_bias += self.moe.bias_update_rate * torch.sign(c.mean() - c)


class GroupLimitedRouter(TopKRouter):
    """Group-limited top-k (Megatron-Core's `--moe-router-num-groups G --moe-router-group-topk g`,
    DeepSeek-V2/V3's device- and node-limited routing).

    The E experts form G groups of E/G consecutive ids. On the scores the top-k runs on
    (softmax or logits, sigmoid + expert bias; see `TopKRouter.topk`):

        group_score_tG = sum of the top (K // g) scores_te of group G's experts
        keep the g best groups of every token, then the top K experts among their experts

    so every token's experts lie in at most g groups (with G = EP: on at most g EP ranks).
    Everything else (weights, capacity, aux losses from an unrestricted top-k) is TopKRouter's.
    """

    def select(self, scores_TE: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
        G, g = self.moe.num_groups, self.moe.group_topk
        T, E = scores_TE.shape
        group_score_TG = scores_TE.view(T, G, E // G).topk(K // g, dim=-1).values.sum(dim=-1)
        best_groups_Tg = torch.topk(group_score_TG, g, dim=-1).indices
        group_mask_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter(1, best_groups_Tg, True)
        expert_mask_TE = group_mask_TG.repeat_interleave(E // G, dim=1)
        return torch.topk(scores_TE.masked_fill(~expert_mask_TE, float("-inf")), K, dim=-1)


class SinkhornRouter(TopKRouter):
    """Sinkhorn routing (`--moe-router-load-balancing-type sinkhorn`, Megatron-Core's semantics).

    While training, the experts of each token are the top-k of the Sinkhorn-balanced scores
    (`load_balancing.sinkhorn` of the micro-batch's logits, no gradient), so the micro-batch's
    tokens spread evenly over the experts without an aux loss; in evaluation, the top-k of the
    activation. The combine weights are the activation of the raw logits at the chosen experts:

        activation = sigmoid(logits_TE) when K = 1, softmax over all E when K > 1
        probs_TK   = activation at expert_idx_TK (no renormalisation, no scaling factor)

    There is no balancing loss (the z-loss and capacity still apply). Under tensor parallelism
    the balancing runs over the whole micro-batch, as in one process: the ranks' logits are
    gathered (small), and each keeps its shard of the choices.
    """

    def route(self, logits_TE: torch.Tensor, seq_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        K = self.moe.router_topk
        activation_TE = torch.sigmoid(logits_TE) if K == 1 else torch.softmax(logits_TE, dim=-1)
        if self.training:
            with torch.no_grad():
                expert_idx_TK = self.balanced_topk(logits_TE.detach(), seq_length)
        else:
            expert_idx_TK = torch.topk(activation_TE, K, dim=-1).indices
        return torch.gather(activation_TE, 1, expert_idx_TK), expert_idx_TK

    def balanced_topk(self, logits_TE: torch.Tensor, seq_length: int) -> torch.Tensor:
        """Top-k of sinkhorn(logits) over the whole micro-batch (in fp32 at least)."""
        logits_TE = self.whole_micro_batch(logits_TE, seq_length)
        balanced_TE = load_balancing.sinkhorn(logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32)))
        return self.own_positions(torch.topk(balanced_TE, self.moe.router_topk, dim=1).indices, seq_length)


class NoisyTopKRouter(TopKRouter):
    """Noisy top-k gating (Shazeer et al. 2017, `--moe-router-type noisy_topk`).

        clean_TE   = x_TD @ W^T (+ b)                     (`router.weight`, as TopKRouter's)
        noise_std  = softplus(x_TD @ W_noise^T)           (`router.noise_weight`, zero-initialised:
                                                           the noise starts at std ln 2)
        H_TE       = clean_TE + N(0, 1) * noise_std       (while training; clean_TE in evaluation)
        expert_idx_TK = top-k of H_TE, probs_TK = softmax over the k chosen H values
        Importance_e = sum_t probs of e,    Load_e = sum_t Phi((clean_te - kth_excluding(H_t, k, e)) / noise_std_te)
        loss       = CV(Importance)^2 + CV(Load)^2        (times --moe-aux-loss-coeff; see
                                                           `load_balancing.noisy_topk_load`)

    Importance and Load are sums over the micro-batch; under tensor parallelism they are summed
    over the ranks' shards and each rank's loss is its 1/T share of the value with the gradient
    of its own tokens (so the shares and their gradients sum to one process's).

    The noise must be the same for the same token whatever the parallelism, so it is drawn
    from a generator keyed by (a seed drawn when the layer is built, the step, the micro-batch's
    index in the global batch = local index * DP + DP rank, as the data sampler deals them out)
    for the whole micro-batch, and each tensor-parallel rank takes its sequence shard. A
    recomputed forward (activation recompute) redraws the noise of the forward it repeats (its
    key is kept in the recompute context, see `replay_state`). The step is the training loop's
    iteration, so a run resumed from a checkpoint draws the noise of the uninterrupted run.
    """

    def __init__(self, config: ModelConfig, dp_group: Optional[dist.ProcessGroup] = None,
                 token_group: Optional[dist.ProcessGroup] = None, data_group: Optional[dist.ProcessGroup] = None):
        super().__init__(config, dp_group, token_group)
        self.noise_weight = nn.Parameter(torch.zeros(self.moe.num_experts, config.hidden_size))
        self.noise_seed = int(torch.randint(0, 2 ** 31 - 1, (), device="cpu"))  # the layer's seeded CPU stream (also when built on meta)
        self.data_ranks, self.data_rank = mappings.group_size(data_group), mappings.group_rank(data_group)
        self.steps, self.forwards = -1, 0

    def start_step(self, iteration: Optional[int] = None) -> None:
        super().start_step(iteration)
        self.steps, self.forwards = (self.steps + 1 if iteration is None else iteration), 0

    def replay_state(self) -> tuple[int, int]:
        return self.steps, self.forwards

    def forward(self, hidden_TD: torch.Tensor, seq_length: int) -> RouterOutput:
        moe, K = self.moe, self.moe.router_topk
        x_TD = self.jitter(hidden_TD)
        clean_TE = self.gating(x_TD)
        noise_std_TE = F.softplus(F.linear(x_TD.to(self.compute_dtype), self.noise_weight.to(self.compute_dtype)))
        noisy_TE = clean_TE + self.noise(clean_TE, seq_length) * noise_std_TE if self.training else clean_TE
        chosen_TK, expert_idx_TK = torch.topk(noisy_TE, K, dim=-1)
        probs_TK = torch.softmax(chosen_TK, dim=-1)
        with_losses = self.training and torch.is_grad_enabled()
        if with_losses and moe.load_balancing_type != "none" and moe.aux_loss_coeff != 0:
            importance_E = torch.zeros_like(clean_TE).scatter(1, expert_idx_TK, probs_TK).sum(dim=0)
            load_E = load_balancing.noisy_topk_load(clean_TE, noisy_TE, noise_std_TE, K)
            lb_raw = self.share(load_balancing.cv_squared, importance_E) + self.share(load_balancing.cv_squared, load_E)
        else:
            lb_raw = clean_TE.new_zeros(())
        return self.finish(clean_TE, probs_TK, expert_idx_TK, lb_raw, seq_length)

    def noise(self, like_TE: torch.Tensor, seq_length: int) -> torch.Tensor:
        """N(0, 1) of this micro-batch's tokens, the same whatever the parallelism (class docstring)."""
        if self.recomputing and self.replayed_state is not None:
            step, index = self.replayed_state
        else:
            step, index = self.steps, self.forwards
            self.forwards += 1
        micro_batch = index * self.data_ranks + self.data_rank
        key = ((self.noise_seed * 1_000_003 + max(step, 0)) * 1_000_003 + micro_batch) % (2 ** 63 - 1)
        gen = torch.Generator(device=like_TE.device).manual_seed(key)
        T, E = like_TE.shape
        noise_NE = torch.randn(T * self.token_shards, E, generator=gen, device=like_TE.device, dtype=like_TE.dtype)
        return self.own_positions(noise_NE, seq_length)

    def share(self, loss_fn, local_E: torch.Tensor) -> torch.Tensor:
        """loss_fn of the micro-batch's total (summed over the tensor-parallel shards): this rank's
        1/T share of the value, with the gradient through this rank's own terms."""
        if self.token_shards == 1:
            return loss_fn(local_E)
        total_E = local_E + (mappings.all_reduce(local_E.detach(), self.token_group) - local_E.detach())
        loss = loss_fn(total_E)
        return loss + (loss.detach() / self.token_shards - loss.detach())


class ExpertChoiceRouter(TopKRouter):
    """Expert-choice routing (Zhou et al. 2022, `--moe-router-type expert_choice`).

        logits_TE = x_TD @ W^T (+ b)                      (`router.weight`, as TopKRouter's)
        gates_TE  = softmax over the E experts of logits_TE
        C         = min(T, ceil(T * K / E * c))           (`expert_capacity`, T = the micro-batch's
                                                            tokens, K = --moe-router-topk, the
                                                            average experts a token,
                                                            c = --moe-expert-capacity-factor)
        expert e takes the C tokens with the highest gates_te (ties: the earlier token)
        out_t     = sum over the experts e that took t of gates_te * expert_e(x_t)

    Zhou et al. write the capacity k * T / E * c' with their own factor; here c is Megatron's
    capacity factor and K the average experts per token, the same formula as top-k capacity.
    Every expert processes exactly C tokens, so there is no balancing loss (the z-loss may
    apply); a token may be picked by several experts or by none (then only the residual carries
    it; `RouterStats.dropped` counts these tokens). Evaluation routes the same way, so a
    token's experts depend on the other tokens of its micro-batch, later positions included
    (as in the paper).

    The output is an assignment table of width E: expert_idx_TE[t, e] = e, keep_TE[t, e] =
    whether expert e picked t, probs_TE = gates_te where picked (else 0); the dispatchers and
    experts take it as K = E assignments a token, most of them dropped. This costs O(T * E)
    index work and a [T, E, D] buffer in `unpermute`: fine for tens of experts, a compact table
    (K' = the most experts any token got) would be better for many experts.

    Under tensor parallelism the selection is over the whole micro-batch: each rank gathers
    the group's gates (T x E floats, no gradient), selects, and keeps its shard of the mask.
    Under expert and data parallelism each rank routes its own micro-batches, as in one process.
    """

    def forward(self, hidden_TD: torch.Tensor, seq_length: int) -> RouterOutput:
        moe, E = self.moe, self.moe.num_experts
        logits_TE = self.gating(self.jitter(hidden_TD))
        gates_TE = torch.softmax(logits_TE, dim=-1)
        T = logits_TE.shape[0]
        keep_TE, capacity = self.choose(gates_TE.detach(), seq_length)
        probs_TE = gates_TE * keep_TE
        expert_idx_TE = torch.arange(E, device=logits_TE.device).expand(T, E).contiguous()
        routed_E = keep_TE.sum(0).float()
        with_losses = self.training and torch.is_grad_enabled()
        z_raw = (load_balancing.z_loss(logits_TE) / self.token_shards if with_losses and moe.z_loss_coeff is not None
                 else logits_TE.new_zeros(()))
        aux_loss = z_raw * (moe.z_loss_coeff or 0.0)
        stats = RouterStats(
            tokens_per_expert_E=routed_E,
            routed_per_expert_E=routed_E.clone(),
            dropped=(~keep_TE.any(dim=1)).sum().float(),
            assignments=routed_E.new_tensor(float(T)),
            load_balancing_loss=routed_E.new_zeros(()),
            z_loss=z_raw.detach().float(),
            token_entropy=health.token_entropy_stat(gates_TE.detach().float()),
        )
        if with_losses:
            self.record(stats)
        return RouterOutput(probs_TE, expert_idx_TE, keep_TE, capacity, aux_loss, stats)

    def choose(self, gates_TE: torch.Tensor, seq_length: int) -> tuple[torch.Tensor, int]:
        """keep_TE (expert e picked token t) and the capacity C, decided over the whole
        micro-batch (under tensor parallelism: on the group's gathered gates, in (batch, position)
        order, this rank keeping its positions)."""
        moe, E = self.moe, gates_TE.shape[1]
        gates_TE = self.whole_micro_batch(gates_TE, seq_length)
        whole_T = gates_TE.shape[0]
        capacity = min(whole_T, expert_capacity(whole_T, E, moe.router_topk, moe.capacity_factor))
        chosen_EC = torch.argsort(gates_TE.t(), dim=1, descending=True, stable=True)[:, :capacity]
        keep_ET = torch.zeros(E, whole_T, dtype=torch.bool, device=gates_TE.device).scatter_(1, chosen_EC, True)
        return self.own_positions(keep_ET.t(), seq_length).contiguous(), capacity


def build_router(config: ModelConfig, dp_group: Optional[dist.ProcessGroup] = None,
                 token_group: Optional[dist.ProcessGroup] = None,
                 data_group: Optional[dist.ProcessGroup] = None) -> Router:
    """The routing strategy the config asks for (see the module docstring).

    dp_group: the ranks whose counts the global aux loss sums; token_group: the tensor-parallel
    group (ranks holding shards of the same sequences); data_group: the data-parallel group
    proper (its rank is where this rank's micro-batches sit in the global batch)."""
    moe = config.moe
    if moe.router_type == "noisy_topk":
        return NoisyTopKRouter(config, dp_group, token_group, data_group)
    if moe.router_type == "expert_choice":
        return ExpertChoiceRouter(config, dp_group, token_group)
    if moe.router_type != "topk":
        raise ValueError(f"--moe-router-type {moe.router_type} is not implemented yet")
    if moe.load_balancing_type == "sinkhorn":
        return SinkhornRouter(config, dp_group, token_group)
    if moe.group_topk is not None:
        return GroupLimitedRouter(config, dp_group, token_group)
    return TopKRouter(config, dp_group, token_group)
