"""TopKRouter against direct computations of Megatron-Core's routing and losses."""

import math

import pytest
import torch

from megatron.core.transformer.moe import load_balancing
from megatron.core.transformer.moe.router import TopKRouter, capacity_keep_mask, expert_capacity
from tests.helpers import make_config


def router_for(extra: str = "", seed: int = 0) -> TopKRouter:
    torch.manual_seed(seed)
    return TopKRouter(make_config(extra).model)


def test_softmax_topk_over_chosen_logits():
    r = router_for("--num-experts 8 --moe-router-topk 3")
    x = torch.randn(10, 32)
    out = r(x, seq_length=10)
    logits = x @ r.weight.t()
    ref_logits, ref_idx = torch.topk(logits, 3, dim=-1)
    torch.testing.assert_close(out.expert_idx_TK, ref_idx)
    torch.testing.assert_close(out.probs_TK, torch.softmax(ref_logits, dim=-1))


def test_pre_softmax_and_scaling_factor():
    r = router_for("--num-experts 8 --moe-router-topk 2 --moe-router-pre-softmax --moe-router-topk-scaling-factor 2.5")
    x = torch.randn(12, 32)
    out = r(x, seq_length=12)
    probs = torch.softmax(x @ r.weight.t(), dim=-1)
    ref, idx = torch.topk(probs, 2, dim=-1)
    torch.testing.assert_close(out.expert_idx_TK, idx)
    torch.testing.assert_close(out.probs_TK, 2.5 * ref)


def test_sigmoid_scores_renormalised_over_topk():
    r = router_for("--num-experts 8 --moe-router-topk 2 --moe-router-score-function sigmoid")
    x = torch.randn(12, 32)
    out = r(x, seq_length=12)
    s = torch.sigmoid(x @ r.weight.t())
    ref, idx = torch.topk(s, 2, dim=-1)
    torch.testing.assert_close(out.expert_idx_TK, idx)
    torch.testing.assert_close(out.probs_TK, ref / ref.sum(-1, keepdim=True))


def test_aux_loss_matches_formula_and_equals_coeff_at_balance():
    coeff, E, K, T = 0.01, 4, 2, 16
    # Perfect balance: uniform probabilities and equal counts.
    probs = torch.full((T, E), 1.0 / E)
    counts = torch.full((E,), T * K / E)
    assert math.isclose(float(load_balancing.switch_aux_loss(probs, counts, K, coeff)), coeff, rel_tol=1e-6)
    # Against the formula on random routing.
    r = router_for(f"--num-experts {E} --moe-router-topk {K} --moe-aux-loss-coeff {coeff}")
    r.train()
    x = torch.randn(T, 32)
    out = r(x, seq_length=T)
    logits = x @ r.weight.t()
    P = torch.softmax(logits, -1).mean(0)
    f = torch.bincount(out.expert_idx_TK.flatten(), minlength=E).float() / (T * K)
    torch.testing.assert_close(out.stats.load_balancing_loss, coeff * E * (f * P).sum())


def test_seq_aux_loss_is_mean_of_per_sequence_losses():
    coeff, E, K, B, S = 0.1, 4, 2, 3, 5
    r = router_for(f"--num-experts {E} --moe-router-topk {K} --moe-aux-loss-coeff {coeff} "
                   "--moe-router-load-balancing-type seq_aux_loss")
    r.train()
    x = torch.randn(B * S, 32)
    out = r(x, seq_length=S)
    probs = torch.softmax(x @ r.weight.t(), -1).view(B, S, E)
    idx = out.expert_idx_TK.view(B, S, K)
    per_seq = [load_balancing.switch_aux_loss(probs[b], torch.bincount(idx[b].flatten(), minlength=E), K, coeff)
               for b in range(B)]
    torch.testing.assert_close(out.stats.load_balancing_loss, torch.stack(per_seq).mean())


def test_z_loss_formula():
    r = router_for("--moe-z-loss-coeff 1e-3 --moe-aux-loss-coeff 0")
    r.train()
    x = torch.randn(8, 32)
    out = r(x, seq_length=8)
    logits = x @ r.weight.t()
    torch.testing.assert_close(out.stats.z_loss, 1e-3 * torch.logsumexp(logits, -1).pow(2).mean())
    torch.testing.assert_close(out.aux_loss, out.stats.z_loss)


def test_aux_loss_gradient_reaches_router_weight():
    r = router_for("--moe-aux-loss-coeff 1.0")
    r.train()
    out = r(torch.randn(16, 32), seq_length=16)
    out.aux_loss.backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


def test_no_aux_loss_in_eval_mode():
    r = router_for("--moe-aux-loss-coeff 1.0")
    r.eval()
    assert float(r(torch.randn(16, 32), seq_length=16).aux_loss) == 0.0


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_keeps_at_most_capacity_per_expert(policy):
    torch.manual_seed(1)
    T, E, K = 20, 4, 2
    probs = torch.rand(T, K)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    idx[:12, 0] = 0  # overload expert 0
    cap = expert_capacity(T, E, K, 1.0)
    keep = capacity_keep_mask(probs, idx, E, cap, policy)
    for e in range(E):
        chosen = idx == e
        kept = (keep & chosen).sum()
        assert kept == min(cap, int(chosen.sum()))
        dropped = chosen & ~keep
        if dropped.any():
            if policy == "probs":
                assert probs[keep & chosen].min() >= probs[dropped].max()
            else:  # position: every kept token comes before every dropped one
                kept_tokens = (keep & chosen).nonzero()[:, 0]
                assert kept_tokens.max() < dropped.nonzero()[:, 0].min()


def test_capacity_factor_drops_and_counts():
    r = router_for("--num-experts 4 --moe-router-topk 2 --moe-expert-capacity-factor 0.5")
    x = torch.randn(32, 32)
    out = r(x, seq_length=32)
    cap = expert_capacity(32, 4, 2, 0.5)
    assert out.capacity == cap == 8
    kept = out.keep_TK.sum()
    assert int(out.stats.dropped) == 64 - int(kept)
    assert int(kept) <= 4 * cap
    assert torch.all(out.probs_TK[~out.keep_TK] == 0)


def test_expert_bias_changes_selection_not_probs_and_updates_towards_balance():
    r = router_for("--num-experts 4 --moe-router-topk 1 --moe-router-enable-expert-bias "
                   "--moe-router-bias-update-rate 0.1 --moe-router-score-function sigmoid")
    x = torch.randn(64, 32)
    before = r(x, seq_length=64)
    r.update_expert_bias(torch.tensor([10.0, 0.0, 0.0, 6.0]))
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.1, 0.1, 0.1, -0.1]))
    r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    after = r(x, seq_length=64)
    assert torch.all(after.expert_idx_TK == 3)
    s = torch.sigmoid(x @ r.weight.t())
    torch.testing.assert_close(after.probs_TK[:, 0], s[:, 3])  # probs from unbiased scores
    assert not torch.equal(before.expert_idx_TK, after.expert_idx_TK)
