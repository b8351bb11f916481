"""Grouped experts equal the per-expert loop, forward and backward, on every path."""

import pytest
import torch

from megatron.core.transformer.moe import experts as experts_mod
from megatron.core.transformer.moe.experts import GroupedExperts, grouped_gemm, per_expert_loop
from tests.helpers import make_config


def _grads(module, x, y, g):
    module.zero_grad()
    if x.grad is not None:
        x.grad = None
    y.backward(g)
    return x.grad.clone(), [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("swiglu", [True, False])
@pytest.mark.parametrize("counts", [[5, 0, 7, 4], [0, 0, 16, 0], [4, 4, 4, 4]])
def test_grouped_equals_loop(counts, swiglu, bias):


    cfg = make_config("--moe-ffn-hidden-size 48")
    cfg.model.swiglu = swiglu
    cfg.model.add_bias_linear = bias
    torch.manual_seed(0)
    ex = GroupedExperts(cfg.model, 4)
    if bias:
        with torch.no_grad():
            ex.bias1.normal_()
            ex.bias2.normal_()
    counts_E = torch.tensor(counts)
    x = torch.randn(int(counts_E.sum()), 32, requires_grad=True)
    g = torch.randn(x.shape[0], 32)  # a real gradient: grouped_mm rejects stride-0 ones
    y = ex(x, counts_E)
    gx, gp = _grads(ex, x, y, g)
    y_ref = per_expert_loop(ex, x, counts_E)
    gx_ref, gp_ref = _grads(ex, x, y_ref, g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(gp, gp_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_padded_bmm_fallback_equals_grouped_mm():
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 9, 4])
    x = torch.randn(16, 32, requires_grad=True)
    w = torch.randn(4, 32, 24, requires_grad=True)
    g = torch.randn(16, 24)
    y = grouped_gemm(x, w, counts)
    y.backward(g)
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    y2 = experts_mod._padded_bmm(x, w, counts)
    y2.backward(g)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


def test_unaligned_shapes_use_fallback_correctly():
    # 13 fp32 features = 52-byte rows: grouped_mm refuses them, the fallback must not.
    counts = torch.tensor([2, 5])
    x = torch.randn(7, 13)
    w = torch.randn(2, 13, 5)
    y = grouped_gemm(x, w, counts)
    torch.testing.assert_close(y, torch.cat([x[:2] @ w[0], x[2:] @ w[1]]))


def test_bf16_operands_give_bf16_close_to_fp32():
    counts = torch.tensor([8, 8])
    x, w = torch.randn(16, 32), torch.randn(2, 32, 16)
    y = grouped_gemm(x.bfloat16(), w.bfloat16(), counts)
    assert y.dtype == torch.bfloat16
    ref = torch.cat([x[:8] @ w[0], x[8:] @ w[1]])
    assert (y.float() - ref).abs().max() < 0.1


def test_expert_init_independent_of_expert_parallel_layout():
    cfg = make_config("--num-experts 4")
    torch.manual_seed(3)
    full = GroupedExperts(cfg.model, 4, 0)
    torch.manual_seed(3)
    half = GroupedExperts(cfg.model, 2, 2)
    torch.testing.assert_close(half.weight1, full.weight1[2:])
    torch.testing.assert_close(half.weight2, full.weight2[2:])
    assert not torch.equal(full.weight1[0], full.weight1[1])
