"""Router balancing losses (Megatron-Core's formulas), as plain functions, without coefficients.

Notation: T tokens, E experts, K experts per token, probs_TE the full (all-expert) router
scores, tokens_per_expert_E the number of (token, expert) assignments of a plain top-k.
The router multiplies each by its coefficient.
"""

import torch

from megatron.core.tensor_parallel import mappings


def switch_aux_loss(probs_TE: torch.Tensor, tokens_per_expert_E: torch.Tensor, topk: int,
                    num_tokens: int | None = None) -> torch.Tensor:
    """E * sum_e f_e * P_e with f_e = tokens_e / (T K) and P_e = mean_t probs_te.

    Equals 1 at perfect balance. Gradients flow through `probs_TE` only. `num_tokens` is the
    T of f_e and P_e (defaults to the rows of `probs_TE`; the global variant passes the
    data-parallel total, so that P_e is this rank's share of the global mean, as Megatron-Core
    computes it).
    """
    T, E = probs_TE.shape
    num_tokens = T if num_tokens is None else num_tokens
    f_E = tokens_per_expert_E.to(probs_TE.dtype) / (num_tokens * topk)
    P_E = probs_TE.sum(dim=0) / num_tokens
    return E * torch.sum(f_E * P_E)


def sequence_aux_loss(probs_BSE: torch.Tensor, expert_idx_BSK: torch.Tensor, group=None) -> torch.Tensor:
    """The switch loss computed within each sequence and averaged over the B sequences.

    With `group` (sequence parallelism), probs_BSE and expert_idx_BSK hold this rank's positions
    of each sequence: counts are summed over the group and the result is this rank's share of
    the loss (the shares sum to the loss of the whole sequences)."""
    B, S, E = probs_BSE.shape
    K = expert_idx_BSK.shape[-1]
    counts_BE = torch.zeros(B, E, dtype=probs_BSE.dtype, device=probs_BSE.device)
    counts_BE.scatter_add_(1, expert_idx_BSK.reshape(B, S * K), torch.ones_like(expert_idx_BSK, dtype=probs_BSE.dtype).reshape(B, S * K))
    counts_BE = mappings.all_reduce(counts_BE, group)
    S_whole = S * mappings.group_size(group)
    f_BE = counts_BE / (S_whole * K)
    P_BE = probs_BSE.sum(dim=1) / S_whole
    return E * torch.sum(f_BE * P_BE) / B


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """mean_t (logsumexp_e logits_te)^2, which keeps router logits small (ST-MoE)."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def sinkhorn(logits_TE: torch.Tensor, tol: float = 1e-4) -> torch.Tensor:
    """Sinkhorn-Knopp balancing of C = exp(logits_TE) (Megatron-Core's iteration, S-BASE routing).

    Finds d0_T, d1_E with d0_t = 1 / (T * sum_e d1_e C_te) and d1_e = 1 / (E * sum_t d0_t C_te),
    alternating the two updates (each denominator + 1e-8) until the mean change of d1 is below
    `tol`, and returns d0_t * C_te * d1_e: every token's row sums to 1/T and every expert's
    column to 1/E (up to `tol`), so a top-k of it spreads the tokens evenly.
    """
    cost_TE = torch.exp(logits_TE)
    T, E = cost_TE.shape
    d0_T = torch.ones(T, dtype=cost_TE.dtype, device=cost_TE.device)
    d1_E = torch.ones(E, dtype=cost_TE.dtype, device=cost_TE.device)
    eps, error, d1_old = 1e-8, float("inf"), d1_E
    while error > tol:
        d0_T = (1.0 / T) * (1.0 / ((d1_E * cost_TE).sum(dim=1) + eps))
        d1_E = (1.0 / E) * (1.0 / ((d0_T[:, None] * cost_TE).sum(dim=0) + eps))
        error = float((d1_old - d1_E).abs().mean())
        d1_old = d1_E
    return d1_E * cost_TE * d0_T[:, None]


def cv_squared(x_E: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, var(x) / (mean(x)^2 + 1e-10) (population variance):
    0 when all entries are equal (Shazeer et al. 2017's importance and load losses)."""
    mean = x_E.mean()
    return ((x_E - mean) ** 2).mean() / (mean ** 2 + 1e-10)


def noisy_topk_load(clean_TE: torch.Tensor, noisy_TE: torch.Tensor, noise_std_TE: torch.Tensor, topk: int
                    ) -> torch.Tensor:
    """Load_e = sum_t P(expert e is in token t's top-k when only e's noise is redrawn), Shazeer
    et al. 2017:

        P_te = Phi((clean_te - kth_excluding(noisy_t, k, e)) / noise_std_te)

    where kth_excluding is the k-th largest noisy logit of the token among the other experts:
    the (k+1)-th largest overall when e is among the top k, else the k-th. Phi is the standard
    normal CDF. Differentiable in all three inputs; needs k < E.
    """
    top_TK1 = torch.topk(noisy_TE, topk + 1, dim=-1).values
    kth_T1, next_T1 = top_TK1[:, topk - 1:topk], top_TK1[:, topk:topk + 1]
    in_topk_TE = noisy_TE >= kth_T1
    threshold_TE = torch.where(in_topk_TE, next_T1, kth_T1)
    normal = torch.distributions.Normal(clean_TE.new_zeros(()), clean_TE.new_ones(()))
    return normal.cdf((clean_TE - threshold_TE) / noise_std_TE).sum(dim=0)
