"""Output layer and cross-entropy fused, chunk by chunk over tokens.

loss = sum_t w_t * CE(h_t @ W^T, y_t), with per-token weights w_t (the loss mask divided by its
sum gives the masked mean). The [T, V] logits are never materialised: each chunk of tokens
computes its logits, its share of the loss, and at once the gradients
    dlogits = w_t (softmax(logits) - onehot(y)),  dh = dlogits @ W,  dW += dlogits^T @ h,
which backward then only scales by the incoming gradient. Same FLOPs as the unfused path,
less memory (no logits, no logits gradient) and cache-sized working sets. Logits and softmax
are computed in fp32.
"""

from __future__ import annotations

import torch


def _chunk_tokens(vocab: int, device: torch.device) -> int:
    budget = 2**22 if device.type == "cpu" else 2**27  # logits elements per chunk
    return max(16, budget // max(vocab, 1))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_TD, w_VD, labels_T, weights_T):
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        T = h_TD.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=h_TD.device)
        dh_TD = torch.empty_like(h_TD) if want_dh else None
        dw_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if want_dw else None
        step = _chunk_tokens(w_VD.shape[0], h_TD.device)
        for start in range(0, T, step):
            h = h_TD[start:start + step]
            y = labels_T[start:start + step]
            wt = weights_T[start:start + step].float()
            logits = torch.mm(h, w_VD.t()).float()
            target = logits.gather(1, y.unsqueeze(1)).squeeze(1)
            # One exp pass serves both the loss and the gradient: e = exp(logits - max), in place.
            row_max = logits.amax(dim=1)
            e = logits.sub_(row_max.unsqueeze(1)).exp_()
            sum_e = e.sum(dim=1)
            loss += ((row_max + sum_e.log() - target) * wt).sum()
            if not (want_dh or want_dw):
                continue
            grad = e.mul_((wt / sum_e).unsqueeze(1))  # wt * softmax
            grad[torch.arange(grad.shape[0], device=grad.device), y] -= wt
            grad = grad.to(h_TD.dtype)
            if want_dh:
                torch.mm(grad, w_VD, out=dh_TD[start:start + step])
            if want_dw:
                if grad.dtype == dw_VD.dtype:
                    dw_VD.addmm_(grad.t(), h)
                else:
                    dw_VD.add_(torch.mm(grad.t(), h))
        ctx.save_for_backward(dh_TD, dw_VD.to(w_VD.dtype) if want_dw else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh_TD, dw_VD = ctx.saved_tensors
        dh = dh_TD * grad_loss.to(dh_TD.dtype) if dh_TD is not None else None
        dw = dw_VD * grad_loss.to(dw_VD.dtype) if dw_VD is not None else None
        return dh, dw, None, None


def linear_cross_entropy(h_TD: torch.Tensor, w_VD: torch.Tensor, labels_T: torch.Tensor,
                         weights_T: torch.Tensor) -> torch.Tensor:
    """sum_t weights_T[t] * cross_entropy(h_TD[t] @ w_VD^T, labels_T[t]) as a scalar fp32 tensor.

    h_TD and w_VD share a dtype (bf16/fp16 parameters: the matmuls run in it); the logits, the
    softmax, the loss and the accumulation of dW over chunks are fp32.
    """
    return _LinearCrossEntropy.apply(h_TD.contiguous(), w_VD, labels_T.contiguous(), weights_T.contiguous())
