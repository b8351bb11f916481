"""Causal self-attention with grouped-query attention (GQA) on `F.scaled_dot_product_attention`.

The fused QKV projection uses Megatron-Core's layout: output features are grouped by key/value
group, and within a group come the group's H/G query heads, then its key head, then its value
head, each `head_dim` wide. That keeps checkpoints interchangeable with Megatron-LM.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.config import ModelConfig
from megatron.core.transformer import init
from megatron.core.transformer.norm import build_norm
from megatron.core.transformer.rope import apply_rotary


class SelfAttention(nn.Module):
    """x_BSD -> attention output_BSD (before the residual add and hidden dropout).

    Shapes: B batch, S sequence, D hidden, H query heads, G key/value groups, d head dim.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_groups = config.num_query_groups
        self.head_dim = config.kv_channels
        self.dropout = config.attention_dropout
        qkv_out = (self.num_heads + 2 * self.num_groups) * self.head_dim
        self.linear_qkv = init.linear(config.hidden_size, qkv_out, config.qkv_bias, init.init_std(config))
        self.linear_proj = init.linear(self.num_heads * self.head_dim, config.hidden_size,
                                       config.add_bias_linear, init.output_init_std(config))
        self.q_layernorm = build_norm(config, self.head_dim) if config.qk_layernorm else None
        self.k_layernorm = build_norm(config, self.head_dim) if config.qk_layernorm else None

    def split_qkv(self, qkv_BSX: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused projection output -> q_BSHd, k_BSGd, v_BSGd."""
        B, S, _ = qkv_BSX.shape
        q_per_group = self.num_heads // self.num_groups
        qkv = qkv_BSX.view(B, S, self.num_groups, q_per_group + 2, self.head_dim)
        q, k, v = qkv.split([q_per_group, 1, 1], dim=3)
        return q.reshape(B, S, self.num_heads, self.head_dim), k.squeeze(3), v.squeeze(3)

    def forward(self, x_BSD: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q_BSHd, k_BSGd, v_BSGd = self.split_qkv(self.linear_qkv(x_BSD))
        if self.q_layernorm is not None:
            q_BSHd, k_BSGd = self.q_layernorm(q_BSHd), self.k_layernorm(k_BSGd)
        q, k, v = q_BSHd.transpose(1, 2), k_BSGd.transpose(1, 2), v_BSGd.transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out_BHSd = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_groups != self.num_heads,
        )
        out_BSX = out_BHSd.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim)
        return self.linear_proj(out_BSX)
