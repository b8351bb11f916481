"""Tensor-parallel layers and loss at T = 1 (group None) are the plain single-device modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core.fusions.linear_cross_entropy import linear_cross_entropy
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    split_qkv,
    split_swiglu_fc1,
)
from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_linear_cross_entropy


def test_layers_without_group_are_plain_linear_and_embedding():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 3, 4), torch.randn(5, 4), torch.randn(5)
    for cls in (ColumnParallelLinear, RowParallelLinear):
        for sp in (False, True):
            torch.testing.assert_close(cls.from_full(w, b, None, sp)(x), F.linear(x, w, b))
    tokens = torch.randint(0, 5, (2, 3))
    torch.testing.assert_close(VocabParallelEmbedding.from_full(w, None)(tokens), F.embedding(tokens, w))


def test_splits_without_group_keep_everything():
    w = torch.randn(8, 3)
    assert split_swiglu_fc1(w, None).equal(w)
    assert split_qkv(2)(w, None).equal(w)


def test_vocab_parallel_loss_without_group_equals_fused_loss():
    torch.manual_seed(0)
    h, w = torch.randn(11, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    labels, weights = torch.randint(0, 9, (11,)), torch.rand(11)
    loss = vocab_parallel_linear_cross_entropy(h, w, labels, weights, None, chunk_tokens=4)
    loss.backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = linear_cross_entropy(h2, w2, labels, weights)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
