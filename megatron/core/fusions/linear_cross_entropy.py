"""Output layer and cross-entropy fused, chunk by chunk over tokens; vocab-parallel as well.

loss = sum_t w_t * CE(h_t @ W^T, y_t), with per-token weights w_t (the loss mask divided by its
sum gives the masked mean). The [T, V] logits are never materialised: each chunk of tokens
computes its logits, its share of the loss, and at once the gradients
    dlogits = w_t (softmax(logits) - onehot(y)),  dh = dlogits @ W,  dW += dlogits^T @ h,
which backward then only scales by the incoming gradient. Same FLOPs as the unfused path,
less memory (no logits, no logits gradient) and cache-sized working sets. Logits and softmax
are computed in fp32.

Vocab-parallel (a tensor-parallel `group` of T ranks): rank r holds rows [vocab_start,
vocab_start + v) of W (v = V / T) and only a chunk's [c, v] logits. Two small all-reduces per
chunk give the softmax over the whole vocabulary: the MAX of the row maxima, then the SUM of
[sum of exp, the target's logit (on the rank that owns the target)]. dlogits and dW are this
rank's slice, dh its partial sum over its vocabulary slice (the caller sums it over the group,
see `tensor_parallel.cross_entropy`). Every rank walks the same chunks (sized by the full
vocabulary), so the collectives match. With no group it is the single-device loss.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _chunk_tokens(vocab: int, device: torch.device) -> int:
    budget = 2**22 if device.type == "cpu" else 2**27  # logits elements per chunk
    return max(16, budget // max(vocab, 1))


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group, op) -> torch.Tensor:
    if _group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def _chunk_loss_and_grad(h, w_vD, y, wt, vocab_start: int, group, want_grad: bool):
    """One chunk: (its weighted loss, w_t (softmax - onehot) on this rank's vocabulary slice, or None)."""
    logits = torch.mm(h, w_vD.t()).float()
    local = y - vocab_start
    mine = (local >= 0) & (local < w_vD.shape[0])
    local = local.masked_fill(~mine, 0)
    target = logits.gather(1, local.unsqueeze(1)).squeeze(1).masked_fill(~mine, 0.0)
    # One exp pass serves both the loss and the gradient: e = exp(logits - max), in place.
    row_max = _all_reduce(logits.amax(dim=1), group, dist.ReduceOp.MAX)
    e = logits.sub_(row_max.unsqueeze(1)).exp_()
    sum_e, target = _all_reduce(torch.stack([e.sum(dim=1), target]), group, dist.ReduceOp.SUM)
    loss = ((row_max + sum_e.log() - target) * wt).sum()
    if not want_grad:
        return loss, None
    grad = e.mul_((wt / sum_e).unsqueeze(1))  # wt * softmax
    grad[torch.arange(grad.shape[0], device=grad.device), local] -= wt * mine
    return loss, grad


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_TD, w_vD, labels_T, weights_T, vocab_start, group, chunk_tokens):
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        T = h_TD.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=h_TD.device)
        dh_TD = torch.empty_like(h_TD) if want_dh else None
        dw_vD = torch.zeros(w_vD.shape, dtype=torch.float32, device=w_vD.device) if want_dw else None
        step = chunk_tokens or _chunk_tokens(w_vD.shape[0] * _group_size(group), h_TD.device)
        for start in range(0, T, step):
            h = h_TD[start:start + step]
            chunk_loss, grad = _chunk_loss_and_grad(h, w_vD, labels_T[start:start + step],
                                                    weights_T[start:start + step].float(), vocab_start, group,
                                                    want_dh or want_dw)
            loss += chunk_loss
            if grad is None:
                continue
            grad = grad.to(h_TD.dtype)
            if want_dh:
                torch.mm(grad, w_vD, out=dh_TD[start:start + step])
            if want_dw:
                if grad.dtype == dw_vD.dtype:
                    dw_vD.addmm_(grad.t(), h)
                else:
                    dw_vD.add_(torch.mm(grad.t(), h))
        ctx.save_for_backward(dh_TD, dw_vD.to(w_vD.dtype) if want_dw else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh_TD, dw_vD = ctx.saved_tensors
        dh = dh_TD * grad_loss.to(dh_TD.dtype) if dh_TD is not None else None
        dw = dw_vD * grad_loss.to(dw_vD.dtype) if dw_vD is not None else None
        return dh, dw, None, None, None, None, None


def linear_cross_entropy(h_TD: torch.Tensor, w_vD: torch.Tensor, labels_T: torch.Tensor, weights_T: torch.Tensor,
                         group: Optional[dist.ProcessGroup] = None, vocab_start: int = 0,
                         chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """sum_t weights_T[t] * cross_entropy(h_TD[t] @ W_VD^T, labels_T[t]) as a scalar fp32 tensor.

    w_vD is W_VD itself, or with a tensor-parallel `group` this rank's rows [vocab_start,
    vocab_start + v) of it (h_TD, labels_T and weights_T then the same on every rank; backward
    gives this rank's partial dh, see the module docstring). `chunk_tokens` overrides the tokens
    per chunk. h_TD and w_vD share a dtype (bf16/fp16 parameters: the matmuls run in it); the
    logits, the softmax, the loss and the accumulation of dW over chunks are fp32.
    """
    return _LinearCrossEntropy.apply(h_TD.contiguous(), w_vD, labels_T.contiguous(), weights_T.contiguous(),
                                     vocab_start, group, chunk_tokens)
