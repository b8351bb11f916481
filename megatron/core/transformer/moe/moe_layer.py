"""The MoE feed-forward layer: router -> dispatch -> grouped experts -> combine (+ shared expert).

    hidden_BSD -> router -> probs_TK, expert_idx_TK, keep_TK (+ aux losses)
               -> dispatcher.dispatch -> x_ND grouped by local expert
               -> GroupedExperts -> y_ND
               -> dispatcher.combine -> out_TD (probability-weighted sum over K)
               (+ shared expert on every token)

Under tensor parallelism every rank routes its own sequence shard (T = B*s tokens): with
sequence parallelism that is the layer's input; without it, the layer takes its shard of the
replicated input and all-gathers the output (Megatron-LM refuses this combination for speed;
here it runs, with the same numbers). The shared expert is a tensor-parallel dense MLP. With
expert tensor parallelism (ETP > 1, by default ETP = T) the routed experts' FFN width is split
over the ETP group; the dispatcher gathers the group's routed rows and sums the partial outputs.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron.core.config import ModelConfig
from megatron.core.parallel_state import ProcessGroups
from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel.context import TensorParallel
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import GroupedExperts
from megatron.core.transformer.moe.router import RouterOutput, build_router
from megatron.core.transformer.moe.token_dispatcher import build_dispatcher


class AuxLossGradient(torch.autograd.Function):
    """Identity on `x`; in backward, also gives `aux_loss` the gradient `scale`.

    This is how the auxiliary losses reach the router weights without being added to the loss
    the loop backpropagates: the gradient enters inside the layer's own backward, so it works
    the same under gradient accumulation and every pipeline schedule (the stage's forward
    returns only its activations).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_shape = aux_loss.shape
        ctx.aux_dtype = aux_loss.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor):
        grad_aux = torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad_x.device)
        return grad_x, grad_aux, None


class MoELayer(nn.Module):
    """hidden_BSD -> (output_BSD, RouterOutput). Module names follow Megatron-Core
    (`router`, `experts`, `shared_experts`) so state-dict keys line up with its checkpoints.

    The dispatcher takes the expert groups (`groups.ep`, `groups.etp`), the experts the
    expert-tensor-parallel group they split their FFN width over; the router the
    tensor-parallel group whose ranks hold shards of the same sequences, and the stage's ranks
    for the global aux loss.
    """

    def __init__(self, config: ModelConfig, groups: Optional[ProcessGroups] = None,
                 tp: TensorParallel = TensorParallel()):
        super().__init__()
        groups = groups or ProcessGroups()
        moe = config.moe
        self.tp = tp
        self.router = build_router(config, groups.tp_dp if tp.enabled else groups.dp, tp.group, groups.dp)
        tp.tag_replicated(self.router.parameters(), partial_grads=True)  # it sees this rank's tokens only
        self.dispatcher = build_dispatcher(moe, groups.ep, groups.etp)
        self.experts = GroupedExperts(config, self.dispatcher.num_local_experts, self.dispatcher.local_expert_offset,
                                      groups.etp)
        self.shared_experts = (
            MLP(config, moe.shared_expert_ffn_hidden_size, tp) if moe.shared_expert_ffn_hidden_size else None
        )

    def forward(self, hidden_BSD: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        own_shard = self.tp.enabled and not self.tp.shards_sequence
        hidden_BsD = self.tp.scatter_sequence(hidden_BSD) if own_shard else hidden_BSD
        B, s, D = hidden_BsD.shape
        hidden_TD = hidden_BsD.reshape(B * s, D)
        routing = self.router(hidden_TD, seq_length=s)
        x_ND, tokens_per_expert_L, state = self.dispatcher.dispatch(hidden_TD, routing)
        y_ND = self.experts(x_ND, tokens_per_expert_L)
        out_TD = self.dispatcher.combine(y_ND, state)
        if routing.aux_loss.requires_grad:
            out_TD = AuxLossGradient.apply(out_TD, routing.aux_loss, self.router.aux_loss_grad_scale)
        out_BsD = out_TD.view(B, s, D).to(hidden_BSD.dtype)
        out_BSD = mappings.gather_replicated(out_BsD, self.tp.group) if own_shard else out_BsD
        if self.shared_experts is not None:
            out_BSD = out_BSD + self.shared_experts(hidden_BSD)
        return out_BSD, routing
