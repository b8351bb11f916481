"""The MoE layer against direct per-token computations and the dense MLP."""

import torch

from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from tests.helpers import make_config


def reference_moe(layer: MoELayer, x_TD: torch.Tensor, probs_TK, idx_TK) -> torch.Tensor:
    """out_t = sum_k p_tk * FFN_{e_tk}(x_t), one token at a time."""
    ex = layer.experts
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(idx_TK.shape[1]):
            e = int(idx_TK[t, k])
            h = ex.act(x_TD[t] @ ex.weight1[e]) @ ex.weight2[e]
            out[t] += probs_TK[t, k] * h
    return out


def test_moe_layer_equals_per_token_reference():
    torch.manual_seed(0)
    cfg = make_config("--num-experts 4 --moe-router-topk 2")
    layer = MoELayer(cfg.model)
    x = torch.randn(2, 6, 32)
    out, routing = layer(x)
    ref = reference_moe(layer, x.view(-1, 32), routing.probs_TK, routing.expert_idx_TK)
    torch.testing.assert_close(out.view(-1, 32), ref, rtol=1e-5, atol=1e-6)


def test_one_expert_top1_equals_dense_mlp():
    torch.manual_seed(0)
    cfg = make_config("--num-experts 1 --moe-router-topk 1 --moe-router-pre-softmax --moe-ffn-hidden-size 64")
    moe = MoELayer(cfg.model)
    mlp = MLP(cfg.model, 64)
    with torch.no_grad():
        moe.experts.weight1[0].copy_(mlp.linear_fc1.weight.t())
        moe.experts.weight2[0].copy_(mlp.linear_fc2.weight.t())
    x = torch.randn(3, 5, 32, requires_grad=True)
    g = torch.randn(3, 5, 32)
    out, _ = moe(x)
    out.backward(g)
    gx_moe = x.grad.clone()
    x.grad = None
    ref = mlp(x)
    ref.backward(g)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_moe, x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moe.experts.weight1.grad[0], mlp.linear_fc1.weight.grad.t(), rtol=1e-5, atol=1e-6)


def test_dropped_assignments_contribute_nothing_and_padding_changes_nothing():
    torch.manual_seed(0)
    base = "--num-experts 4 --moe-router-topk 2 --moe-expert-capacity-factor 0.5"
    layer = MoELayer(make_config(base).model)
    padded = MoELayer(make_config(base + " --moe-pad-expert-input-to-capacity").model)
    padded.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8, 32)
    out, routing = layer(x)
    assert routing.keep_TK is not None and not routing.keep_TK.all()
    ref = reference_moe(layer, x.view(-1, 32), routing.probs_TK * routing.keep_TK, routing.expert_idx_TK)
    torch.testing.assert_close(out.view(-1, 32), ref, rtol=1e-5, atol=1e-6)
    out_padded, _ = padded(x)
    torch.testing.assert_close(out_padded, out, rtol=1e-5, atol=1e-6)


def test_padding_gives_every_expert_capacity_rows():
    torch.manual_seed(0)
    layer = MoELayer(make_config("--num-experts 4 --moe-expert-capacity-factor 1.0 "
                                 "--moe-pad-expert-input-to-capacity").model)
    seen = {}
    original = layer.experts.forward

    def spy(x_ND, counts):
        seen["counts"], seen["rows"] = counts.clone(), x_ND.shape[0]
        return original(x_ND, counts)

    layer.experts.forward = spy
    _, routing = layer(torch.randn(2, 8, 32))
    assert torch.all(seen["counts"] == routing.capacity)
    assert seen["rows"] == 4 * routing.capacity


def test_shared_expert_adds_dense_mlp():
    torch.manual_seed(0)
    layer = MoELayer(make_config("--moe-shared-expert-intermediate-size 16").model)
    x = torch.randn(2, 4, 32)
    out, routing = layer(x)
    routed = reference_moe(layer, x.view(-1, 32), routing.probs_TK, routing.expert_idx_TK)
    torch.testing.assert_close(out.view(-1, 32), routed + layer.shared_experts(x.view(-1, 32)), rtol=1e-5, atol=1e-6)
