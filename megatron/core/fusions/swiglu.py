"""SwiGLU with a hand-written backward: saves only its input and writes both gradient halves
straight into one buffer (autograd's version saves three tensors and concatenates in backward).

    y = silu(g) * u,  x = [g | u]
    dg = silu'(g) * (dy * u),  du = dy * silu(g),  silu'(g) = s (1 + g (1 - s)),  s = sigmoid(g)

The backward is four elementwise passes: silu'(g) times its incoming gradient is ATen's fused
`silu_backward` kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        gate, up = x.chunk(2, dim=-1)
        dx = torch.empty_like(x)
        d_gate, d_up = dx.chunk(2, dim=-1)
        torch.mul(dy, F.silu(gate), out=d_up)
        torch.ops.aten.silu_backward.grad_input(dy * up, gate, grad_input=d_gate)
        return dx


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """[..., 2F] -> [..., F]: silu(gate) * up, gate being the first half."""
    return _SwiGLU.apply(x)
