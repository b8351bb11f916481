"""The routing strategies beside plain top-k (group-limited, Sinkhorn, noisy top-k, expert choice), the router
dtype, forced load balancing and the Switch top-1 recipe, against direct computations on small
tensors written out from the formulas (not the routers' helpers). Megatron-Core's own numbers
for group-limited routing, Sinkhorn and fp64 are in test_router_megatron_parity.py.
"""

import math

import pytest
import torch

from megatron.core.transformer.moe import health
from megatron.core.transformer.moe.router import (ExpertChoiceRouter, GroupLimitedRouter, NoisyTopKRouter,
                                                  SinkhornRouter, TopKRouter, build_router)
from tests.helpers import make_config

E, D = 8, 32


def router_for(extra: str = "", seed: int = 0, train: bool = True):
    torch.manual_seed(seed)
    return build_router(make_config(f"--num-experts {E} " + extra).model).train(train)


# ------------------------------------------------------------------ group-limited

@pytest.mark.parametrize("score, K, G, g", [("softmax", 2, 4, 1), ("softmax", 4, 4, 2), ("sigmoid", 4, 2, 1),
                                            ("sigmoid", 3, 4, 2)])
def test_group_limited_against_direct_computation(score, K, G, g):
    extra = f"--moe-router-topk {K} --moe-router-num-groups {G} --moe-router-group-topk {g} " \
            f"--moe-router-score-function {score}" + (" --moe-router-pre-softmax" if score == "softmax" else "")
    r = router_for(extra)
    assert isinstance(r, GroupLimitedRouter)
    x = torch.randn(64, D)
    out = r(x, seq_length=64)
    logits = x @ r.weight.t()
    scores = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    size = E // G
    for t in range(64):
        group_scores = [sorted(scores[t, j * size:(j + 1) * size].tolist(), reverse=True)[:K // g] for j in range(G)]
        best = sorted(range(G), key=lambda j: -sum(group_scores[j]))[:g]
        allowed = [e for e in range(E) if e // size in best]
        ref = sorted(allowed, key=lambda e: -scores[t, e])[:K]
        assert out.expert_idx_TK[t].tolist() == ref
        chosen = scores[t, ref]
        want = chosen if score == "softmax" else (chosen / chosen.sum() if K > 1 else chosen)
        torch.testing.assert_close(out.probs_TK[t], want)


@pytest.mark.parametrize("bias", [False, True])
def test_group_limited_never_selects_outside_its_groups(bias):
    extra = "--moe-router-topk 4 --moe-router-num-groups 4 --moe-router-group-topk 2 --moe-router-score-function sigmoid"
    r = router_for(extra + (" --moe-router-enable-expert-bias" if bias else ""), seed=1)
    if bias:  # a bias that would pull every token to experts of all four groups
        r.expert_bias.copy_(torch.tensor([3.0, 0, 3.0, 0, 3.0, 0, 3.0, 0]))
    out = r(torch.randn(500, D) * 3, seq_length=500)
    groups_used = (out.expert_idx_TK // 2).sort(dim=1).values
    assert all(len(set(row)) <= 2 for row in groups_used.tolist())
    # and the aux loss still counts the unrestricted top-k (Megatron-Core's scores for the aux loss)
    assert torch.isfinite(out.aux_loss)


# ------------------------------------------------------------------ sinkhorn

def direct_sinkhorn(logits: torch.Tensor, tol: float = 1e-4) -> torch.Tensor:
    """Alternate row and column normalisation of exp(logits) to row sums 1/T and column sums 1/E."""
    T, E_ = logits.shape
    c = torch.exp(logits)
    r_, s_ = torch.ones(T), torch.ones(E_)
    prev = s_
    while True:
        r_ = 1 / (T * ((c * s_[None, :]).sum(1) + 1e-8))
        s_ = 1 / (E_ * ((c * r_[:, None]).sum(0) + 1e-8))
        if (prev - s_).abs().mean() <= tol:
            return r_[:, None] * c * s_[None, :]
        prev = s_


@pytest.mark.parametrize("K", [1, 2])
def test_sinkhorn_selects_on_balanced_scores_weights_from_raw_scores(K):
    r = router_for(f"--moe-router-topk {K} --moe-router-load-balancing-type sinkhorn --moe-z-loss-coeff 1e-3 "
                  "--moe-aux-loss-coeff 0")
    assert isinstance(r, SinkhornRouter)
    with torch.no_grad():
        r.weight[0] += 0.5  # skew the raw scores
    x = torch.randn(48, D)
    out = r(x, seq_length=48)
    logits = x @ r.weight.t()
    balanced = direct_sinkhorn(logits)
    torch.testing.assert_close(balanced.sum(0), torch.full((E,), 1 / E), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(balanced.sum(1), torch.full((48,), 1 / 48), atol=1e-4, rtol=1e-3)
    idx = torch.topk(balanced, K, dim=1).indices
    assert torch.equal(out.expert_idx_TK, idx)
    act = torch.sigmoid(logits) if K == 1 else torch.softmax(logits, -1)
    torch.testing.assert_close(out.probs_TK, act.gather(1, idx))
    assert float(out.stats.load_balancing_loss) == 0.0 and float(out.stats.z_loss) > 0
    # evaluation: the plain top-k of the activation
    r.eval()
    ev = r(x, seq_length=48)
    assert torch.equal(ev.expert_idx_TK, torch.topk(act, K, dim=1).indices)


def test_sinkhorn_balances_a_skewed_router_better_than_topk():
    skewed = "--moe-router-topk 2 --moe-router-pre-softmax"
    plain, sink = router_for(skewed, seed=3), router_for(skewed + " --moe-router-load-balancing-type sinkhorn --moe-aux-loss-coeff 0", seed=3)
    with torch.no_grad():
        for r in (plain, sink):
            r.weight[:2] += 0.3 * torch.randn(D)
    x = torch.randn(256, D)
    loads = [torch.bincount(r(x, seq_length=256).expert_idx_TK.flatten(), minlength=E).float() for r in (plain, sink)]
    assert loads[1].max() < loads[0].max()


# ------------------------------------------------------------------ dtype, forced balancing, Switch recipe

def test_fp64_router_computes_in_fp64():
    r = router_for("--moe-router-topk 2 --moe-router-dtype fp64 --moe-aux-loss-coeff 1e-2 --moe-z-loss-coeff 1e-3")
    x = torch.randn(16, D)
    out = r(x, seq_length=16)
    assert out.probs_TK.dtype == torch.float64 and out.aux_loss.dtype == torch.float64
    logits = x.double() @ r.weight.double().t()
    top, idx = torch.topk(logits, 2, dim=1)
    assert torch.equal(out.expert_idx_TK, idx)
    torch.testing.assert_close(out.probs_TK, torch.softmax(top, -1))
    out.aux_loss.backward()
    assert r.weight.grad.dtype == torch.float32 and r.weight.grad.norm() > 0
    assert out.stats.load_balancing_loss.dtype == torch.float32


def test_force_load_balancing_routes_uniformly_and_passes_gradients_through():
    r = router_for("--moe-router-topk 2 --moe-router-force-load-balancing --moe-router-num-groups 2 "
                   "--moe-router-group-topk 1")
    with torch.no_grad():
        r.weight[0] += 5.0  # a router that would send everything to expert 0
    x = torch.randn(4000, D).abs()
    out = r(x, seq_length=4000)
    load = torch.bincount(out.expert_idx_TK.flatten(), minlength=E).float()
    assert (load / load.mean() - 1).abs().max() < 0.1
    out.probs_TK.sum().backward()  # straight through: gradient reaches the weight
    assert r.weight.grad is not None and r.weight.grad.norm() > 0


def test_switch_top1_recipe():
    """--moe-router-topk 1 --moe-router-pre-softmax --moe-expert-capacity-factor c: weight = the full
    softmax's probability of the argmax, at most ceil(T/E * c) tokens an expert."""
    r = router_for("--moe-router-topk 1 --moe-router-pre-softmax --moe-expert-capacity-factor 1.25")
    assert type(r) is TopKRouter
    x = torch.randn(40, D)
    with torch.no_grad():
        r.weight[3] += 0.5
    out = r(x, seq_length=40)
    probs = torch.softmax(x @ r.weight.t(), -1)
    p, idx = probs.max(dim=1)
    assert torch.equal(out.expert_idx_TK[:, 0], idx)
    assert out.capacity == math.ceil(40 / E * 1.25)
    kept = out.keep_TK[:, 0]
    torch.testing.assert_close(out.probs_TK[:, 0], p * kept)
    assert torch.bincount(idx[kept], minlength=E).max() <= out.capacity


# ------------------------------------------------------------------ noisy top-k

def noisy(extra: str = "", seed: int = 0) -> NoisyTopKRouter:
    r = router_for("--moe-router-type noisy_topk --moe-router-topk 2 --moe-aux-loss-coeff 1e-2 " + extra, seed=seed)
    with torch.no_grad():
        r.noise_weight.normal_(0, 0.3)
    r.start_step()
    return r


def test_noisy_topk_in_eval_is_clean_topk_softmax():
    r = noisy().eval()
    x = torch.randn(20, D)
    out = r(x, seq_length=20)
    top, idx = torch.topk(x @ r.weight.t(), 2, dim=1)
    assert torch.equal(out.expert_idx_TK, idx)
    torch.testing.assert_close(out.probs_TK, torch.softmax(top, -1))


def kth_excluding(h: torch.Tensor, k: int, e: int) -> float:
    return sorted([v for j, v in enumerate(h.tolist()) if j != e], reverse=True)[k - 1]


def cv2(v: torch.Tensor) -> torch.Tensor:
    return v.var(unbiased=False) / v.mean() ** 2


def test_noisy_topk_gates_and_losses_against_direct_computation():
    r = noisy()
    x = torch.randn(24, D)
    out = r(x, seq_length=24)
    clean = x @ r.weight.t()
    std = torch.nn.functional.softplus(x @ r.noise_weight.t())
    # The router's noise for this micro-batch: recover it from a second router in the same state.
    twin = noisy()
    eps = twin.noise(clean, 24)
    h = clean + eps * std
    top, idx = torch.topk(h, 2, dim=1)
    assert torch.equal(out.expert_idx_TK, idx)
    torch.testing.assert_close(out.probs_TK, torch.softmax(top, -1))
    importance = torch.zeros(24, E).scatter(1, idx, torch.softmax(top, -1)).sum(0)
    normal = torch.distributions.Normal(0.0, 1.0)
    h, clean, std = h.detach(), clean.detach(), std.detach()
    load = torch.tensor([sum(float(normal.cdf((clean[t, e] - kth_excluding(h[t], 2, e)) / std[t, e])) for t in range(24))
                         for e in range(E)])
    ref = cv2(importance) + cv2(load)
    torch.testing.assert_close(out.stats.load_balancing_loss, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.aux_loss, 1e-2 * ref, rtol=1e-4, atol=1e-8)
    out.aux_loss.backward()
    assert r.noise_weight.grad.norm() > 0 and r.weight.grad.norm() > 0


def test_noisy_topk_load_matches_monte_carlo():
    """E[Load_e] over the noise = the expected number of tokens whose top-k holds e."""
    from megatron.core.transformer.moe.load_balancing import noisy_topk_load
    torch.manual_seed(0)
    T, K, draws = 6, 2, 4000
    clean = torch.randn(T, E) * 0.5
    std = torch.rand(T, E) * 0.8 + 0.2
    eps = torch.randn(draws, T, E)
    h = clean + eps * std
    chosen = torch.zeros(draws, T, E).scatter(2, torch.topk(h, K, dim=2).indices, 1.0)
    monte_carlo = chosen.sum(1).mean(0)
    analytic = torch.stack([noisy_topk_load(clean, h[i], std, K) for i in range(draws)]).mean(0)
    torch.testing.assert_close(analytic, monte_carlo, atol=0.08, rtol=0)
    assert abs(float(analytic.sum()) - T * K) < 0.1  # every token fills K slots in expectation


def test_noisy_topk_noise_is_keyed_by_step_and_micro_batch_and_repeats_on_recompute():
    r = noisy()
    x = torch.randn(8, D)
    state_a = r.replay_state()
    a = r(x, seq_length=8)
    state_b = r.replay_state()
    b = r(x, seq_length=8)  # two micro-batches of one step: different noise
    assert not torch.equal(a.probs_TK, b.probs_TK)
    r.recomputing = True
    for state, want in [(state_b, b), (state_a, a), (state_a, a)]:  # any order, any number of times
        r.replayed_state = state
        torch.testing.assert_close(r(x, seq_length=8).probs_TK, want.probs_TK)
    r.recomputing = False
    r.start_step()
    assert not torch.equal(r(x, seq_length=8).probs_TK, a.probs_TK)


# ------------------------------------------------------------------ expert choice

EC = "--moe-router-type expert_choice --moe-aux-loss-coeff 0 --moe-z-loss-coeff 1e-3 "


@pytest.mark.parametrize("K, c, T", [(2, 1.0, 40), (1, 1.5, 24), (2, 0.6, 30)])
def test_expert_choice_against_direct_computation(K, c, T):
    r = router_for(EC + f"--moe-router-topk {K} --moe-expert-capacity-factor {c}")
    assert isinstance(r, ExpertChoiceRouter)
    with torch.no_grad():
        r.weight[:2] += 0.3  # skewed gates: some tokens wanted by several experts, some by none
    x = torch.randn(T, D)
    out = r(x, seq_length=T)
    C = math.ceil(T * K / E * c)
    assert out.capacity == C
    gates = torch.softmax(x @ r.weight.t(), -1).detach()
    keep = torch.zeros(T, E, dtype=torch.bool)
    for e in range(E):
        best = sorted(range(T), key=lambda t: (-float(gates[t, e]), t))[:C]
        keep[best, e] = True
    assert torch.equal(out.keep_TK, keep)
    assert torch.equal(out.expert_idx_TK, torch.arange(E).expand(T, E))
    torch.testing.assert_close(out.probs_TK, gates * keep)
    assert out.keep_TK.sum(0).tolist() == [C] * E  # exactly C tokens per expert
    picks = out.keep_TK.sum(1)
    assert int(picks.min()) == 0 and int(picks.max()) >= 2  # a token may get no expert, or several
    s = out.stats
    assert s.tokens_per_expert_E.tolist() == [float(C)] * E == s.routed_per_expert_E.tolist()
    assert float(s.dropped) == float((picks == 0).sum()) and float(s.assignments) == T
    assert float(s.load_balancing_loss) == 0 and float(s.z_loss) > 0
    torch.testing.assert_close(out.aux_loss, 1e-3 * torch.logsumexp(x @ r.weight.t(), -1).pow(2).mean())
    assert health.layer_health(s.tokens_per_expert_E, float(s.dropped / s.assignments))["gini"] == 0


def test_expert_choice_capacity_above_the_tokens_takes_every_token():
    r = router_for(EC + "--moe-router-topk 2 --moe-expert-capacity-factor 8")
    out = r(torch.randn(6, D), seq_length=6)
    assert out.capacity == 6 and bool(out.keep_TK.all())


def test_expert_choice_layer_output_is_the_gated_sum_and_trains_the_router():
    """The MoE layer's output is sum over the experts that picked t of gate * expert(x_t), and the
    LM-side gradient reaches the router weight through the gates."""
    from megatron.core.transformer.moe.moe_layer import MoELayer
    torch.manual_seed(0)
    cfg = make_config(f"--num-experts {E} " + EC + "--moe-router-topk 2 --moe-expert-capacity-factor 0.5").model
    layer = MoELayer(cfg)
    x = torch.randn(2, 12, D)
    out, routing = layer(x)
    x_TD = x.reshape(24, D)
    ref = torch.zeros(24, D)
    for e in range(E):
        counts = torch.zeros(E, dtype=torch.long)
        counts[e] = 24
        ref += routing.probs_TK[:, e:e + 1].detach() * layer.experts(x_TD, counts).detach()
    torch.testing.assert_close(out.reshape(24, D), ref, rtol=1e-5, atol=1e-6)
    assert int((routing.keep_TK.sum(1) == 0).sum()) > 0  # unpicked tokens get 0 from the routed experts
    assert out.reshape(24, D)[~routing.keep_TK.any(1)].abs().max() == 0
    out.sum().backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.norm() > 0


# ------------------------------------------------------------------ configuration

@pytest.mark.parametrize("extra, message", [
    ("--moe-router-num-groups 4", "go together"),
    ("--moe-router-num-groups 3 --moe-router-group-topk 1", "must divide"),
    ("--moe-router-num-groups 4 --moe-router-group-topk 3", "cannot exceed --moe-router-topk"),
    ("--moe-router-topk 4 --moe-router-num-groups 4 --moe-router-group-topk 1", "exceeds the experts"),
    ("--moe-router-load-balancing-type sinkhorn --moe-aux-loss-coeff 0.01", "no aux loss"),
    ("--moe-router-load-balancing-type sinkhorn --moe-expert-capacity-factor 1", "capacity"),
    ("--moe-router-type noisy_topk --moe-router-score-function sigmoid", "noisy_topk"),
    ("--moe-router-type noisy_topk --moe-router-load-balancing-type seq_aux_loss", "noisy_topk"),
    ("--moe-router-type noisy_topk --moe-router-force-load-balancing", "force-load-balancing"),
    ("--moe-router-type expert_choice", "needs --moe-expert-capacity-factor"),
    ("--moe-router-type expert_choice --moe-expert-capacity-factor 1 --moe-aux-loss-coeff 1e-2", "by construction"),
    ("--moe-router-type expert_choice --moe-expert-capacity-factor 1 --moe-router-load-balancing-type seq_aux_loss",
     "by construction"),
    ("--moe-router-type expert_choice --moe-expert-capacity-factor 1 --moe-router-score-function sigmoid",
     "softmax over all experts"),
    ("--moe-router-type expert_choice --moe-expert-capacity-factor 1 --moe-token-drop-policy position", "probs"),
    ("--moe-router-type expert_choice --moe-expert-capacity-factor 1 --moe-router-num-groups 4 "
     "--moe-router-group-topk 1", "needs --moe-router-type topk"),
])
def test_refused_combinations(extra, message):
    with pytest.raises(ValueError, match=message):
        make_config(f"--num-experts {E} --moe-router-topk 2 --moe-aux-loss-coeff 0 {extra}")


def test_sinkhorn_allows_top1_softmax_without_pre_softmax():
    make_config(f"--num-experts {E} --moe-router-topk 1 --moe-router-load-balancing-type sinkhorn --moe-aux-loss-coeff 0")


def test_expert_bias_balances_a_skewed_router_within_steps():
    """Aux-loss-free balancing: with bias_e += rate * sign(mean(c) - c_e) after every step, a
    router that sends most tokens to two experts is balanced (max load < 1.25 x mean) in 60 steps."""
    for extra in ("", " --moe-router-num-groups 4 --moe-router-group-topk 2"):
        r = router_for("--moe-router-topk 2 --moe-router-score-function sigmoid --moe-router-enable-expert-bias "
                       "--moe-router-bias-update-rate 0.02 --moe-aux-loss-coeff 0" + extra, seed=5)
        with torch.no_grad():
            r.weight.normal_(0, 0.3)
            r.weight[:2] += 0.15  # experts 0 and 1 favoured by most tokens
        x = torch.randn(512, D) + 0.5

        def imbalance() -> float:
            load = torch.bincount(r(x, seq_length=512).expert_idx_TK.flatten(), minlength=E).float()
            r.update_expert_bias(load)
            return float(load.max() / load.mean())

        assert imbalance() > 2.0
        for _ in range(60):
            last = imbalance()
        assert last < 1.25, (extra, last)
