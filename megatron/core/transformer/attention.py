"""Causal self-attention with grouped-query attention (GQA) on `F.scaled_dot_product_attention`.

The fused QKV projection uses Megatron-Core's layout: output features are grouped by key/value
group, and within a group come the group's H/G query heads, then its key head, then its value
head, each `head_dim` wide. That keeps checkpoints interchangeable with Megatron-LM.

Under tensor parallelism (T ranks) each rank holds G / T whole key/value groups: a contiguous
block of the QKV rows (column-parallel) and the matching H / T heads' columns of the output
projection (row-parallel), so attention itself needs no communication.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.config import ModelConfig
from megatron.core.tensor_parallel import split_qkv
from megatron.core.tensor_parallel.context import TensorParallel
from megatron.core.transformer import init
from megatron.core.transformer.norm import build_norm
from megatron.core.transformer.rope import apply_rotary


class SelfAttention(nn.Module):
    """x_BSD -> attention output_BSD (before the residual add and hidden dropout); x_BsD -> x_BsD
    under sequence parallelism.

    Shapes: B batch, S sequence, D hidden, H query heads, G key/value groups, d head dim; this
    rank computes H / T heads of G / T groups.
    """

    def __init__(self, config: ModelConfig, tp: TensorParallel = TensorParallel()):
        super().__init__()
        H, G = config.num_attention_heads, config.num_query_groups
        self.tp = tp
        self.num_heads, self.num_groups = H // tp.size, G // tp.size
        self.head_dim = config.kv_channels
        self.dropout = config.attention_dropout
        qkv_out = (H + 2 * G) * self.head_dim
        self.linear_qkv = tp.column(init.linear(config.hidden_size, qkv_out, config.qkv_bias, init.init_std(config)),
                                    split=split_qkv(G))
        self.linear_proj = tp.row(init.linear(H * self.head_dim, config.hidden_size, config.add_bias_linear,
                                              init.output_init_std(config)))
        self.q_layernorm = build_norm(config, self.head_dim) if config.qk_layernorm else None
        self.k_layernorm = build_norm(config, self.head_dim) if config.qk_layernorm else None
        if config.qk_layernorm:  # replicated, applied to this rank's heads only: partial gradients
            tp.tag_replicated([*self.q_layernorm.parameters(), *self.k_layernorm.parameters()], partial_grads=True)

    def split_qkv(self, qkv_BSX: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused projection output -> q_BSHd, k_BSGd, v_BSGd."""
        B, S, _ = qkv_BSX.shape
        q_per_group = self.num_heads // self.num_groups
        qkv = qkv_BSX.view(B, S, self.num_groups, q_per_group + 2, self.head_dim)
        q, k, v = qkv.split([q_per_group, 1, 1], dim=3)
        return q.reshape(B, S, self.num_heads, self.head_dim), k.squeeze(3), v.squeeze(3)

    def forward(self, x_BSD: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        qkv_BSX = self.linear_qkv(x_BSD)  # the whole sequence, also under sequence parallelism
        B, S, _ = qkv_BSX.shape
        q_BSHd, k_BSGd, v_BSGd = self.split_qkv(qkv_BSX)
        if self.q_layernorm is not None:
            q_BSHd, k_BSGd = self.q_layernorm(q_BSHd), self.k_layernorm(k_BSGd)
        q, k, v = q_BSHd.transpose(1, 2), k_BSGd.transpose(1, 2), v_BSGd.transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        with self.tp.dropout_rng():  # this rank's heads: its own dropout stream
            out_BHSd = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.num_groups != self.num_heads,
            )
        out_BSX = out_BHSd.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim)
        return self.linear_proj(out_BSX)
