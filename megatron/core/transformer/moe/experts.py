"""Grouped experts: every local expert's FFN in one grouped matrix multiply.

Tokens arrive sorted by expert (`x_ND`, N = routed rows) with `tokens_per_expert_E` counts.
Weights are stacked: `weight1` [E, D, F'] (F' = 2F for SwiGLU, gate half first) and `weight2`
[E, F, D]. `grouped_gemm` runs them through `torch.nn.functional.grouped_mm` where that kernel
works forward and backward for the device, dtype and alignment, and otherwise through a padded
batched matmul that computes the same function. `per_expert_loop` is the reference that tests
and benchmarks compare against; training never uses it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.config import ModelConfig
from megatron.core.transformer import init
from megatron.core.transformer.mlp import activation


@functools.lru_cache(maxsize=None)
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Probe once per (device, dtype) whether grouped_mm runs forward and backward correctly.

    The probe has its own autograd graph: gradients on even under `no_grad` (evaluation), and
    identity saved-tensor hooks so that an enclosing activation checkpoint does not count its
    tensors (the recompute, which finds the answer cached, would save fewer)."""
    if not hasattr(F, "grouped_mm"):
        return False
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        return _probe_grouped_mm(device_type, dtype)


def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(24, 16, generator=gen).to(device_type, dtype).requires_grad_()
        w = torch.randn(3, 16, 16, generator=gen).to(device_type, dtype).requires_grad_()
        offs = torch.tensor([8, 8, 24], dtype=torch.int32, device=device_type)  # empty middle expert
        y = F.grouped_mm(x, w, offs=offs)
        y.backward(torch.ones_like(y))
        ref = torch.cat([x[:8] @ w[0], x[8:24] @ w[2]])
        tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
        return bool(torch.allclose(y.float(), ref.float(), atol=tol, rtol=tol)) and w.grad is not None
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _aligned(t: torch.Tensor) -> bool:
    """grouped_mm needs every non-unit stride to be a multiple of 16 bytes."""
    return all((s * t.element_size()) % 16 == 0 for s, n in zip(t.stride(), t.shape) if s != 1 and n > 1) \
        and t.data_ptr() % 16 == 0


def grouped_gemm(x_ND: torch.Tensor, w_EDF: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """y_NF[rows of expert e] = x_ND[rows of expert e] @ w_EDF[e]; rows are grouped by expert.

    `tokens_per_expert_E` (on x's device) must sum to N. Differentiable in x and w, which
    share a dtype.
    """
    x_ND = x_ND.contiguous()
    if _grouped_mm_works(x_ND.device.type, x_ND.dtype) and _aligned(x_ND) and _aligned(w_EDF):
        offsets_E = torch.cumsum(tokens_per_expert_E, 0, dtype=torch.int32)
        return F.grouped_mm(x_ND, w_EDF, offs=offsets_E)
    return _padded_bmm(x_ND, w_EDF, tokens_per_expert_E)


def _padded_bmm(x_ND: torch.Tensor, w_EDF: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Fallback: scatter rows into [E, max_tokens, D], one bmm, gather rows back."""
    E = w_EDF.shape[0]
    N = x_ND.shape[0]
    counts = tokens_per_expert_E.to(torch.long)
    capacity = int(counts.max().item()) if N else 0
    expert_of_row_N = torch.repeat_interleave(torch.arange(E, device=x_ND.device), counts, output_size=N)
    starts_E = torch.cumsum(counts, 0) - counts
    slot_N = expert_of_row_N * capacity + (torch.arange(N, device=x_ND.device) - starts_E[expert_of_row_N])
    x_ECD = x_ND.new_zeros(E * capacity, x_ND.shape[1]).index_copy(0, slot_N, x_ND).view(E, capacity, -1)
    y_ECF = torch.bmm(x_ECD, w_EDF)
    return y_ECF.reshape(E * capacity, -1).index_select(0, slot_N)


class GroupedExperts(nn.Module):
    """`num_local_experts` FFNs applied to expert-sorted rows: x_ND -> y_ND."""

    def __init__(self, config: ModelConfig, num_local_experts: int, expert_offset: int = 0):
        super().__init__()
        moe = config.moe
        D, F_ = config.hidden_size, moe.ffn_hidden_size
        fc1_out = 2 * F_ if config.swiglu else F_
        E = num_local_experts
        self.num_local_experts = E
        self.weight1 = nn.Parameter(torch.empty(E, D, fc1_out))
        self.weight2 = nn.Parameter(torch.empty(E, F_, D))
        self._init_weights(expert_offset, init.init_std(config), init.output_init_std(config))
        if config.add_bias_linear:
            self.bias1 = nn.Parameter(torch.zeros(E, fc1_out))
            self.bias2 = nn.Parameter(torch.zeros(E, D))
        else:
            self.bias1 = self.bias2 = None
        self.act = activation(config)

    @torch.no_grad()
    def _init_weights(self, expert_offset: int, std: float, out_std: float) -> None:
        """Expert e's weights come from its own generator seeded by (one global draw, e), so
        every expert starts the same whatever the expert-parallel layout."""
        base_seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())  # same draw on every device
        device = self.weight1.device
        if device.type == "meta":
            return
        for local in range(self.num_local_experts):
            e = expert_offset + local
            gen = torch.Generator(device=device).manual_seed(base_seed + 2 * e)
            self.weight1[local].normal_(0.0, std, generator=gen)
            gen = torch.Generator(device=device).manual_seed(base_seed + 2 * e + 1)
            self.weight2[local].normal_(0.0, out_std, generator=gen)

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        h_NF = grouped_gemm(x_ND, self.weight1, tokens_per_expert_E)
        expert_of_row_N = None
        if self.bias1 is not None:
            expert_of_row_N = torch.repeat_interleave(
                torch.arange(self.num_local_experts, device=x_ND.device), tokens_per_expert_E, output_size=x_ND.shape[0])
            h_NF = h_NF + self.bias1[expert_of_row_N]
        y_ND = grouped_gemm(self.act(h_NF), self.weight2, tokens_per_expert_E)
        if self.bias2 is not None:
            y_ND = y_ND + self.bias2[expert_of_row_N]
        return y_ND


def per_expert_loop(experts: GroupedExperts, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Reference: the same experts, one plain matmul pair per expert (tests and benchmarks only)."""
    outputs, start = [], 0
    for e, n in enumerate(tokens_per_expert_E.tolist()):
        x = x_ND[start:start + n]
        h = x @ experts.weight1[e]
        if experts.bias1 is not None:
            h = h + experts.bias1[e]
        y = experts.act(h) @ experts.weight2[e]
        if experts.bias2 is not None:
            y = y + experts.bias2[e]
        outputs.append(y)
        start += n
    return torch.cat(outputs) if outputs else x_ND.new_zeros(0, experts.weight2.shape[-1])
