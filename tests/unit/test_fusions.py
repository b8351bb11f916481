"""Fused operations equal their plain PyTorch compositions, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

from megatron.core.fusions import linear_cross_entropy as lce
from megatron.core.fusions.linear_cross_entropy import linear_cross_entropy
from megatron.core.fusions.swiglu import swiglu


@pytest.mark.parametrize("chunk", [7, 64, 10_000])
def test_linear_cross_entropy_matches_reference(monkeypatch, chunk):
    monkeypatch.setattr(lce, "_chunk_tokens", lambda vocab, device: chunk)
    torch.manual_seed(0)
    T, D, V = 50, 16, 40
    h = torch.randn(T, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    y = torch.randint(0, V, (T,))
    mask = (torch.rand(T) > 0.3).float()
    weights = mask / mask.sum()
    loss = linear_cross_entropy(h, w, y, weights)
    (2.5 * loss).backward()
    dh, dw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = (F.cross_entropy(h @ w.t(), y, reduction="none") * weights).sum()
    (2.5 * ref).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(dh, h.grad)
    torch.testing.assert_close(dw, w.grad)


def test_linear_cross_entropy_without_grad_and_in_bf16():
    torch.manual_seed(0)
    h, w, y = torch.randn(20, 16), torch.randn(30, 16), torch.randint(0, 30, (20,))
    weights = torch.full((20,), 1 / 20)
    ref = F.cross_entropy(h @ w.t(), y)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, y, weights), ref)
    h_low, w_low = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    low = linear_cross_entropy(h_low, w_low, y, weights)
    assert low.dtype == torch.float32 and abs(float(low.detach() - ref)) < 0.05
    low.backward()
    assert h_low.grad.dtype == w_low.grad.dtype == torch.bfloat16


def test_swiglu_matches_autograd_composition():
    torch.manual_seed(0)
    x = torch.randn(33, 2 * 24, requires_grad=True)
    g = torch.randn(33, 24)
    out = swiglu(x)
    out.backward(g)
    fused_grad = x.grad.clone()
    x.grad = None
    gate, up = x.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    ref.backward(g)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(fused_grad, x.grad)
    assert torch.autograd.gradcheck(swiglu, (torch.randn(4, 6, dtype=torch.float64, requires_grad=True),))
