"""Grouped experts: every local expert's FFN in one grouped matrix multiply.

Tokens arrive sorted by expert (`x_ND`, N = routed rows) with `tokens_per_expert_E` counts.
Weights are stacked: `weight1` [E, D, F'] (F' = 2F for SwiGLU, gate half first) and `weight2`
[E, F, D] (under expert tensor parallelism, this rank's slices of F: see `GroupedExperts`).
`grouped_gemm` runs them through `torch.nn.functional.grouped_mm` where that kernel works
forward and backward for the device, dtype and alignment, and otherwise through a padded
batched matmul that computes the same function. `per_expert_loop` is the reference that tests
and benchmarks compare against; training never uses it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.config import ModelConfig
from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel.sharding import tensor_split
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
    """`num_local_experts` FFNs applied to expert-sorted rows: x_ND -> y_ND.

    With expert tensor parallelism (`etp_group` of size ETP > 1) each rank holds a slice f = F / ETP
    of every local expert's FFN width, split as `tensor_parallel.sharding` says: `weight1`
    [L, D, 2f] (SwiGLU: this rank's gate slice, then its up slice, so the activation needs no
    communication), `bias1` [L, 2f], `weight2` [L, f, D]; `bias2` [L, D] is whole. The output
    is then this rank's partial sum, which the dispatcher sums over the ETP group; `bias2` is
    added once, by ETP rank 0 (`_BiasAddedByRankZero`).
    """

    def __init__(self, config: ModelConfig, num_local_experts: int, expert_offset: int = 0, etp_group=None):
        super().__init__()
        moe = config.moe
        self.etp_rank, self.etp_size = mappings.group_rank(etp_group), mappings.group_size(etp_group)
        self.swiglu = config.swiglu
        D, F_ = config.hidden_size, moe.ffn_hidden_size
        fc1_out = 2 * F_ if config.swiglu else F_
        E = num_local_experts
        self.num_local_experts = E
        self.weight1 = nn.Parameter(torch.empty(E, D, fc1_out // self.etp_size))
        self.weight2 = nn.Parameter(torch.empty(E, F_ // self.etp_size, D))
        self._init_weights(expert_offset, init.init_std(config), init.output_init_std(config), D, F_, fc1_out)
        if config.add_bias_linear:
            self.bias1 = nn.Parameter(torch.zeros(E, fc1_out // self.etp_size))
            self.bias2 = nn.Parameter(torch.zeros(E, D))
        else:
            self.bias1 = self.bias2 = None
        if self.etp_size > 1:  # slices: the gradient norm counts them on every rank (Megatron's attribute)
            for p in (self.weight1, self.weight2, self.bias1):
                if p is not None:
                    p.tensor_model_parallel = True
        self.act = activation(config)

    def _slice(self, name: str, whole_1XY: torch.Tensor) -> torch.Tensor:
        """This rank's ETP slice of one expert's whole `name` tensor (a leading expert dimension of 1)."""
        return tensor_split(f"mlp.experts.{name}", self.swiglu).shard(whole_1XY, self.etp_rank, self.etp_size)[0]

    @torch.no_grad()
    def _init_weights(self, expert_offset: int, std: float, out_std: float, D: int, F_: int, fc1_out: int) -> None:
        """Expert e's weights come from its own generator seeded by (one global draw, e), so
        every expert starts the same whatever the expert-parallel layout; under ETP the whole
        expert is drawn and this rank keeps its slice."""
        base_seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())  # same draw on every device
        device = self.weight1.device
        if device.type == "meta":
            return
        for local in range(self.num_local_experts):
            e = expert_offset + local
            gen = torch.Generator(device=device).manual_seed(base_seed + 2 * e)
            w1 = torch.empty(1, D, fc1_out, device=device).normal_(0.0, std, generator=gen)
            self.weight1[local].copy_(self._slice("weight1", w1))
            gen = torch.Generator(device=device).manual_seed(base_seed + 2 * e + 1)
            w2 = torch.empty(1, F_, D, device=device).normal_(0.0, out_std, generator=gen)
            self.weight2[local].copy_(self._slice("weight2", w2))

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        h_NF = grouped_gemm(x_ND, self.weight1, tokens_per_expert_E)
        expert_of_row_N = None
        if self.bias1 is not None:
            expert_of_row_N = torch.repeat_interleave(
                torch.arange(self.num_local_experts, device=x_ND.device), tokens_per_expert_E, output_size=x_ND.shape[0])
            h_NF = h_NF + self.bias1[expert_of_row_N]
        y_ND = grouped_gemm(self.act(h_NF), self.weight2, tokens_per_expert_E)
        if self.bias2 is not None:
            bias_ND = self.bias2[expert_of_row_N]
            y_ND = y_ND + bias_ND if self.etp_rank == 0 else _BiasAddedByRankZero.apply(y_ND, bias_ND)
        return y_ND


class _BiasAddedByRankZero(torch.autograd.Function):
    """(y_ND, bias_ND) -> y_ND on ETP ranks > 0; in backward the bias gets y's gradient.

    The ETP ranks' partial outputs are summed (reduce-scatter), so the whole `bias2` must enter
    that sum once: ETP rank 0 adds it. Its gradient, the output gradient summed over rows, is
    the same on every ETP rank (the reduce-scatter's backward all-gathers the output gradient),
    so every rank takes it and the replicas stay equal without another all-reduce.
    """

    @staticmethod
    def forward(ctx, y_ND: torch.Tensor, bias_ND: torch.Tensor) -> torch.Tensor:
        return y_ND.view_as(y_ND)

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor):
        return grad_ND, grad_ND


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
