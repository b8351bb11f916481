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
