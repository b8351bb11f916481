"""Expert-load health of an MoE layer: pure functions on a layer's counts, and a collapse monitor.

Every function takes tokens_per_expert_E, the assignments each of the E experts received (summed
over micro-batches and ranks: the step's global counts), as a tensor or anything
`torch.as_tensor` accepts. With x_e those counts, N = sum_e x_e and p_e = x_e / N:

    max/mean load        max_e x_e / (N / E)                       1 balanced, E when one expert takes all
    Gini coefficient     sum_i (2i - E - 1) x_(i) / (E N),          0 balanced, (E - 1) / E when one expert
                         x_(1) <= ... <= x_(E) sorted ascending     takes all
    load entropy         -sum_e p_e log p_e / log E  (0 log 0 = 0)  1 balanced, 0 when one expert takes all
    dropped fraction     dropped assignments / all assignments     (capacity factor only)
                         (expert choice: tokens no expert picked / tokens)

"Normalised routing entropy" means two numbers here:
  * `load_entropy`: the entropy of the load distribution p_e above (how evenly the tokens spread
    over the experts, from the counts alone), logged as `entropy`;
  * `token_entropy`: the mean over tokens of the entropy of each token's routing distribution
    q_t over all E experts, divided by log E (how sure the router is of each choice: 0 when every
    token puts all its probability on one expert, 1 when every token's scores are uniform).
    q_t is the softmax of the token's router logits over all E (sigmoid scores: the sigmoids
    normalised to sum 1), without the expert bias. Routers report it as the summed statistic
    [sum_t H(q_t) / log E, T] (`token_entropy_stat`) so that it sums over micro-batches and ranks
    like the counts.

All are undefined (nan) for a layer that routed no tokens; with E = 1 both entropies are 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

COLLAPSE_LOAD_FACTOR = 3.0
"""An expert above this many times the mean load of its layer is overloaded."""
COLLAPSE_INTERVALS = 4
"""Consecutive log intervals an expert must stay overloaded (or receive nothing) to be warned about."""


def _counts(tokens_per_expert_E) -> torch.Tensor:
    return torch.as_tensor(tokens_per_expert_E).detach().double().cpu().reshape(-1)


def max_over_mean(tokens_per_expert_E) -> float:
    """max_e x_e / mean_e x_e (1 = balanced, E = one expert takes every token)."""
    x = _counts(tokens_per_expert_E)
    total = float(x.sum())
    return float(x.max()) * x.numel() / total if total > 0 else math.nan


def gini(tokens_per_expert_E) -> float:
    """Gini coefficient of the counts: sum_i (2i - E - 1) x_(i) / (E sum x), i = 1..E ascending.

    0 when every expert has the same load, (E - 1) / E when one expert has all of it."""
    x = torch.sort(_counts(tokens_per_expert_E)).values
    E, total = x.numel(), float(x.sum())
    if total <= 0:
        return math.nan
    i = torch.arange(1, E + 1, dtype=torch.float64)
    return float(((2 * i - E - 1) * x).sum()) / (E * total)


def load_entropy(tokens_per_expert_E) -> float:
    """Entropy of the load distribution p_e = x_e / sum x over log E (1 = balanced)."""
    x = _counts(tokens_per_expert_E)
    E, total = x.numel(), float(x.sum())
    if total <= 0:
        return math.nan
    if E == 1:
        return 1.0
    p = x / total
    return float(-(torch.special.xlogy(p, p)).sum()) / math.log(E)


def token_entropy_stat(probs_TE: torch.Tensor) -> torch.Tensor:
    """[sum_t H(q_t) / log E, T] for T tokens' routing distributions q_TE (rows summing to 1), a
    float32 tensor on their device: sums over micro-batches and ranks; the mean is [0] / [1]."""
    q = probs_TE.detach().float()
    T, E = q.shape
    if E == 1:
        h_sum = q.new_tensor(float(T))
    else:
        h_sum = -torch.special.xlogy(q, q).sum() / math.log(E)
    return torch.stack([h_sum, q.new_tensor(float(T))])


def mean_token_entropy(stat: Optional[torch.Tensor]) -> Optional[float]:
    """The mean normalised per-token entropy from a summed `token_entropy_stat` (None when absent
    or over no tokens)."""
    if stat is None:
        return None
    h_sum, count = stat.reshape(-1)[:2].tolist()
    return h_sum / count if count > 0 else None


def layer_health(tokens_per_expert_E, dropped_fraction: float = 0.0,
                 token_entropy: Optional[float] = None) -> dict[str, float]:
    """The layer's health numbers under their TensorBoard names (`moe/layer_NN/<name>`):
    max_over_mean_load, gini, entropy (of the load), dropped_fraction and, when the router
    reports it, token_entropy."""
    out = {
        "max_over_mean_load": max_over_mean(tokens_per_expert_E),
        "gini": gini(tokens_per_expert_E),
        "entropy": load_entropy(tokens_per_expert_E),
        "dropped_fraction": float(dropped_fraction),
    }
    if token_entropy is not None:
        out["token_entropy"] = float(token_entropy)
    return out


@dataclass
class _Streak:
    intervals: int = 0
    warned: bool = False


@dataclass
class CollapseMonitor:
    """Warns, once per episode, when an expert stays above `load_factor` x its layer's mean load,
    or receives no tokens, for `intervals` consecutive log intervals.

    Feed it each MoE layer's counts once per log interval (`update`); it returns the warning lines
    to print (one line each, naming the layer and the expert). An episode ends when the expert
    is back under the threshold (or receives tokens again); a later episode warns again. Held by
    the training logger, one per run.
    """

    load_factor: float = COLLAPSE_LOAD_FACTOR
    intervals: int = COLLAPSE_INTERVALS
    _over: dict = field(default_factory=dict)
    _starved: dict = field(default_factory=dict)

    def update(self, layer: int, tokens_per_expert_E, iteration: Optional[int] = None) -> list[str]:
        x = _counts(tokens_per_expert_E)
        total = float(x.sum())
        if total <= 0:  # nothing routed (no MoE tokens this interval): no evidence either way
            return []
        mean = total / x.numel()
        at = f" at iteration {iteration}" if iteration is not None else ""
        messages = []
        for e, count in enumerate(x.tolist()):
            ratio = count / mean
            if self._step(self._over, (layer, e), ratio > self.load_factor):
                messages.append(
                    f"expert {e} of layer {layer} has had > {self.load_factor:g}x the mean load for "
                    f"{self.intervals} log intervals ({ratio:.2f}x{at}; layer gini {gini(x):.3f}): "
                    f"routing may be collapsing onto it")
            if self._step(self._starved, (layer, e), count == 0):
                messages.append(
                    f"expert {e} of layer {layer} received no tokens for {self.intervals} log intervals "
                    f"({'up to iteration ' + str(iteration) if iteration is not None else 'in a row'}; "
                    f"layer max/mean load {max_over_mean(x):.2f}): it is dead")
        return messages

    def _step(self, streaks: dict, key, condition: bool) -> bool:
        """Advance one expert's streak; True exactly when it reaches `intervals` in this episode."""
        if not condition:
            streaks.pop(key, None)
            return False
        s = streaks.setdefault(key, _Streak())
        s.intervals += 1
        if s.intervals >= self.intervals and not s.warned:
            s.warned = True
            return True
        return False
