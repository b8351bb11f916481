"""SwiGLU with a hand-written backward: saves only its input and writes both gradient halves
straight into one buffer (autograd's version saves three tensors and concatenates in backward).

    y = silu(g) * u,  x = [g | u]
    dg = dy * u * s * (1 + g (1 - s)),  du = dy * silu(g),  s = sigmoid(g)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        gate, up = x.chunk(2, dim=-1)
        dx = torch.empty_like(x)
        d_gate, d_up = dx.chunk(2, dim=-1)
        s = torch.sigmoid(gate)
        silu = gate * s
        torch.mul(dy, silu, out=d_up)
        # dsilu/dg = s + silu * (1 - s)
        dsilu = silu.mul_(1.0 - s).add_(s)
        torch.mul(dy * up, dsilu, out=d_gate)
        return dx


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """[..., 2F] -> [..., F]: silu(gate) * up, gate being the first half."""
    return _SwiGLU.apply(x)
