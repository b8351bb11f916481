"""Router auxiliary losses (DESIGN.md 5.1), as plain functions of the router's outputs.

Notation: T tokens, E experts, K experts per token, probs_TE the full (all-expert) router
probabilities, tokens_per_expert_E the number of (token, expert) assignments made by top-k.
"""

import torch


def switch_aux_loss(probs_TE: torch.Tensor, tokens_per_expert_E: torch.Tensor, topk: int,
                    coeff: float, num_tokens: int | None = None) -> torch.Tensor:
    """coeff * E * sum_e f_e * P_e with f_e = tokens_e / (T K) and P_e = mean_t probs_te.

    Equals `coeff` at perfect balance. Gradients flow through `probs_TE` only. `num_tokens`
    is the T of f_e (defaults to the rows of `probs_TE`; the global-batch variant passes more).
    """
    T, E = probs_TE.shape
    num_tokens = T if num_tokens is None else num_tokens
    f_E = tokens_per_expert_E.to(probs_TE.dtype) / (num_tokens * topk)
    P_E = probs_TE.mean(dim=0)
    return coeff * E * torch.sum(f_E * P_E)


def sequence_aux_loss(probs_BSE: torch.Tensor, expert_idx_BSK: torch.Tensor, coeff: float) -> torch.Tensor:
    """The switch loss computed within each sequence and averaged over the B sequences."""
    B, S, E = probs_BSE.shape
    K = expert_idx_BSK.shape[-1]
    counts_BE = torch.zeros(B, E, dtype=probs_BSE.dtype, device=probs_BSE.device)
    counts_BE.scatter_add_(1, expert_idx_BSK.reshape(B, S * K), torch.ones_like(expert_idx_BSK, dtype=probs_BSE.dtype).reshape(B, S * K))
    f_BE = counts_BE / (S * K)
    P_BE = probs_BSE.mean(dim=1)
    return coeff * E * torch.sum(f_BE * P_BE) / B


def z_loss(logits_TE: torch.Tensor, coeff: float) -> torch.Tensor:
    """coeff * mean_t (logsumexp_e logits_te)^2, which keeps router logits small (ST-MoE)."""
    return coeff * torch.logsumexp(logits_TE, dim=-1).square().mean()
