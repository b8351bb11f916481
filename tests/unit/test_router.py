"""TopKRouter against direct computations of Megatron-Core's routing and losses.

Every reference here is written out from the formulas (dense [T, E] routing maps as
Megatron-Core builds them), not by calling the router's own helpers.
"""

import pytest
import torch

from megatron.core.transformer.layer import RecomputePlan
from megatron.core.transformer.moe.router import TopKRouter, capacity_keep_mask, expert_capacity
from tests.helpers import make_config

E, D = 8, 32


def router_for(extra: str = "", seed: int = 0, train: bool = True) -> TopKRouter:
    torch.manual_seed(seed)
    r = TopKRouter(make_config(f"--num-experts {E} " + extra).model)
    return r.train(train)


def routing_map(idx_TK: torch.Tensor, num_experts: int = E) -> torch.Tensor:
    """Megatron-Core's [T, E] bool map of the chosen experts."""
    return torch.zeros(idx_TK.shape[0], num_experts).scatter(1, idx_TK, 1).bool()


def megatron_aux_loss(scores_TE: torch.Tensor, K: int, counts_E=None, total_tokens=None) -> torch.Tensor:
    """sum_e (sum_t scores_te) * tokens_e * E / (K * T * T): Megatron-Core's switch loss, coefficient 1."""
    T = scores_TE.shape[0] if total_tokens is None else total_tokens
    if counts_E is None:
        counts_E = routing_map(torch.topk(scores_TE, K, dim=1).indices, scores_TE.shape[1]).sum(0).float()
    return (scores_TE.sum(0) * counts_E).sum() * scores_TE.shape[1] / (K * T * T)


# ------------------------------------------------------------------ selection and weights

@pytest.mark.parametrize("K", [2, 3])
def test_softmax_topk_over_chosen_logits(K):
    r = router_for(f"--moe-router-topk {K}")
    x = torch.randn(10, D)
    out = r(x, seq_length=10)
    logits = x @ r.weight.t()
    ref_logits, ref_idx = torch.topk(logits, K, dim=-1)
    torch.testing.assert_close(out.expert_idx_TK, ref_idx)
    torch.testing.assert_close(out.probs_TK, torch.softmax(ref_logits, dim=-1))


@pytest.mark.parametrize("K", [1, 2])
def test_pre_softmax_and_scaling_factor(K):
    r = router_for(f"--moe-router-topk {K} --moe-router-pre-softmax --moe-router-topk-scaling-factor 2.5")
    x = torch.randn(12, D)
    out = r(x, seq_length=12)
    probs = torch.softmax(x @ r.weight.t(), dim=-1)
    ref, idx = torch.topk(probs, K, dim=-1)
    torch.testing.assert_close(out.expert_idx_TK, idx)
    torch.testing.assert_close(out.probs_TK, 2.5 * ref)


@pytest.mark.parametrize("K", [1, 2])
def test_sigmoid_scores_renormalised_over_topk_only_when_k_above_one(K):
    r = router_for(f"--moe-router-topk {K} --moe-router-score-function sigmoid")
    x = torch.randn(12, D)
    out = r(x, seq_length=12)
    s = torch.sigmoid(x @ r.weight.t())
    ref, idx = torch.topk(s, K, dim=-1)
    torch.testing.assert_close(out.expert_idx_TK, idx)
    torch.testing.assert_close(out.probs_TK, ref / ref.sum(-1, keepdim=True) if K > 1 else ref)


def test_zero_scaling_factor_is_ignored_as_in_megatron():
    r = router_for("--moe-router-topk 2 --moe-router-topk-scaling-factor 0")
    x = torch.randn(6, D)
    torch.testing.assert_close(r(x, 6).probs_TK, torch.softmax(torch.topk(x @ r.weight.t(), 2).values, -1))


# ------------------------------------------------------------------ accepted as Megatron-Core accepts them
# (the refusals are in tests/unit/test_arguments.py BAD_INPUTS)

def test_accepted_combinations():
    make_config(f"--num-experts {E} --moe-router-topk 1 --moe-router-pre-softmax")
    make_config(f"--num-experts {E} --moe-router-topk 1 --moe-router-score-function sigmoid")
    make_config(f"--num-experts {E} --moe-router-score-function sigmoid --moe-router-enable-expert-bias")
    with pytest.warns(UserWarning, match="no effect"):  # Megatron-Core ignores it with sigmoid
        make_config(f"--num-experts {E} --moe-router-score-function sigmoid --moe-router-pre-softmax")
    assert make_config(f"--num-experts {E} --moe-expert-capacity-factor -1").model.moe.capacity_factor is None


# ------------------------------------------------------------------ balancing losses

@pytest.mark.filterwarnings("ignore:--moe-router-pre-softmax has no effect")
@pytest.mark.parametrize("score, pre_softmax, K", [
    (score, pre, K) for score in ("softmax", "sigmoid") for pre in (False, True) for K in (1, 2, 3)
    if not (score == "softmax" and K == 1 and not pre)])  # that one is refused
def test_aux_loss_against_megatron_formula(score, pre_softmax, K):
    extra = f"--moe-router-topk {K} --moe-aux-loss-coeff 0.01 --moe-router-score-function {score}"
    r = router_for(extra + (" --moe-router-pre-softmax" if pre_softmax else ""))
    x = torch.randn(40, D)
    out = r(x, seq_length=40)
    logits = x @ r.weight.t()
    if score == "softmax":
        scores = torch.softmax(logits, -1)
    else:
        scores = torch.sigmoid(logits) / (torch.sigmoid(logits).sum(-1, keepdim=True) + 1e-20)
    ref = megatron_aux_loss(scores, K)
    torch.testing.assert_close(out.stats.load_balancing_loss, ref)
    torch.testing.assert_close(out.aux_loss, 0.01 * ref)


def test_aux_loss_counts_a_plain_topk_without_the_expert_bias():
    r = router_for("--moe-router-topk 2 --moe-aux-loss-coeff 1 --moe-router-score-function sigmoid "
                   "--moe-router-enable-expert-bias")
    r.expert_bias.copy_(torch.tensor([5.0, 5.0, 0, 0, 0, 0, 0, 0]))  # forces experts 0 and 1
    x = torch.randn(30, D)
    out = r(x, seq_length=30)
    assert torch.all(out.expert_idx_TK.sort(-1).values == torch.tensor([0, 1]))
    s = torch.sigmoid(x @ r.weight.t())
    scores = s / (s.sum(-1, keepdim=True) + 1e-20)
    torch.testing.assert_close(out.stats.load_balancing_loss, megatron_aux_loss(scores, 2))
    biased_counts = routing_map(out.expert_idx_TK).sum(0).float()
    assert not torch.allclose(out.stats.load_balancing_loss, megatron_aux_loss(scores, 2, biased_counts))
    # The gradient flows through the scores only.
    out.aux_loss.backward()
    probs_grad = torch.autograd.grad(megatron_aux_loss(
        torch.sigmoid(x @ r.weight.t()) / torch.sigmoid(x @ r.weight.t()).sum(-1, keepdim=True), 2,
        routing_map(torch.topk(scores, 2).indices).sum(0).float()), r.weight)[0]
    torch.testing.assert_close(r.weight.grad, probs_grad)


def test_seq_aux_loss_is_mean_of_per_sequence_losses():
    K, B, S = 2, 3, 5
    r = router_for(f"--moe-router-topk {K} --moe-aux-loss-coeff 0.1 --moe-router-load-balancing-type seq_aux_loss")
    x = torch.randn(B * S, D)
    out = r(x, seq_length=S)
    scores = torch.softmax(x @ r.weight.t(), -1).view(B, S, E)
    torch.testing.assert_close(out.stats.load_balancing_loss,
                               torch.stack([megatron_aux_loss(scores[b], K) for b in range(B)]).mean())


def test_global_aux_loss_averages_counts_over_the_steps_micro_batches():
    K = 2
    r = router_for(f"--moe-router-topk {K} --moe-aux-loss-coeff 0.1 --moe-router-load-balancing-type global_aux_loss")
    xs = [torch.randn(16, D) for _ in range(3)]
    r.start_step()
    counts = []
    for i, x in enumerate(xs):
        out = r(x, seq_length=16)
        scores = torch.softmax(x @ r.weight.t(), -1)
        counts.append(routing_map(torch.topk(scores, K).indices).sum(0).float())
        average = torch.stack(counts).mean(0)
        torch.testing.assert_close(out.stats.load_balancing_loss, megatron_aux_loss(scores, K, average), msg=str(i))
    r.start_step()  # a new step forgets the old counts
    torch.testing.assert_close(r(xs[2], 16).stats.load_balancing_loss,
                               megatron_aux_loss(torch.softmax(xs[2] @ r.weight.t(), -1), K))


def test_z_loss_formula_and_coefficient():
    r = router_for("--moe-z-loss-coeff 1e-3 --moe-aux-loss-coeff 0")
    x = torch.randn(8, D)
    out = r(x, seq_length=8)
    z = torch.logsumexp(x @ r.weight.t(), -1).pow(2).mean()
    torch.testing.assert_close(out.stats.z_loss, z)
    torch.testing.assert_close(out.aux_loss, 1e-3 * z)


def test_aux_loss_gradient_reaches_router_weight():
    r = router_for("--moe-aux-loss-coeff 1.0")
    out = r(torch.randn(16, D), seq_length=16)
    out.aux_loss.backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


def test_no_aux_losses_in_eval_mode_or_without_grad():
    r = router_for("--moe-aux-loss-coeff 1.0 --moe-z-loss-coeff 1.0", train=False)
    assert float(r(torch.randn(16, D), seq_length=16).aux_loss) == 0.0
    r.train()
    with torch.no_grad():
        assert float(r(torch.randn(16, D), seq_length=16).aux_loss) == 0.0


# ------------------------------------------------------------------ capacity

@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_keeps_at_most_capacity_per_expert(policy):
    torch.manual_seed(1)
    T, E_, K = 20, 4, 2
    probs = torch.rand(T, K)
    idx = torch.stack([torch.randperm(E_)[:K] for _ in range(T)])
    idx[:12, 0] = 0  # overload expert 0
    cap = expert_capacity(T, E_, K, 1.0)
    keep = capacity_keep_mask(probs, idx, E_, cap, policy)
    for e in range(E_):
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
    r = router_for("--moe-router-topk 2 --moe-expert-capacity-factor 0.5", train=False)
    x = torch.randn(32, D)
    out = r(x, seq_length=32)
    cap = expert_capacity(32, E, 2, 0.5)
    assert out.capacity == cap == 4
    kept = out.keep_TK.sum()
    assert int(out.stats.dropped) == 64 - int(kept)
    assert int(kept) <= E * cap
    assert torch.all(out.probs_TK[~out.keep_TK] == 0)
    # The expert-bias counts are the assignments that survive dropping (Megatron's routing map).
    torch.testing.assert_close(out.stats.routed_per_expert_E, routing_map(out.expert_idx_TK[out.keep_TK][:, None]).sum(0).float())
    torch.testing.assert_close(out.stats.tokens_per_expert_E, routing_map(out.expert_idx_TK).sum(0).float())


# ------------------------------------------------------------------ aux-loss-free balancing

def test_expert_bias_changes_selection_not_probs_and_updates_towards_balance():
    r = router_for("--moe-router-topk 1 --moe-router-enable-expert-bias --moe-router-bias-update-rate 0.1 "
                   "--moe-router-score-function sigmoid")
    x = torch.randn(64, D)
    before = r(x, seq_length=64)
    r.update_expert_bias(torch.tensor([10.0, 0.0, 0.0, 6.0, 4.0, 4.0, 4.0, 4.0]))
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.1, 0.1, 0.1, -0.1, 0, 0, 0, 0]))
    r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0, 0, 0, 0, 0]))
    after = r(x, seq_length=64)
    assert torch.all(after.expert_idx_TK == 3)
    s = torch.sigmoid(x @ r.weight.t())
    torch.testing.assert_close(after.probs_TK[:, 0], s[:, 3])  # probs from unbiased scores
    assert not torch.equal(before.expert_idx_TK, after.expert_idx_TK)


def test_recomputed_forward_does_not_count_the_micro_batch_twice():
    """Full recompute re-runs the router in backward: the global aux loss must see the same counts."""
    from megatron.core.models.gpt import GPTModel

    flags = "--moe-aux-loss-coeff 1 --moe-router-load-balancing-type global_aux_loss --recompute-granularity full"
    cfg = make_config(flags)
    torch.manual_seed(0)
    plain = GPTModel(make_config(flags.replace(" --recompute-granularity full", "")).model)
    torch.manual_seed(0)
    recomputed = GPTModel(cfg.model, recompute=RecomputePlan.build(2, "full"))
    tokens = torch.randint(0, 64, (2, 16))
    for model in (plain, recomputed):
        for layer in model.decoder.layers:
            layer.mlp.router.start_step()
        out = model(tokens, labels_BS=tokens)
        (out.lm_loss + out.aux_loss).backward()
        assert all(float(layer.mlp.router.step_micro_batches) == 1 for layer in model.decoder.layers)
    for (n, a), (_, b) in zip(plain.named_parameters(), recomputed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=n)


def test_recompute_plan_follows_megatron_methods():
    assert RecomputePlan.build(5, "full", "uniform", 2).full_segments == ((0, 2), (2, 4), (4, 5))
    assert RecomputePlan.build(5, "full", "block", 2).full_segments == ((0, 1), (1, 2))
    assert RecomputePlan.build(3, "full").full_segments == ((0, 1), (1, 2), (2, 3))
    assert RecomputePlan.build(2, "selective").per_layer == ("selective", "selective")
    assert RecomputePlan.build(2, moe_layers=True).per_layer == ("moe", "moe")
    assert RecomputePlan.build(4) == RecomputePlan((), (None,) * 4)
