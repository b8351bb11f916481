"""The MoE feed-forward layer: router -> dispatch -> grouped experts -> combine (+ shared expert).

    hidden_BSD -> TopKRouter -> probs_TK, expert_idx_TK (+ aux losses)
               -> dispatcher.dispatch -> x_ND grouped by local expert
               -> GroupedExperts -> y_ND
               -> dispatcher.combine -> out_TD (probability-weighted sum over K)
               (+ shared expert on every token)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron.core.config import ModelConfig
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

    `ep_group` is handed to the dispatcher only; `dp_group` to the router (global aux loss).
    """

    def __init__(self, config: ModelConfig, ep_group: Optional[dist.ProcessGroup] = None,
                 dp_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        moe = config.moe
        self.router = build_router(config, dp_group)
        self.dispatcher = build_dispatcher(moe, ep_group)
        self.experts = GroupedExperts(config, self.dispatcher.num_local_experts, self.dispatcher.local_expert_offset)
        self.shared_experts = (
            MLP(config, moe.shared_expert_ffn_hidden_size) if moe.shared_expert_ffn_hidden_size else None
        )

    def forward(self, hidden_BSD: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        B, S, D = hidden_BSD.shape
        hidden_TD = hidden_BSD.reshape(B * S, D)
        routing = self.router(hidden_TD, seq_length=S)
        x_ND, tokens_per_expert_L, state = self.dispatcher.dispatch(hidden_TD, routing)
        y_ND = self.experts(x_ND, tokens_per_expert_L)
        out_TD = self.dispatcher.combine(y_ND, state)
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(hidden_TD)
        if routing.aux_loss.requires_grad:
            out_TD = AuxLossGradient.apply(out_TD, routing.aux_loss, self.router.aux_loss_grad_scale)
        return out_TD.view(B, S, D).to(hidden_BSD.dtype), routing
