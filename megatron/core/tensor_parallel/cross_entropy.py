"""Vocab-parallel output layer and cross-entropy, fused and chunked over tokens.

The tensor-parallel counterpart of `fusions.linear_cross_entropy`: rank r holds rows
[r*v, (r+1)*v) of the output weight W_VD (v = V / T) and never holds more than one chunk's
logits of its slice, [chunk, v]. Per chunk of tokens:

    logits_cv = h_cD @ w_vD^T (fp32);  m_c = all-reduce MAX of the row max;
    e_cv = exp(logits - m);  [sum_c, target_c] = all-reduce SUM of [sum_v e, logit of y on its owner]
    loss += sum_t w_t (m + log sum - target)
    dlogits = w_t (softmax - onehot(y)) on this rank's slice;  dh_cD = dlogits @ w_vD (partial);
    dw_vD += dlogits^T @ h

Two small all-reduces per chunk ([c] and [2, c]). dh is this rank's partial sum: the input
must enter through `copy_to_tensor_parallel_region` (all-reduce in backward) or, with sequence
parallelism, `gather_from_sequence_parallel_region` (reduce-scatter in backward), as
`vocab_parallel_cross_entropy_loss` does. The loss is the same on every rank of the group.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron.core.fusions.linear_cross_entropy import _chunk_tokens
from megatron.core.tensor_parallel import mappings


def _all_reduce_(x: torch.Tensor, group, op) -> torch.Tensor:
    if mappings.group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def _chunk_loss_and_grad(h, w_vD, y, wt, vocab_start: int, group, want_grad: bool):
    """One chunk: (its weighted loss, w_t (softmax - onehot) on this rank's slice, or None)."""
    logits = torch.mm(h, w_vD.t()).float()
    v = w_vD.shape[0]
    local = y - vocab_start
    mine = (local >= 0) & (local < v)
    local = local.masked_fill(~mine, 0)
    row_max = _all_reduce_(logits.amax(dim=1), group, dist.ReduceOp.MAX)
    target = logits.gather(1, local.unsqueeze(1)).squeeze(1).masked_fill(~mine, 0.0)
    e = logits.sub_(row_max.unsqueeze(1)).exp_()
    sums = _all_reduce_(torch.stack([e.sum(dim=1), target]), group, dist.ReduceOp.SUM)
    sum_e, target = sums[0], sums[1]
    loss = ((row_max + sum_e.log() - target) * wt).sum()
    if not want_grad:
        return loss, None
    grad = e.mul_((wt / sum_e).unsqueeze(1))
    rows = torch.nonzero(mine).squeeze(1)
    grad[rows, local[rows]] -= wt[rows]
    return loss, grad


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_TD, w_vD, labels_T, weights_T, vocab_start, group, chunk_tokens):
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        T = h_TD.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=h_TD.device)
        dh_TD = torch.empty_like(h_TD) if want_dh else None
        dw_vD = torch.zeros(w_vD.shape, dtype=torch.float32, device=w_vD.device) if want_dw else None
        # Chunk by the full vocabulary so every rank walks the same chunks (the collectives match).
        step = chunk_tokens or _chunk_tokens(w_vD.shape[0] * mappings.group_size(group), h_TD.device)
        for start in range(0, T, step):
            h = h_TD[start:start + step]
            chunk_loss, grad = _chunk_loss_and_grad(h, w_vD, labels_T[start:start + step],
                                                    weights_T[start:start + step].float(), vocab_start,
                                                    group, want_dh or want_dw)
            loss += chunk_loss
            if grad is None:
                continue
            grad = grad.to(h_TD.dtype)
            if want_dh:
                torch.mm(grad, w_vD, out=dh_TD[start:start + step])
            if want_dw:
                dw_vD.add_(torch.mm(grad.t(), h).float())
        ctx.save_for_backward(dh_TD, dw_vD.to(w_vD.dtype) if want_dw else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh_TD, dw_vD = ctx.saved_tensors
        dh = dh_TD * grad_loss.to(dh_TD.dtype) if dh_TD is not None else None
        dw = dw_vD * grad_loss.to(dw_vD.dtype) if dw_vD is not None else None
        return dh, dw, None, None, None, None, None


def vocab_parallel_linear_cross_entropy(h_TD: torch.Tensor, w_vD: torch.Tensor, labels_T: torch.Tensor,
                                        weights_T: torch.Tensor, group,
                                        vocab_start: Optional[int] = None,
                                        chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """sum_t weights_T[t] * CE(h_TD[t] @ W_VD^T, labels_T[t]) from this rank's rows w_vD of W_VD.

    h_TD, labels_T and weights_T are the same on every rank of `group`; `vocab_start` defaults
    to rank * v; `chunk_tokens` overrides the chunk size (tokens per chunk, the same on every
    rank; by default the fused loss's size for the full vocabulary). Backward gives this rank's partial dh (see the module docstring) and its dw_vD.
    """
    if vocab_start is None:
        vocab_start = mappings.group_rank(group) * w_vD.shape[0]
    return _VocabParallelLinearCrossEntropy.apply(h_TD.contiguous(), w_vD, labels_T.contiguous(),
                                                  weights_T.contiguous(), vocab_start, group, chunk_tokens)


def vocab_parallel_cross_entropy_loss(h_BSD: torch.Tensor, w_vD: torch.Tensor, labels_BS: torch.Tensor,
                                      weights_T: torch.Tensor, group,
                                      sequence_parallel: bool = False,
                                      chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """The output layer's loss on TP ranks: h_BSD (h_BsD under sequence parallelism, the rank's
    sequence shard) enters the TP region, then the fused vocab-parallel loss over all B*S tokens
    (labels_BS and weights_T, T = B*S in (b, s) order, are full on every rank)."""
    if sequence_parallel:
        h_BSD = mappings.gather_from_sequence_parallel_region(h_BSD, group)
    else:
        h_BSD = mappings.copy_to_tensor_parallel_region(h_BSD, group)
    return vocab_parallel_linear_cross_entropy(h_BSD.flatten(0, 1), w_vD, labels_BS.flatten(), weights_T, group,
                                               chunk_tokens=chunk_tokens)
