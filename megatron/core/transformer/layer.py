"""One pre-norm transformer layer and the stack of them (Megatron-Core module names).

    x = x + dropout(self_attention(input_layernorm(x)))
    x = x + dropout(mlp(pre_mlp_layernorm(x)))          # mlp: dense MLP or MoELayer
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron.core.config import ModelConfig
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import RouterOutput
from megatron.core.transformer.norm import build_norm


def _recompute(fn, *args):
    return checkpoint(fn, *args, use_reentrant=False)


class TransformerLayer(nn.Module):
    """x_BSD -> (x_BSD, RouterOutput or None).

    recompute: None, "full" (recompute the whole layer in backward), "selective" (only the
    attention core) or "moe" (only the MoE FFN).
    """

    def __init__(self, config: ModelConfig, layer_number: int, ep_group=None, dp_group=None,
                 recompute: Optional[str] = None):
        super().__init__()
        self.layer_number = layer_number
        self.is_moe = config.moe is not None and config.moe.is_moe_layer(layer_number)
        self.recompute = recompute
        self.hidden_dropout = config.hidden_dropout
        self.input_layernorm = build_norm(config)
        self.self_attention = SelfAttention(config)
        self.pre_mlp_layernorm = build_norm(config)
        self.mlp = MoELayer(config, ep_group, dp_group) if self.is_moe else MLP(config, config.ffn_hidden_size)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.hidden_dropout, self.training) if self.hidden_dropout else x

    def _attention(self, x_BSD, rope):
        return self._dropout(self.self_attention(self.input_layernorm(x_BSD), rope))

    def _ffn(self, x_BSD):
        out = self.mlp(self.pre_mlp_layernorm(x_BSD))
        out, routing = out if self.is_moe else (out, None)
        return self._dropout(out), routing

    def _forward(self, x_BSD, rope):
        if self.recompute == "selective":
            x_BSD = x_BSD + _recompute(self._attention, x_BSD, rope)
        else:
            x_BSD = x_BSD + self._attention(x_BSD, rope)
        if self.recompute == "moe" and self.is_moe:
            out, routing = _recompute(self._ffn, x_BSD)
        else:
            out, routing = self._ffn(x_BSD)
        return x_BSD + out, routing

    def forward(self, x_BSD: torch.Tensor, rope=None) -> tuple[torch.Tensor, Optional[RouterOutput]]:
        if self.recompute == "full" and self.training:
            return _recompute(self._forward, x_BSD, rope)
        return self._forward(x_BSD, rope)


class TransformerBlock(nn.Module):
    """The layer stack and the final norm: x_BSD -> (x_BSD, [RouterOutput per MoE layer])."""

    def __init__(self, config: ModelConfig, ep_group=None, dp_group=None, recompute_layers: Optional[list] = None):
        super().__init__()
        recompute_layers = recompute_layers or [None] * config.num_layers
        self.layers = nn.ModuleList(
            TransformerLayer(config, i, ep_group, dp_group, recompute_layers[i]) for i in range(config.num_layers)
        )
        self.final_layernorm = build_norm(config)

    def forward(self, x_BSD: torch.Tensor, rope=None) -> tuple[torch.Tensor, list[RouterOutput]]:
        routings = []
        for layer in self.layers:
            x_BSD, routing = layer(x_BSD, rope)
            if routing is not None:
                routings.append(routing)
        return self.final_layernorm(x_BSD), routings
